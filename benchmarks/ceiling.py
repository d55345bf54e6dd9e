"""The event loop's ceiling: throughput.py's D when the store's writes cost (almost) nothing.

    .venv/bin/python benchmarks/ceiling.py              # ~1 min
    .venv/bin/python benchmarks/ceiling.py --quick      # ~10 s

D/B >= 40% asks the engine to reach 40% of B, the raw group commit. D's time is the event
loop's work (the engine's Python, asyncio's, the harness's) plus the writer thread's, and
under the GIL the two mostly take turns. This script asks what D would reach if the writer
took nothing from the loop:

- Z0: D with the writer's transaction replaced by working out each write's result (no SQL,
  no fsync). The writer thread still takes each batch and wakes the loop, as it does now,
  so what is left is the loop's own work: its ceiling.
- Z<k>: the same plus a pause of k us per write that holds no GIL (`time.sleep`): a writer
  whose SQL ran beside the loop instead of in turn with it, as one in a process of its own
  would. `batch_cost.py` measures the store's SQL at ~4.5 us of CPU per stage commit.
- D: the real engine; B: the raw group commit (both as in throughput.py).

Rounds are interleaved (B, D, Z...), median of 3, each on a fresh file. Z patches a private
method of the store (`_Writer._commit`); if that changes, this script says so.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import throughput
from _common import N_STAGES, emit, machine, median

from waystation.store import batch as batched
from waystation.store import sqlite as store_sqlite

TRIALS = 3


def _free_commit(pause_us: float) -> Callable[[Any, list[Any]], None]:
    """A `_Writer._commit` that writes nothing: each write's result as the batch would give
    it, then a GIL-free pause of `pause_us` per write."""
    pause = pause_us / 1e6

    def commit(self: Any, batch: list[Any]) -> None:
        now = time.time()
        results: list[Any] = []
        for op, _ in batch:
            kind = type(op)
            if kind is batched.Create:
                results.append((True, op.values(now)))
            elif kind is batched.Step or kind is batched.Finish:
                results.append(op._result(now))
            else:  # writes D never makes on its ordinary path: done for real
                rows: list[Any] = []
                results.append(op(self._conn, rows))
                batched.insert_rows(self._conn, rows)
        if pause:
            time.sleep(pause * len(batch))
        self._deliver_results(batch, results)

    return commit


@contextmanager
def free_writer(pause_us: float) -> Iterator[None]:
    real = store_sqlite._Writer._commit
    if not hasattr(store_sqlite._Writer, "_deliver_results"):
        raise SystemExit("the store's writer has no _deliver_results any more: update ceiling.py")
    store_sqlite._Writer._commit = _free_commit(pause_us)  # type: ignore[method-assign]
    try:
        yield
    finally:
        store_sqlite._Writer._commit = real  # type: ignore[method-assign]


async def d_with(path: str, runs: int, waves: int, pause_us: float | None) -> float:
    """D's transitions per second: the real store (None) or a free writer."""
    if pause_us is None:
        result = await throughput.bench_d(path, runs, waves)
    else:
        with free_writer(pause_us):
            result = await throughput.bench_d(path, runs, waves)
    return float(result["transitions_per_s"])


async def main_async(quick: bool, pauses: list[float]) -> None:
    emit({"bench": "ceiling", "name": "machine", **machine()})
    runs, waves, trials = (200, 2, 1) if quick else (1000, 5, TRIALS)
    names = ["B", "D"] + [f"Z{p:g}" for p in pauses]
    got: dict[str, list[float]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        for t in range(trials):
            for name in names:
                path = os.path.join(tmp, f"{name}-{t}.db")
                gc.collect()
                if name == "B":
                    value = (await throughput.bench_b(path, runs, waves))["transitions_per_s"]
                elif name == "D":
                    value = await d_with(path, runs, waves, None)
                else:
                    value = await d_with(path, runs, waves, float(name[1:]))
                got[name].append(float(value))
                throughput._remove_db(path)
    b = median(got["B"])
    print(f"\n{runs:,} concurrent runs x {N_STAGES} stages, {waves} waves, median of {trials}")
    for name in names:
        value = median(got[name])
        emit(
            {
                "bench": "ceiling",
                "name": name,
                "unit": "tr/s",
                "median": value,
                "trials": got[name],
                "of_b": value / b,
            }
        )
    print()
    labels = {"B": "B raw group commit", "D": "D waystation, the real store"}
    for name in names:
        label = labels.get(name)
        if label is None:
            pause = float(name[1:])
            label = (
                f"{name} writer costs nothing (loop's ceiling)"
                if pause == 0
                else f"{name} writer takes {pause:g} us/write, GIL-free"
            )
        value = median(got[name])
        print(f"  {label:<48} {value:>10,.0f} tr/s  {value / b:6.0%} of B")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="200 runs, 2 waves, 1 trial")
    parser.add_argument(
        "--pauses",
        default="0,4.5",
        help="GIL-free pauses per write for the Z variants, in us (comma-separated)",
    )
    args = parser.parse_args()
    pauses = [float(p) for p in args.pauses.split(",") if p.strip()]
    asyncio.run(main_async(args.quick, pauses))


if __name__ == "__main__":
    main()
