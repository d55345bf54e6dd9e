"""Recovery after SIGKILL: how soon interrupted runs are running again, and finished (issue 6).

    .venv/bin/python benchmarks/recovery.py            # 200 runs, 3 trials
    .venv/bin/python benchmarks/recovery.py --quick    # 20 runs, 1 trial

Per trial: a child process opens an engine on a fresh file and submits 200 runs of a 10-stage
pipeline whose 4th stage (`s3`) blocks in the child. Once all 200 runs are inside `s3` (their
`started` rows committed, their leases held), the parent kills the child with SIGKILL and
reaps it. Then the parent opens an engine on the same file and measures, against the
`Engine.open` call returning:

- all running again: the commit time of the last of the 200 journal `recovered` rows
  (the journal's `at`, taken by the writer just before that commit);
- all finished: the commit time of the last `completed` row, and when `engine.wait` returned
  for all 200.

Target: all 200 running again within 100 ms of `Engine.open` returning (no polling floor).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from typing import Any

import _common
from _common import N_STAGES, RUN_INPUT, emit, median

import waystation as ws

TARGET_MS = 100.0
BLOCK_AT = 3
_blocking = os.environ.get("WAYSTATION_BENCH_BLOCK") == "1"
_target = int(os.environ.get("WAYSTATION_BENCH_RUNS", "0"))
_inside = 0


def _make_stage(k: int) -> ws.Stage:
    async def fn(n: int) -> int:
        global _inside
        if k == BLOCK_AT and _blocking:
            _inside += 1
            if _inside == _target:
                print("READY", flush=True)
            await asyncio.sleep(3600)
        return n + k

    fn.__name__ = fn.__qualname__ = f"s{k}"
    return ws.Stage(fn, name=f"s{k}")


PIPELINE = ws.Pipeline("bench_recovery", [_make_stage(k) for k in range(N_STAGES)], version="1")


async def child(db: str, runs: int) -> None:
    engine = await ws.Engine.open(db, pipelines=[PIPELINE])
    await asyncio.gather(*(engine.submit(PIPELINE, RUN_INPUT) for _ in range(runs)))
    await asyncio.sleep(3600)  # killed before this ends


def crash(db: str, runs: int) -> dict[str, Any]:
    env = {**os.environ, "WAYSTATION_BENCH_BLOCK": "1", "WAYSTATION_BENCH_RUNS": str(runs)}
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", db, str(runs)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "READY":
        proc.kill()
        _, err = proc.communicate()
        raise RuntimeError(f"child did not get ready: {line!r} {err[-2000:]}")
    proc.send_signal(signal.SIGKILL)
    proc.wait()  # reaped: its pid no longer exists, so its leases are seen as abandoned
    with sqlite3.connect(db) as conn:
        states = dict(
            conn.execute("SELECT status || ':' || stage_index, count(*) FROM runs GROUP BY 1")
        )
    return {"child_pid": proc.pid, "returncode": proc.returncode, "states_after_kill": states}


async def recover(db: str, runs: int) -> dict[str, Any]:
    call_wall = time.time()
    t0 = time.perf_counter()
    engine = await ws.Engine.open(db, pipelines=[PIPELINE])
    t1 = time.perf_counter()
    open_wall = time.time()
    try:
        ids = [r.run_id for r in await engine.list(limit=runs + 10)]
        done = await asyncio.gather(*(engine.wait(rid, timeout=60) for rid in ids))
        t2 = time.perf_counter()
    finally:
        await engine.close()
    bad = [r for r in done if r.status != "succeeded"]
    if bad or len(done) != runs:
        raise RuntimeError(f"{len(bad)} of {len(done)} runs did not succeed after recovery")
    with sqlite3.connect(db) as conn:
        recovered = [r[0] for r in conn.execute("SELECT at FROM journal WHERE event = 'recovered'")]
        completed = [r[0] for r in conn.execute("SELECT at FROM journal WHERE event = 'completed'")]
    if len(recovered) != runs:
        raise RuntimeError(f"{len(recovered)} recovered rows for {runs} runs")
    return {
        "open_ms": (t1 - t0) * 1e3,
        "first_recovered_ms": (min(recovered) - open_wall) * 1e3,
        "all_running_ms": (max(recovered) - open_wall) * 1e3,
        "all_running_from_open_call_ms": (max(recovered) - call_wall) * 1e3,
        "all_completed_ms": (max(completed) - open_wall) * 1e3,
        "all_waited_ms": (t2 - t1) * 1e3,
    }


def trial(tmp: str, runs: int, t: int) -> dict[str, Any]:
    db = os.path.join(tmp, f"recovery-{t}.db")
    info = crash(db, runs)
    result = asyncio.run(recover(db, runs))
    return {**result, **info}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--trials", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="20 runs, 1 trial")
    parser.add_argument("--dir", default=None, help="where to put the temporary databases")
    parser.add_argument("--child", nargs=2, metavar=("DB", "RUNS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        asyncio.run(child(args.child[0], int(args.child[1])))
        return
    runs = args.runs or (20 if args.quick else 200)
    trials = args.trials or (1 if args.quick else 3)
    tmp = tempfile.mkdtemp(prefix="waystation-recovery-", dir=args.dir)
    emit({"bench": "recovery", "name": "machine", **_common.machine(), "fs": _common.fs_of(tmp)})
    try:
        results = [trial(tmp, runs, t) for t in range(trials)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    keys = [
        "open_ms",
        "first_recovered_ms",
        "all_running_ms",
        "all_running_from_open_call_ms",
        "all_completed_ms",
        "all_waited_ms",
    ]
    med = {k: median([r[k] for r in results]) for k in keys}
    emit(
        {
            "bench": "recovery",
            "name": f"recovery_{runs}",
            "metric": "all_running_ms",
            "unit": "ms",
            "median": med["all_running_ms"],
            "medians": med,
            "trials": [r["all_running_ms"] for r in results],
            "runs": runs,
            "details": results,
        }
    )
    ok = "MET" if med["all_running_ms"] <= TARGET_MS else "MISSED"
    print()
    print(f"{runs} runs killed mid-stage (SIGKILL), median of {trials}:")
    print(f"  Engine.open took                         {med['open_ms']:8.1f} ms")
    print(
        f"  all running again (last `recovered` row) {med['all_running_ms']:8.1f} ms after "
        f"open returned  (target <= {TARGET_MS:g} ms: {ok})"
    )
    print(f"  all finished (last `completed` row)      {med['all_completed_ms']:8.1f} ms")
    print(f"  engine.wait returned for all             {med['all_waited_ms']:8.1f} ms")


if __name__ == "__main__":
    main()
