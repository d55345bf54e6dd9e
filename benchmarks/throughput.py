"""Durable stage transitions: waystation vs raw aiosqlite, in one invocation (issue 6).

    .venv/bin/python benchmarks/throughput.py            # full run (~15 s; ~45 s with the peers)
    .venv/bin/python benchmarks/throughput.py --quick    # smoke test (seconds)
    .venv/bin/python benchmarks/throughput.py --peers /tmp/benchvenv/bin/python

Every measurement uses a fresh SQLite file in a temporary directory, WAL, synchronous=FULL,
and runs of 10 trivial stages whose results are each committed before the next stage starts.

  A  raw aiosqlite, one INSERT + COMMIT per stage, one run at a time   -> ms per stage
  B  raw aiosqlite group commit: one writer task drains an asyncio.Queue, runs every queued
     INSERT in one transaction, commits, then resolves each stage's future;
     many concurrent runs                                              -> transitions/s
  C  waystation, one run at a time (`engine.start`)                    -> ms per stage, C/A
  D  waystation, many concurrent runs (submit all, then wait all)      -> transitions/s, D/B

Each figure is the median of 3 trials, run in interleaved rounds (A B C D, A B C D, ...) so
that each ratio compares trials made under the same load. One JSON line is printed per
measurement, then a table with the ratios against the targets of issue 6 (C/A <= 1.5,
D/B >= 0.40). The peers (benchmarks/peers.py: DBOS, LangGraph) run under `--peers PYTHON`
(a venv with the `bench` extra), or $WAYSTATION_BENCH_PEERS_PYTHON, or this interpreter if it
has them; their figures join the table (D vs peer: >= 25x LangGraph, >= 60x DBOS). Without
them, the table says NOT MEASURED.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _common
import aiosqlite
from _common import N_STAGES, PIPELINE, RUN_INPUT, emit, fmt_num, median

import waystation as ws

TRIALS = 3
WAVES = 5
"""B and D: each trial runs this many waves of N concurrent runs back to back (a longer,
steadier measurement; at any moment N runs are in flight, never more)."""
TARGET_C_OVER_A = 1.5
TARGET_D_OVER_B = 0.40
PEER_TARGETS = {"langgraph": 25, "dbos": 60}
"""Issue 6: concurrent throughput (D) at least this many times the peer's concurrent figure."""

RAW_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS transitions (run_id TEXT NOT NULL, seq INTEGER NOT NULL, "
    "payload TEXT, at REAL NOT NULL, PRIMARY KEY (run_id, seq)) WITHOUT ROWID"
)
RAW_INSERT = "INSERT INTO transitions (run_id, seq, payload, at) VALUES (?, ?, ?, ?)"


async def trivial_stage(n: int, k: int) -> int:
    return n + k


async def raw_connect(path: str) -> aiosqlite.Connection:
    conn = await aiosqlite.connect(path)
    await conn.execute("PRAGMA journal_mode=WAL")
    await conn.execute("PRAGMA synchronous=FULL")
    await conn.execute(RAW_SCHEMA)
    await conn.commit()
    return conn


# -- A: raw aiosqlite, one INSERT + COMMIT per stage ----------------------------------------


async def bench_a(path: str, runs: int) -> dict[str, Any]:
    conn = await raw_connect(path)
    try:

        async def one_run(r: int) -> None:
            run_id = f"run-{r}"
            n = 1
            for k in range(N_STAGES):
                out = await trivial_stage(n, k)
                await conn.execute(RAW_INSERT, (run_id, k + 1, str(out), time.time()))
                await conn.commit()

        for r in range(5):  # warm-up, not timed
            await one_run(-1 - r)
        t0 = time.perf_counter()
        for r in range(runs):
            await one_run(r)
        elapsed = time.perf_counter() - t0
    finally:
        await conn.close()
    return {"elapsed_s": elapsed, "ms_per_stage": elapsed / (runs * N_STAGES) * 1e3}


# -- B: raw aiosqlite group commit ---------------------------------------------------------


