"""Where the time of one run alone goes (throughput.py's C), commit by commit.

    .venv/bin/python benchmarks/timeline.py [--runs 300] [--dir PATH]

C is `engine.start` of a 10-stage run, one run at a time, durability full. This wraps three
points of the SQLite store (a write handed to the writer thread, the writer's transaction
from BEGIN to COMMIT, the result arriving in the event loop) with timestamps and prints,
per segment of a run, the median over the runs: how long a write waits for the writer
thread, how long its transaction takes, how long the result takes to reach the loop, and
how long the loop takes from there to the next write (the stage itself, its output check
and the next write's building). The first and last segments are the run's own: `start`
until the `Create` write, and the last result until `start` returns.

The wrapping costs about a microsecond per point; the run is measured alone, so nothing
else competes for the loop. It reads private names of the store (`_Writer`, `_settle`,
`_settle_results`): a diagnostic, kept beside the benchmarks so that the figures in
README.md can be re-made.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import tempfile
import time
from collections import defaultdict
from typing import Any

from _common import PIPELINE, RUN_INPUT, emit

import waystation as ws
from waystation.store import sqlite as store_sqlite

Event = tuple[str, float]


def instrument(events: list[Event]) -> None:
    """Timestamp the store's hand-offs into `events` (for this process only)."""
    clock = time.perf_counter
    writer = store_sqlite._Writer
    submit, commit = writer.submit, writer._commit
    settle, settle_results = store_sqlite._settle, store_sqlite._settle_results

    def timed_submit(self: Any, op: Any) -> Any:
        events.append((f"write {type(op).__name__}", clock()))
        return submit(self, op)

    def timed_commit(self: Any, batch: Any) -> None:
        events.append(("transaction begins", clock()))
        commit(self, batch)
        events.append(("transaction committed", clock()))

    def timed_settle(items: Any) -> None:
        events.append(("result in the loop", clock()))
        settle(items)

    def timed_settle_results(batch: Any, results: Any) -> None:  # a committed batch's way
        events.append(("result in the loop", clock()))
        settle_results(batch, results)

    writer.submit = timed_submit  # type: ignore[method-assign]
    writer._commit = timed_commit  # type: ignore[method-assign]
    store_sqlite._settle = timed_settle
    store_sqlite._settle_results = timed_settle_results


async def measure(path: str, runs: int) -> list[list[Event]]:
    events: list[Event] = []
    instrument(events)
    timelines = []
    async with ws.Engine.open(path, pipelines=[PIPELINE], durability="full") as engine:
        for _ in range(5):  # warm-up, not kept
            await engine.start(PIPELINE, RUN_INPUT)
        for _ in range(runs):
            events.clear()
            events.append(("start called", time.perf_counter()))
            run = await engine.start(PIPELINE, RUN_INPUT)
            events.append(("start returned", time.perf_counter()))
            if run.status != "succeeded":
                raise RuntimeError(f"run {run.run_id} ended {run.status}")
            timelines.append(list(events))
    return timelines


def segment_kind(before: str, after: str) -> str:
    if before == "start called":
        return "start -> Create write"
    if after == "start returned":
        return "last result -> start returns"
    if after == "transaction begins":
        return "write -> its transaction begins (writer thread wakes)"
    if after == "transaction committed":
        return "transaction (BEGIN .. COMMIT, fsync)"
    if after == "result in the loop":
        return "commit -> result in the event loop"
    if before == "result in the loop" and after == "write Step":
        return "result -> next write (stage, output check, write built)"
    return f"{before} -> {after}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--dir", default=None, help="where to put the database")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="waystation-timeline-", dir=args.dir)
    timelines = asyncio.run(measure(os.path.join(tmp, "c.db"), args.runs))
    per_kind: dict[str, list[float]] = defaultdict(list)  # per run: that kind's total
    totals = []
    for events in timelines:
        spent: dict[str, float] = defaultdict(float)
        for (before, t0), (after, t1) in itertools.pairwise(events):
            spent[segment_kind(before, after)] += t1 - t0
        for kind, seconds in spent.items():
            per_kind[kind].append(seconds)
        totals.append(events[-1][1] - events[0][1])
    run_us = statistics.median(totals) * 1e6
    print()
    print(f"one run alone, {len(timelines)} runs: median {run_us:.0f} us per run")
    for kind, values in sorted(per_kind.items(), key=lambda kv: -statistics.median(kv[1])):
        us = statistics.median(values) * 1e6
        emit({"bench": "timeline", "segment": kind, "median_us_per_run": us})
        print(f"  {kind:<58} {us:8.1f} us per run ({us / run_us:5.1%})")


if __name__ == "__main__":
    main()
