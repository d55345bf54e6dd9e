"""Live events under load: what subscribers cost the runs, and how many rows they read.

    .venv/bin/python benchmarks/events_load.py            # 3,000 runs x 10 stages, 3 trials
    .venv/bin/python benchmarks/events_load.py --quick    # 300 runs, 1 trial

Per trial, on a fresh file: 3,000 runs of the 10-stage pipeline submitted at once and
waited for (30,000 durable stage transitions, plus each run's create and end), with 0, 1
and 4 subscribers following every run (`engine.subscribe()`, the default 50 ms poll) in the
same process, as a service streaming its runs to a dashboard would. Printed for each:

- the load's wall time, from the first submit until every run is finished;
- how long after the load the last stream had delivered every transition;
- the stored journal rows the subscribers' store reads returned, per transition they
  delivered (a stream that reads each stored row once reads about 0.5: a stage commit is
  one stored row holding two transitions).

Rows read are counted on the store's reader (`SQLiteStore._read`), which the subscribers
use and the runs, while they run, do not (their writes go to the writer thread).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

import _common
from _common import PIPELINE, RUN_INPUT, emit, median

import waystation as ws


class CountingStore(ws.SQLiteStore):
    """Counts the rows every read returns."""

    rows_read = 0

    async def _read(self, sql: str, params: Any = ()) -> list[Any]:
        rows = await super()._read(sql, params)
        self.rows_read += len(rows)
        return rows


async def trial(path: Path, runs: int, subscribers: int) -> dict[str, Any]:
    store = CountingStore(path)
    async with ws.Engine.open(store, pipelines=[PIPELINE]) as engine:
        delivered = [0] * subscribers
        target = [0]  # set once the load is over: every transition in the journal
        caught_up = [asyncio.Event() for _ in range(subscribers)]

        async def follow(k: int) -> None:
            async with contextlib.aclosing(engine.subscribe()) as events:
                async for _ in events:
                    delivered[k] += 1
                    if delivered[k] == target[0]:
                        caught_up[k].set()

        tasks = [asyncio.create_task(follow(k)) for k in range(subscribers)]
        await asyncio.sleep(0.1)  # every stream has begun (its first poll)
        store.rows_read = 0
        t0 = time.perf_counter()
        runs_ = await asyncio.gather(*(engine.submit(PIPELINE, RUN_INPUT) for _ in range(runs)))
        await asyncio.gather(*(engine.wait(r.run_id) for r in runs_))
        wall = time.perf_counter() - t0
        with contextlib.closing(sqlite3.connect(path)) as conn:
            expected = conn.execute("SELECT COUNT(*) FROM journal").fetchone()[0]
        target[0] = expected
        for k, d in enumerate(delivered):
            if d >= expected:
                caught_up[k].set()
        # Until every stream has delivered every transition (or 60 s went by).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in caught_up)), 60)
        behind = time.perf_counter() - t0 - wall
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        read = store.rows_read
    return {
        "subscribers": subscribers,
        "runs": runs,
        "load_s": round(wall, 3),
        "streams_done_s": round(behind, 3) if subscribers else None,
        "transitions": expected,
        "delivered": sum(delivered),
        "complete": all(d == expected for d in delivered),
        "rows_read": read,
        "read_per_delivered": round(read / sum(delivered), 2) if subscribers else None,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    runs, trials = (300, 1) if args.quick else (3000, 3)
    emit({"machine": _common.machine()})
    results: dict[int, list[dict[str, Any]]] = {0: [], 1: [], 4: []}
    for _ in range(trials):
        for subscribers in results:  # interleaved, so each count sees the same machine
            with tempfile.TemporaryDirectory() as tmp:
                results[subscribers].append(
                    emit(await trial(Path(tmp) / "bench.db", runs, subscribers))
                )
    print()
    head = ("subscribers", "load (median)", "streams done after", "read/delivered")
    print(f"{head[0]:>11} | {head[1]:>13} | {head[2]:>18} | {head[3]:>14} | complete")
    for subscribers, rs in results.items():
        load = median([r["load_s"] for r in rs])
        if not subscribers:
            print(f"{subscribers:>11} | {load:>11.3f} s | {'-':>18} | {'-':>14} | -")
            continue
        done = median([r["streams_done_s"] for r in rs])
        ratio = median([r["read_per_delivered"] for r in rs])
        complete = all(r["complete"] for r in rs)
        figures = f"{load:>11.3f} s | {done:>16.3f} s | {ratio:>14.2f}"
        print(f"{subscribers:>11} | {figures} | {complete}")


if __name__ == "__main__":
    asyncio.run(main())
