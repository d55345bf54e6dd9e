"""Where a durable stage transition's cost comes from: engine Python vs store vs SQL.

    .venv/bin/python benchmarks/breakdown.py

Diagnostics behind the figures of throughput.py (D), each the median of 3, all measured:

  S  the store alone: 1,000 concurrent tasks x 10 `SQLiteStore.step_run` calls (the stage
     commit the engine makes: guard, 2 journal rows, stage_index), each awaited: the store's
     ceiling.
  E  the engine with an instant store: `step_run` and `finish_run` replaced by functions that
     return at once (nothing written), 1,000 concurrent runs; the per-stage cost is
     (time for 10-stage runs - time for 1-stage runs) / 9: the engine's Python per stage.
  F  the same with the real store: the full per-stage cost inside the engine; and the same
     split of the CPU time of the event loop's thread and of the writer thread.
  W  the writer's SQL alone for 1,000 stage advances in one transaction (synchronous=FULL),
     4 ways: W1 per advance an UPDATE ... RETURNING and an executemany of its 2 journal rows
     (the store up to 923d592); W2 the same UPDATEs, but the batch's journal rows in one
     executemany (the store from 869130a); W3 one executemany of guarded UPDATEs (guard on
     seq) and one of all journal rows; W4 one executemany of one journal row per stage and
     no `runs` update at all (fencing would come from the journal's primary key); W5 the
     store's own statements now (`batch.Step.apply_many`: multi-row guarded UPDATEs, then
     the journal rows, the next stage's `started` folded into each stage's row).
  L  one run alone (as throughput.py's C): how long `submit` takes (the create commit), the
     journal's created..completed span (the 10 stage commits), and from the last commit
     (`completed` row's time) until `wait` returned.

E uses private attributes (`engine._active`) to wait for the drivers, because with nothing
written `engine.wait` cannot see the runs finish; if they change, E says so instead.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import shutil
import sqlite3
import tempfile
import time
from typing import Any

from _common import N_STAGES, PIPELINE, RUN_INPUT, emit, make_stage, median, thread_cpu

import waystation as ws
from waystation import migrations
from waystation.store import batch as batched
from waystation.store.base import NewRun, NewTransition

ONE_STAGE = ws.Pipeline("bench1", [make_stage(0)], version="1")
TRIALS = 3


# -- S: the store alone -------------------------------------------------------------------


async def store_alone(path: str, runs: int) -> float:
    store = ws.SQLiteStore(path, durability="full")
    await store.open()
    owner = "bench:1:x"
    try:
        ids = [f"run-{i:06d}" for i in range(runs)]
        await asyncio.gather(
            *(
                store.create_run(
                    NewRun(
                        run_id=rid,
                        pipeline="p",
                        pipeline_version="1",
                        fingerprint="f",
                        status="running",
                        input="{}",
                        root_run_id=rid,
                        lease_owner=owner,
                        lease_expires=time.time() + 60,
                        transitions=[NewTransition("created"), NewTransition("started", 0, "s0")],
                    )
                )
                for rid in ids
            )
        )

        async def one(rid: str) -> None:
            seq: int | None = 2
            for i in range(N_STAGES):
                assert seq is not None
                seq = await store.step_run(
                    rid,
                    owner,
                    seq,
                    i + 1,
                    [
                        NewTransition("succeeded", i, f"s{i}", 1, payload=str(i)),
                        NewTransition("started", i + 1, f"s{i + 1}", 1),
                    ],
                )
            assert seq is not None

        t0 = time.perf_counter()
        await asyncio.gather(*(one(rid) for rid in ids))
        elapsed = time.perf_counter() - t0
    finally:
        await store.close()
    return runs * N_STAGES / elapsed


# -- E and F: the engine, with an instant store or the real one ---------------------------


async def engine_runs(
    path: str, pipeline: ws.Pipeline, runs: int, instant: bool
) -> tuple[float, dict[str, float]]:
    async with ws.Engine.open(path, pipelines=[PIPELINE, ONE_STAGE]) as engine:
        if instant:
            loop = asyncio.get_running_loop()

            def step_run(
                run_id: str, owner: str, seq: int, stage_index: int, transitions: Any
            ) -> asyncio.Future[int]:
                done = loop.create_future()
                done.set_result(seq + len(transitions))
                return done

            async def finish_run(*args: Any) -> float:
                return time.time()

            # The stage commits (step_run, and finish_run for the last) become instant;
            # the create commit stays real, and cancels out in E (t10 - t1).
            engine.store.step_run = step_run  # type: ignore[method-assign]
            engine.store.finish_run = finish_run  # type: ignore[method-assign]
        active = engine._active
        cpu0 = thread_cpu()
        t0 = time.perf_counter()
        submitted = await asyncio.gather(*(engine.submit(pipeline, RUN_INPUT) for _ in range(runs)))
        if instant:
            for r in submitted:
                driver = active.get(r.run_id)
                if driver is not None:
                    await driver.done.wait()
        else:
            await asyncio.gather(*(engine.wait(r.run_id) for r in submitted))
        elapsed = time.perf_counter() - t0
        cpu1 = thread_cpu()
        return elapsed, {k: cpu1.get(k, 0.0) - cpu0.get(k, 0.0) for k in CPU_THREADS}


CPU_THREADS = {"MainThread": "loop", "waystation-writer": "writer"}


async def per_stage_us(tmp: str, runs: int, instant: bool) -> dict[str, float]:
    t10, cpu10 = await engine_runs(os.path.join(tmp, "e10.db"), PIPELINE, runs, instant)
    t1, cpu1 = await engine_runs(os.path.join(tmp, "e1.db"), ONE_STAGE, runs, instant)
    for f in os.listdir(tmp):
        os.remove(os.path.join(tmp, f))
    per_stage = (t10 - t1) / ((N_STAGES - 1) * runs)
    out = {
        "per_stage_us": per_stage * 1e6,
        "per_run_fixed_us": (t1 / runs - per_stage) * 1e6,
        "t10_s": t10,
        "t1_s": t1,
    }
    # The same split of each thread's CPU time (the loop's includes the harness's gather).
    for thread, name in CPU_THREADS.items():
        cpu_stage = (cpu10[thread] - cpu1[thread]) / ((N_STAGES - 1) * runs)
        out[f"{name}_cpu_per_stage_us"] = cpu_stage * 1e6
        out[f"{name}_cpu_per_run_fixed_us"] = (cpu1[thread] / runs - cpu_stage) * 1e6
    return out


# -- L: one run alone, split by the journal ------------------------------------------------


async def single_run_latency(path: str, runs: int) -> dict[str, float]:
    """submit() duration, then created..completed from the journal, then the rest of wait()."""
    parts: dict[str, list[float]] = {"submit_us": [], "in_run_us": [], "after_us": []}
    totals = []
    async with ws.Engine.open(path, pipelines=[PIPELINE]) as engine:
        for _ in range(5):
            await engine.start(PIPELINE, RUN_INPUT)
        marks = []
        for _ in range(runs):
            t0 = time.perf_counter()
            w0 = time.time()
            run = await engine.submit(PIPELINE, RUN_INPUT)
            w1 = time.time()
            await engine.wait(run.run_id)
            w2 = time.time()
            totals.append((time.perf_counter() - t0) * 1e6)
            marks.append((run.run_id, w0, w1, w2))
    with sqlite3.connect(path) as conn:
        for rid, w0, w1, w2 in marks:
            at = dict(
                conn.execute(
                    "SELECT event, at FROM journal WHERE run_id = ? "
                    "AND event IN ('created', 'completed')",
                    (rid,),
                ).fetchall()
            )
            parts["submit_us"].append((w1 - w0) * 1e6)
            parts["in_run_us"].append((at["completed"] - at["created"]) * 1e6)
            parts["after_us"].append((w2 - at["completed"]) * 1e6)
    os.remove(path)
    return {**{k: median(v) for k, v in parts.items()}, "total_us": median(totals)}


# -- W: the writer's SQL ------------------------------------------------------------------


def writer_sql(path: str, runs: int) -> dict[str, float]:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    migrations.apply(conn, "sqlite")
    cols = [r[1] for r in conn.execute("PRAGMA table_info(runs)")]
    owner = "bench:1:x"
    now = time.time()
    base = {
        "pipeline": "p",
        "pipeline_version": "1",
        "fingerprint": "f",
        "status": "running",
        "stage_index": 0,
        "seq": 2,
        "root_run_id": None,
        "run_kind": "root",
        "depth": 0,
        "lease_owner": owner,
        "lease_expires": now + 60,
        "cancel_requested": 0,
        "created_at": now,
        "updated_at": now,
    }
    ids = [f"run-{i:06d}" for i in range(runs)]
    rows = [[{**base, "run_id": r, "root_run_id": r}.get(c) for c in cols] for r in ids]
    conn.execute("BEGIN")
    conn.executemany(
        f"INSERT INTO runs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", rows
    )
    conn.execute("COMMIT")
    insert = (
        "INSERT INTO transitions (run_id, seq, stage_index, stage_path, event, attempt, payload, "
        "error, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
    )
    update = (
        "UPDATE runs SET seq = seq + ?, updated_at = ?, stage_index = ? WHERE run_id = ? "
        "AND status IN (?) AND lease_owner = ? AND cancel_requested = 0 RETURNING seq"
    )
    update_many = (
        "UPDATE runs SET seq = seq + 2, updated_at = ?, stage_index = ? WHERE run_id = ? "
        "AND seq = ? AND status = 'running' AND lease_owner = ? AND cancel_requested = 0"
    )
    variants = ("w1_us", "w2_us", "w3_us", "w4_us", "w5_us")
    times: dict[str, list[float]] = {v: [] for v in variants}
    seq = 2
    for i in range(len(variants) * TRIALS):
        variant = variants[i % len(variants)]
        t = time.time()
        t0 = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        if variant in ("w1_us", "w2_us"):  # per advance: UPDATE ... RETURNING seq
            batch_rows = []
            for rid in ids:
                s = conn.execute(update, (2, t, i + 1, rid, "running", owner)).fetchone()[0]
                rows2 = [
                    (rid, s - 1, i, f"s{i}", "succeeded", 1, str(i), None, t),
                    (rid, s, i + 1, f"s{i + 1}", "started", 1, None, None, t),
                ]
                if variant == "w1_us":  # ... and its own executemany of 2 rows
                    conn.executemany(insert, rows2)
                else:  # ... rows collected, one executemany for the batch
                    batch_rows += rows2
            if batch_rows:
                conn.executemany(insert, batch_rows)
            seq += 2
        elif variant == "w3_us":  # the whole batch in two executemany calls
            cur = conn.executemany(update_many, [(t, i + 1, rid, seq, owner) for rid in ids])
            assert cur.rowcount == len(ids), cur.rowcount
            trs = []
            for rid in ids:
                trs.append((rid, seq + 1, i, f"s{i}", "succeeded", 1, str(i), None, t))
                trs.append((rid, seq + 2, i + 1, f"s{i + 1}", "started", 1, None, None, t))
            conn.executemany(insert, trs)
            seq += 2
        elif variant == "w5_us":  # what the store runs for a batch of stage commits now
            ops = [
                batched.Step(
                    rid,
                    owner,
                    seq,
                    i + 1,
                    [
                        NewTransition("succeeded", i, f"s{i}", 1, payload=str(i)),
                        NewTransition("started", i + 1, f"s{i + 1}", 1),
                    ],
                )
                for rid in ids
            ]
            journal: list[tuple[Any, ...]] = []
            batched.Step.apply_many(conn, ops, t, journal)
            batched.insert_rows(conn, journal)
            seq += 2
        else:  # one journal row per stage, no runs UPDATE (fencing by the journal's key)
            conn.executemany(
                insert,
                [(rid, 10_000 + i, i, f"s{i}", "succeeded", 1, str(i), None, t) for rid in ids],
            )
        conn.execute("COMMIT")
        times[variant].append((time.perf_counter() - t0) / runs * 1e6)
    conn.close()
    return {v: median(times[v]) for v in variants}


async def main_async(runs: int) -> None:
    tmp = tempfile.mkdtemp(prefix="waystation-breakdown-")
    try:
        s, e, f, w, lt = [], [], [], [], []
        for t in range(TRIALS):
            gc.collect()
            s.append(await store_alone(os.path.join(tmp, f"s{t}.db"), runs))
            try:
                e.append(await per_stage_us(tmp, runs, instant=True))
            except AttributeError as exc:
                e.append({"error": f"cannot measure with this version: {exc}"})
            f.append(await per_stage_us(tmp, runs, instant=False))
            w.append(await asyncio.to_thread(writer_sql, os.path.join(tmp, f"w{t}.db"), runs))
            lt.append(await single_run_latency(os.path.join(tmp, f"l{t}.db"), runs))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows: list[tuple[str, str, str]] = []

    def report(name: str, label: str, median_value: float, unit: str, extra: Any) -> None:
        emit(
            {
                "bench": "breakdown",
                "name": name,
                "unit": unit,
                "median": median_value,
                "runs": runs,
                "trials": extra,
            }
        )

    s_med = median(s)
    report("S_store_alone", "", s_med, "tr/s", s)
    rows.append(
        (
            "S store alone (step_run x 10, concurrent)",
            f"{s_med:,.0f} tr/s",
            f"{1e6 / s_med:.1f} us/transition",
        )
    )
    if all("error" not in x for x in e):
        e_us = median([x["per_stage_us"] for x in e])
        report("E_engine_instant_store", "", e_us, "us/stage", e)
        rows.append(
            (
                "E engine Python per stage (instant store)",
                f"{1e6 / e_us:,.0f} tr/s",
                f"{e_us:.1f} us/stage",
            )
        )
    else:
        emit({"bench": "breakdown", "name": "E_engine_instant_store", "error": e[0]["error"]})
        rows.append(("E engine Python per stage (instant store)", "NOT MEASURED", e[0]["error"]))
    f_us = median([x["per_stage_us"] for x in f])
    f_run = median([x["per_run_fixed_us"] for x in f])
    report("F_engine_real_store", "", f_us, "us/stage", f)
    rows.append(
        ("F engine per stage (real store)", f"{1e6 / f_us:,.0f} tr/s", f"{f_us:.1f} us/stage")
    )
    rows.append(
        (
            "F engine per run, fixed (submit, create, wait...)",
            "",
            f"{f_run:.0f} us/run = {f_run / N_STAGES:.1f} us/transition in 10-stage runs",
        )
    )
    for name in CPU_THREADS.values():
        per_stage = median([x[f"{name}_cpu_per_stage_us"] for x in f])
        per_run = median([x[f"{name}_cpu_per_run_fixed_us"] for x in f])
        rows.append(
            (
                f"F   {name} thread CPU: per stage / per run fixed",
                "",
                f"{per_stage:.1f} us / {per_run:.0f} us",
            )
        )
    for key, label in (
        ("w1_us", "W1 per advance: UPDATE..RETURNING + its 2 rows"),
        ("w2_us", "W2 per advance: UPDATE..RETURNING; rows in 1 executemany"),
        ("w3_us", "W3 per batch: executemany UPDATE + executemany rows"),
        ("w4_us", "W4 per batch: 1 journal row per stage, no UPDATE"),
        ("w5_us", "W5 per batch, the store now: multi-row UPDATE + folded rows"),
    ):
        v = median([x[key] for x in w])
        report(
            f"W_writer_sql_{key.removesuffix('_us')}", "", v, "us/transition", [x[key] for x in w]
        )
        rows.append((label, f"{1e6 / v:,.0f} tr/s", f"{v:.1f} us/transition"))
    lat = {k: median([x[k] for x in lt]) for k in lt[0]}
    emit({"bench": "breakdown", "name": "L_single_run_latency", "unit": "us", **lat, "trials": lt})
    rows.append(("L one run alone: submit() (create commit)", "", f"{lat['submit_us']:.0f} us"))
    rows.append(
        (
            "L   created..completed (10 stage commits)",
            "",
            f"{lat['in_run_us']:.0f} us = {lat['in_run_us'] / N_STAGES:.1f} us/stage",
        )
    )
    rows.append(("L   last commit -> wait() returned", "", f"{lat['after_us']:.0f} us"))
    rows.append(("L   whole submit + wait, per run", "", f"{lat['total_us']:.0f} us"))
    print()
    width = max(len(r[0]) for r in rows)
    for r in rows:
        print(f"{r[0]:<{width}}  {r[1]:>14}  {r[2]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=1000)
    args = parser.parse_args()
    asyncio.run(main_async(args.runs))


if __name__ == "__main__":
    main()