async def bench_b(path: str, runs: int, waves: int = 1) -> dict[str, Any]:
    conn = await raw_connect(path)
    queue: asyncio.Queue[tuple[tuple[Any, ...], asyncio.Future[None]] | None] = asyncio.Queue()
    batches = 0

    async def writer() -> None:
        nonlocal batches
        while True:
            item = await queue.get()
            if item is None:
                return
            batch = [item]
            while not queue.empty():
                nxt = queue.get_nowait()
                if nxt is None:
                    await queue.put(None)
                    break
                batch.append(nxt)
            try:
                await conn.executemany(RAW_INSERT, [row for row, _ in batch])
                await conn.commit()
            except Exception as exc:
                for _, fut in batch:
                    fut.set_exception(exc)
                raise
            batches += 1
            for _, fut in batch:
                fut.set_result(None)

    loop = asyncio.get_running_loop()

    async def one_run(r: int) -> None:
        run_id = f"run-{r}"
        n = 1
        for k in range(N_STAGES):
            out = await trivial_stage(n, k)
            fut: asyncio.Future[None] = loop.create_future()
            queue.put_nowait(((run_id, k + 1, str(out), time.time()), fut))
            await fut

    task = asyncio.create_task(writer())
    try:
        await asyncio.gather(*(one_run(-1 - r) for r in range(50)))  # warm-up, not timed
        batches = 0
        t0 = time.perf_counter()
        for w in range(waves):
            await asyncio.gather(*(one_run(w * runs + r) for r in range(runs)))
        elapsed = time.perf_counter() - t0
    finally:
        await queue.put(None)
        await task
        await conn.close()
    tr = waves * runs * N_STAGES
    return {
        "elapsed_s": elapsed,
        "transitions_per_s": tr / elapsed,
        "commits": batches,
        "avg_batch": tr / batches if batches else None,
    }


# -- C and D: waystation -------------------------------------------------------------------


async def bench_c(path: str, runs: int) -> dict[str, Any]:
    async with ws.Engine.open(path, pipelines=[PIPELINE], durability="full") as engine:
        for _ in range(5):  # warm-up, not timed
            await engine.start(PIPELINE, RUN_INPUT)
        t0 = time.perf_counter()
        ids = []
        for _ in range(runs):
            run = await engine.start(PIPELINE, RUN_INPUT)
            if run.status != "succeeded":
                raise RuntimeError(f"run {run.run_id} ended {run.status}")
            ids.append(run.run_id)
        elapsed = time.perf_counter() - t0
        in_run = await _in_run_ms_per_stage(path, ids)
        stats = dict(engine.store.stats) if isinstance(engine.store, ws.SQLiteStore) else {}
    return {
        "elapsed_s": elapsed,
        "ms_per_stage": elapsed / (runs * N_STAGES) * 1e3,
        "ms_per_run": elapsed / runs * 1e3,
        "in_run_ms_per_stage": in_run,
        "store_stats": stats,
    }


async def _in_run_ms_per_stage(path: str, run_ids: list[str]) -> float | None:
    """From the journal: (commit time of `completed` - of `created`) / stages, median over runs.

    This leaves out what `start` does before the first commit and after the last one (the
    create, the final read in `wait`); it is what a stage costs inside a running run.
    """
    async with aiosqlite.connect(path) as conn:
        spans = []
        for rid in run_ids:
            async with conn.execute(
                "SELECT event, at FROM journal WHERE run_id = ? "
                "AND event IN ('created', 'completed')",
                (rid,),
            ) as cur:
                at = {e: a for e, a in await cur.fetchall()}
            if "created" in at and "completed" in at:
                spans.append((at["completed"] - at["created"]) / N_STAGES * 1e3)
    return median(spans) if spans else None


async def bench_d(path: str, runs: int, waves: int = 1) -> dict[str, Any]:
    async with ws.Engine.open(
        path, pipelines=[PIPELINE], durability="full", max_concurrent_runs=max(runs, 1000)
    ) as engine:
        warm = await asyncio.gather(*(engine.submit(PIPELINE, RUN_INPUT) for _ in range(50)))
        await asyncio.gather(*(engine.wait(r.run_id) for r in warm))
        store = engine.store
        before = dict(store.stats) if isinstance(store, ws.SQLiteStore) else {}
        done: list[ws.Run] = []
        t0 = time.perf_counter()
        for _ in range(waves):
            submitted = await asyncio.gather(
                *(engine.submit(PIPELINE, RUN_INPUT) for _ in range(runs))
            )
            done += await asyncio.gather(*(engine.wait(r.run_id) for r in submitted))
        elapsed = time.perf_counter() - t0
        after = dict(store.stats) if isinstance(store, ws.SQLiteStore) else {}
    bad = [r for r in done if r.status != "succeeded"]
    if bad:
        raise RuntimeError(f"{len(bad)} runs did not succeed, e.g. {bad[0].status}")
    tr = waves * runs * N_STAGES
    commits = after.get("batches", 0) - before.get("batches", 0)
    writes = after.get("writes", 0) - before.get("writes", 0)
    return {
        "elapsed_s": elapsed,
        "transitions_per_s": tr / elapsed,
        "commits": commits,
        "writes": writes,
        "avg_batch": writes / commits if commits else None,
    }


