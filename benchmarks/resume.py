"""Resume latency in a fresh process, with many paused runs in the database (issue 6).

    .venv/bin/python benchmarks/resume.py                  # 10,000 and 1,000,000 paused runs
    .venv/bin/python benchmarks/resume.py --sizes 10000 100000
    .venv/bin/python benchmarks/resume.py --quick          # 1,000 and 10,000

The pipeline is `prepare -> approval (gate) -> finish`. For each size, a fresh database gets
one run paused at the gate by the engine itself; its `runs` row and its journal rows are the
template for the other paused runs, which are inserted directly with sqlite3 `executemany`
(same schema, same columns, same JSON; only run ids, also where the JSON names the run, and
times differ). Run ids are UUIDv7 like
the engine's, older than the template's, inserted in id order.

Then, per sample, a new Python process: imports waystation, `Engine.open` (migrations check,
recovery scan), `engine.resume(run_id, answer)`, which returns once the next stage (`finish`)
is committed and the run has succeeded. Timed inside the child with perf_counter:
open, resume, and open+resume (the target: < 20 ms, not growing with the number of paused
runs). The process's wall time (interpreter start + imports + all that + close) is reported
too. Samples resume different runs: the newest, the oldest and ones in between. The database
file is in the OS page cache (it was just written), as on a server that has been running.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

t_child_start = time.perf_counter()

import _common  # noqa: E402
from _common import APPROVAL, emit, median  # noqa: E402

import waystation as ws  # noqa: E402

TARGET_MS = 20.0
ANSWER = {"approved": True, "by": "bench"}


# -- building the database ----------------------------------------------------------------


async def make_template(db: str) -> str:
    async with ws.Engine.open(db, pipelines=[APPROVAL]) as engine:
        run = await engine.start(APPROVAL, {"n": 21})
        if run.status != "paused":
            raise RuntimeError(f"template run is {run.status}, not paused")
        return run.run_id


def _uuid7(ms: int, counter: int, rand: random.Random) -> str:
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= (counter & 0xFFF) << 64
    value |= 0b10 << 62
    value |= rand.getrandbits(62)
    return str(uuid.UUID(int=value))


def fill(db: str, template_id: str, extra: int, chunk: int = 50_000) -> dict[str, Any]:
    """Add `extra` paused runs, copies of the template's rows under new ids, older ones."""
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=DELETE")  # bulk load without a huge WAL; WAL again after
    conn.execute("PRAGMA synchronous=OFF")
    cols = [r[1] for r in conn.execute("PRAGMA table_info(runs)")]
    tcols = [r[1] for r in conn.execute("PRAGMA table_info(transitions)")]
    run_row = conn.execute(
        f"SELECT {', '.join(cols)} FROM runs WHERE run_id = ?", (template_id,)
    ).fetchone()
    trows = conn.execute(
        f"SELECT {', '.join(tcols)} FROM transitions WHERE run_id = ? ORDER BY seq",
        (template_id,),
    ).fetchall()
    (template_input,) = conn.execute(
        "SELECT input FROM run_inputs WHERE run_id = ?", (template_id,)
    ).fetchone()
    template = dict(zip(cols, run_row, strict=True))
    assert template["status"] == "paused" and template["root_run_id"] == template_id
    i_created, i_updated = cols.index("created_at"), cols.index("updated_at")
    i_at = tcols.index("at")
    # Every text column that holds the template's id (run_id, root_run_id, and JSON such as
    # the pause, which names its run) gets the new run's id.
    run_subst = [i for i, v in enumerate(run_row) if isinstance(v, str) and template_id in v]
    tr_subst = [
        [i for i, v in enumerate(tr) if isinstance(v, str) and template_id in v] for tr in trows
    ]
    insert_run = f"INSERT INTO runs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
    insert_tr = (
        f"INSERT INTO transitions ({', '.join(tcols)}) VALUES ({', '.join('?' * len(tcols))})"
    )
    insert_input = "INSERT INTO run_inputs (run_id, input) VALUES (?, ?)"
    rand = random.Random(6)
    now_ms = int(template["created_at"] * 1000)
    base_ms = now_ms - (extra // 1000 + 2) * 1000  # ~1000 runs per second of history
    t0 = time.perf_counter()
    ids_sample: list[str] = []
    for start in range(0, extra, chunk):
        runs, transitions, inputs = [], [], []
        for i in range(start, min(start + chunk, extra)):
            ms = base_ms + i
            rid = _uuid7(ms, 0, rand)
            ts = ms / 1000
            row = list(run_row)
            for k in run_subst:
                row[k] = row[k].replace(template_id, rid)
            row[i_created] = row[i_updated] = ts
            runs.append(row)
            inputs.append((rid, template_input))
            for tr, subst in zip(trows, tr_subst, strict=True):
                t = list(tr)
                for k in subst:
                    t[k] = t[k].replace(template_id, rid)
                t[i_at] = ts
                transitions.append(t)
            if i in (0, extra // 3, extra // 2, (2 * extra) // 3, extra - 1):
                ids_sample.append(rid)
        conn.execute("BEGIN")
        conn.executemany(insert_run, runs)
        conn.executemany(insert_tr, transitions)
        conn.executemany(insert_input, inputs)
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - t0
    # No ANALYZE: the engine never runs it, so the query planner sees what it would see.
    conn.execute("PRAGMA journal_mode=WAL")
    n_paused = conn.execute("SELECT count(*) FROM runs WHERE status = 'paused'").fetchone()[0]
    conn.close()
    return {
        "insert_s": elapsed,
        "paused_runs": n_paused,
        "transition_rows_per_run": len(trows),
        "sample_ids": ids_sample,
        "file_mb": os.path.getsize(db) / 1e6,
    }


# -- the child: one resume in a fresh process -----------------------------------------------


async def child(db: str, run_id: str) -> dict[str, Any]:
    t_imported = time.perf_counter()
    t0 = time.perf_counter()
    engine = await ws.Engine.open(db, pipelines=[APPROVAL])
    t1 = time.perf_counter()
    run = await engine.resume(run_id, ANSWER)
    t2 = time.perf_counter()
    await engine.close()
    t3 = time.perf_counter()
    if run.status != "succeeded" or run.output != "done 42":
        raise RuntimeError(f"resumed run is {run.status} ({run.output!r})")
    return {
        "import_ms": (t_imported - t_child_start) * 1e3,
        "open_ms": (t1 - t0) * 1e3,
        "resume_ms": (t2 - t1) * 1e3,
        "open_resume_ms": (t2 - t0) * 1e3,
        "close_ms": (t3 - t2) * 1e3,
    }


def one_sample(db: str, run_id: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--child", db, run_id],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    wall = (time.perf_counter() - t0) * 1e3
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result: dict[str, Any] = json.loads(line[len("RESULT ") :])
            result["process_wall_ms"] = wall
            return result
    raise RuntimeError(f"child failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")


def bench_size(tmp: str, size: int, samples: int) -> dict[str, Any]:
    db = os.path.join(tmp, f"resume-{size}.db")
    template_id = asyncio.run(make_template(db))
    filled = fill(db, template_id, size - 1)
    ids = [template_id, *filled.pop("sample_ids")]
    rand = random.Random(size)
    while len(ids) < samples:
        ids.append(ids[1 + rand.randrange(len(ids) - 1)])
    ids = list(dict.fromkeys(ids))  # each run resumes once
    one_sample(db, ids.pop())  # warm-up: the first process after the bulk load, not counted
    results = [one_sample(db, rid) for rid in ids[:samples]]
    keys = ["open_resume_ms", "open_ms", "resume_ms", "close_ms", "import_ms", "process_wall_ms"]
    summary = {k: median([r[k] for r in results]) for k in keys}
    with sqlite3.connect(db) as conn:
        paused_left = conn.execute("SELECT count(*) FROM runs WHERE status = 'paused'").fetchone()
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(db + suffix):
            os.remove(db + suffix)
    return emit(
        {
            "bench": "resume",
            "name": f"resume_{size}",
            "paused_runs": filled["paused_runs"],
            "metric": "open_resume_ms",
            "unit": "ms",
            "median": summary["open_resume_ms"],
            "medians": summary,
            "samples": [r["open_resume_ms"] for r in results],
            "paused_left_after": paused_left[0] if paused_left else None,
            "build": filled,
            "details": results,
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    parser.add_argument("--samples", type=int, default=5, help="resumes (processes) per size")
    parser.add_argument("--quick", action="store_true", help="1,000 and 10,000 paused runs")
    parser.add_argument("--dir", default=None, help="where to put the temporary databases")
    parser.add_argument("--child", nargs=2, metavar=("DB", "RUN_ID"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = asyncio.run(child(*args.child))
        print("RESULT " + json.dumps(result), flush=True)
        return
    sizes = args.sizes or ([1_000, 10_000] if args.quick else [10_000, 1_000_000])
    tmp = tempfile.mkdtemp(prefix="waystation-resume-", dir=args.dir)
    emit({"bench": "resume", "name": "machine", **_common.machine(), "fs": _common.fs_of(tmp)})
    try:
        res = [bench_size(tmp, size, args.samples) for size in sizes]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(
        f"{'paused runs':>12}  {'open+resume':>12}  {'open':>8}  {'resume':>8}  "
        f"{'process wall':>12}  {'build':>8}  target < {TARGET_MS:g} ms"
    )
    for r in res:
        m = r["medians"]
        ok = "MET" if m["open_resume_ms"] < TARGET_MS else "MISSED"
        print(
            f"{r['paused_runs']:>12,}  {m['open_resume_ms']:>9.2f} ms  {m['open_ms']:>5.2f} ms  "
            f"{m['resume_ms']:>5.2f} ms  {m['process_wall_ms']:>9.1f} ms  "
            f"{r['build']['insert_s']:>6.1f} s  {ok}"
        )
    if len(res) > 1:
        growth = res[-1]["median"] / res[0]["median"]
        emit(
            {
                "bench": "resume",
                "name": "growth",
                "from": res[0]["paused_runs"],
                "to": res[-1]["paused_runs"],
                "ratio": growth,
            }
        )
        print(
            f"open+resume at {res[-1]['paused_runs']:,} / at {res[0]['paused_runs']:,} paused "
            f"runs = {growth:.2f}x (target: not growing)"
        )


if __name__ == "__main__":
    main()