# -- driver --------------------------------------------------------------------------------


def _remove_db(path: str) -> None:
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)


@dataclass(frozen=True)
class Bench:
    name: str
    metric: str
    unit: str
    fn: Callable[..., Awaitable[dict[str, Any]]]
    runs: int
    waves: int = 1


async def interleaved(
    benches: list[Bench], tmp: str, trials: int = TRIALS
) -> dict[str, dict[str, Any]]:
    """`trials` rounds of A, B, C, D in turn, so that each ratio compares trials that ran under
    the same machine load (the machine is shared); then the median of each."""
    results: dict[str, list[dict[str, Any]]] = {b.name: [] for b in benches}
    for t in range(trials):
        for b in benches:
            path = os.path.join(tmp, f"{b.name}-{t}.db")
            gc.collect()
            kwargs = {"waves": b.waves} if b.waves > 1 else {}
            results[b.name].append(await b.fn(path, b.runs, **kwargs))
            _remove_db(path)
    out = {}
    for b in benches:
        values = [r[b.metric] for r in results[b.name]]
        out[b.name] = emit(
            {
                "bench": "throughput",
                "name": b.name,
                "metric": b.metric,
                "unit": b.unit,
                "median": median(values),
                "trials": values,
                "params": {
                    "journal_mode": "WAL",
                    "synchronous": "FULL",
                    "runs": b.runs,
                    "waves": b.waves,
                    "stages_per_run": N_STAGES,
                },
                "details": results[b.name],
            }
        )
    return out


def run_peers(python: str, quick: bool) -> list[dict[str, Any]]:
    script = Path(__file__).with_name("peers.py")
    cmd = [python, str(script), *(["--quick"] if quick else [])]
    print(f"# running peers: {' '.join(cmd)}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    sys.stderr.write(proc.stderr[-4000:])
    out = []
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            print(line, flush=True)
            out.append(rec)
    if proc.returncode != 0:
        out.append(
            emit(
                {
                    "bench": "peers",
                    "name": "peers.py",
                    "error": f"exit status {proc.returncode}",
                }
            )
        )
    return out


def table(
    a: dict[str, Any],
    b: dict[str, Any],
    c: dict[str, Any],
    d: dict[str, Any],
    peers: list[dict[str, Any]],
) -> str:
    ca = c["median"] / a["median"]
    db = d["median"] / b["median"]
    in_run = median([x["in_run_ms_per_stage"] for x in c["details"]])
    rows = [
        ("A raw aiosqlite, INSERT+COMMIT per stage, 1 run", fmt_num(a["median"], "ms"), ""),
        (
            f"B raw group commit, {b['params']['runs']} concurrent runs"
            f" x {b['params']['waves']} waves",
            fmt_num(b["median"], "tr/s"),
            "",
        ),
        (
            "C waystation, 1 run alone (start..settled)",
            fmt_num(c["median"], "ms"),
            f"C/A = {ca:.2f}x (target <= {TARGET_C_OVER_A}x): "
            + ("MET" if ca <= TARGET_C_OVER_A else f"MISSED by {ca / TARGET_C_OVER_A:.2f}x"),
        ),
        (
            "  C' same, inside the run (journal: created..completed)",
            fmt_num(in_run, "ms"),
            f"C'/A = {in_run / a['median']:.2f}x (info)",
        ),
        (
            f"D waystation, {d['params']['runs']} concurrent runs x {d['params']['waves']} waves",
            fmt_num(d["median"], "tr/s"),
            f"D/B = {db:.0%} (target >= {TARGET_D_OVER_B:.0%}): "
            + ("MET" if db >= TARGET_D_OVER_B else f"MISSED by {TARGET_D_OVER_B / db:.2f}x"),
        ),
    ]
    for p in peers:
        label = f"{p.get('name', '?')}"
        if "error" in p and p.get("median") is None:
            rows.append((label, "NOT MEASURED", str(p["error"])[:90]))
            continue
        note = f"{1e3 / p['median']:.3f} ms/stage"
        target = PEER_TARGETS.get(p.get("peer", ""))
        if p.get("mode") == "concurrent" and target:
            x = d["median"] / p["median"]
            note = f"D/this = {x:.1f}x (target >= {target}x): " + (
                "MET" if x >= target else f"MISSED by {target / x:.2f}x"
            )
        rows.append((f"{label}, {p.get('runs')} runs", fmt_num(p["median"], "tr/s"), note))
    width = max(len(r[0]) for r in rows)
    n = len(a["trials"])
    lines = [f"{'measurement':<{width}}  {f'median of {n}':>16}  ratio / target"]
    lines.append("-" * (width + 40))
    lines += [f"{r[0]:<{width}}  {r[1]:>16}  {r[2]}" for r in rows]
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> None:
    quick = args.quick
    waves = 1 if quick else WAVES
    peers_python = None
    if not args.no_peers:
        peers_python = args.peers or os.environ.get("WAYSTATION_BENCH_PEERS_PYTHON")
        if peers_python is None and all(
            importlib.util.find_spec(m) is not None for m in ("dbos", "langgraph")
        ):
            peers_python = sys.executable
    n_single = 20 if quick else 1000
    n_concurrent = 100 if quick else 1000
    tmp = tempfile.mkdtemp(prefix="waystation-bench-", dir=args.dir)
    info = {**_common.machine(), "fs": _common.fs_of(tmp), "quick": quick}
    emit({"bench": "throughput", "name": "machine", **info})
    benches = [
        Bench("A_raw_commit_per_stage", "ms_per_stage", "ms", bench_a, n_single),
        Bench("B_raw_group_commit", "transitions_per_s", "tr/s", bench_b, n_concurrent, waves),
        Bench("C_waystation_single_run", "ms_per_stage", "ms", bench_c, n_single),
        Bench("D_waystation_concurrent", "transitions_per_s", "tr/s", bench_d, n_concurrent, waves),
    ]
    t_start = time.perf_counter()
    try:
        res = await interleaved(benches, tmp, args.trials)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    a, b, c, d = (res[x.name] for x in benches)
    ratios = {
        "C_over_A": c["median"] / a["median"],
        "C_over_A_target": TARGET_C_OVER_A,
        "C_over_A_met": c["median"] / a["median"] <= TARGET_C_OVER_A,
        "D_over_B": d["median"] / b["median"],
        "D_over_B_target": TARGET_D_OVER_B,
        "D_over_B_met": d["median"] / b["median"] >= TARGET_D_OVER_B,
    }
    peers = run_peers(peers_python, quick) if peers_python else []
    if not peers_python and not args.no_peers:
        peers = [
            emit(
                {
                    "bench": "peers",
                    "name": "dbos, langgraph",
                    "median": None,
                    "error": "not installed here; pass --peers PYTHON (a venv with .[bench])",
                }
            )
        ]
    for p in peers:
        if p.get("mode") == "concurrent" and p.get("median"):
            ratios[f"D_over_{p['name']}"] = d["median"] / p["median"]
    emit({"bench": "throughput", "name": "ratios", **ratios})
    print()
    print(f"# {info['date']}  python {info['python']}  sqlite {info['sqlite']}  ", end="")
    print(f"{info['cpus']} cpus  fs {info['fs']}  {time.perf_counter() - t_start:.0f} s")
    print(table(a, b, c, d, peers))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small numbers, for a smoke test")
    parser.add_argument("--dir", default=None, help="where to put the temporary databases")
    parser.add_argument(
        "--peers",
        metavar="PYTHON",
        default=None,
        help="run benchmarks/peers.py under this interpreter (a venv with the bench extra); "
        "default: $WAYSTATION_BENCH_PEERS_PYTHON, else this interpreter if it has the peers",
    )
    parser.add_argument("--no-peers", action="store_true", help="skip DBOS and LangGraph")
    parser.add_argument("--trials", type=int, default=TRIALS, help="rounds (default 3)")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
