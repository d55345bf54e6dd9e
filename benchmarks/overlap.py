"""Do the event loop and the writer thread work at the same time? (D, 1,000 concurrent runs)

    .venv/bin/python benchmarks/overlap.py [--trials 3] [--gc-freeze]

Instruments one D wave series (as throughput.py's D: 1,000 runs x 10 stages x 5 waves) and
prints, over the middle of the measurement:
  - CPU microseconds per transition of the event loop's thread and of the writer thread;
  - the share of wall time the writer is inside a batch, the share it is on CPU there, the
    share the loop is idle (in epoll), and the share both happen at once;
  - batch sizes;
  - per statement kind on the writer: wall time against CPU time. Every statement gives
    the GIL away while SQLite works and must win it back; wall well above CPU is time
    spent waiting for the GIL (or for the disk, on COMMIT);
  - the garbage collector: collections per generation and the time they took, over the
    whole measurement (`gc.callbacks`). With `--gc-freeze`, `gc.freeze()` is called after
    the engine is open and warm, as an application could after its start-up: what the
    full collections of the process's own objects cost D.
It patches private methods of the store (`_Writer._commit`, the writer's connection) and
the selector, so if those change this script says so rather than measuring nothing.
With `--timeline` it also prints the last wave commit by commit.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import os
import selectors
import shutil
import statistics
import tempfile
import time
from typing import Any

from _common import PIPELINE, RUN_INPUT, emit, thread_cpu

import waystation as ws
from waystation.store import sqlite as store_sqlite

RUNS, WAVES, STAGES = 1000, 5, 10


class _TimedConnection:
    """Wraps the writer's sqlite3 connection to time each statement, by kind."""

    def __init__(self, conn: Any, times: dict[str, list[tuple[float, float]]]) -> None:
        self._conn = conn
        self._times = times

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    def execute(self, sql: str, *args: Any) -> Any:
        wall, cpu = time.perf_counter(), time.thread_time()
        result = self._conn.execute(sql, *args)
        kind = " ".join(sql.split()[:3]).split("(")[0].strip()
        self._times[kind].append((time.perf_counter() - wall, time.thread_time() - cpu))
        return result


async def trial(freeze: bool = False) -> dict[str, Any]:
    batches: list[tuple[float, float, int, float]] = []
    idle: list[tuple[float, float]] = []
    statements: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    commit, init = store_sqlite._Writer._commit, store_sqlite._Writer.__init__
    select = selectors.EpollSelector.select

    def timed_commit(self: Any, batch: Any) -> None:
        wall, cpu = time.perf_counter(), time.thread_time()
        commit(self, batch)
        batches.append((wall, time.perf_counter(), len(batch), time.thread_time() - cpu))

    def timed_init(self: Any, conn: Any, path: str) -> None:
        init(self, _TimedConnection(conn, statements), path)

    def timed_select(self: Any, timeout: float | None = None) -> Any:
        start = time.perf_counter()
        try:
            return select(self, timeout)
        finally:
            idle.append((start, time.perf_counter()))

    collections_gc: dict[int, list[float]] = collections.defaultdict(list)
    gc_start = [0.0]

    def gc_timer(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            gc_start[0] = time.perf_counter()
        else:
            collections_gc[info["generation"]].append(time.perf_counter() - gc_start[0])

    store_sqlite._Writer._commit = timed_commit  # type: ignore[method-assign]
    store_sqlite._Writer.__init__ = timed_init  # type: ignore[method-assign]
    selectors.EpollSelector.select = timed_select  # type: ignore[method-assign]
    tmp = tempfile.mkdtemp()
    try:
        async with ws.Engine.open(
            os.path.join(tmp, "d.db"), pipelines=[PIPELINE], max_concurrent_runs=RUNS
        ) as engine:
            warm = await asyncio.gather(*(engine.submit(PIPELINE, RUN_INPUT) for _ in range(50)))
            await asyncio.gather(*(engine.wait(r.run_id) for r in warm))
            statements.clear()
            if freeze:
                gc.collect()
                gc.freeze()
            gc.callbacks.append(gc_timer)
            cpu0, t0, first = thread_cpu(), time.perf_counter(), len(batches)
            for _ in range(WAVES):
                wave = (time.perf_counter(), len(batches))
                runs = await asyncio.gather(
                    *(engine.submit(PIPELINE, RUN_INPUT) for _ in range(RUNS))
                )
                await asyncio.gather(*(engine.wait(r.run_id) for r in runs))
            wave_end = time.perf_counter()
            elapsed, cpu1 = time.perf_counter() - t0, thread_cpu()
            gc.callbacks.remove(gc_timer)
    finally:
        gc.unfreeze()
        store_sqlite._Writer._commit = commit  # type: ignore[method-assign]
        store_sqlite._Writer.__init__ = init  # type: ignore[method-assign]
        selectors.EpollSelector.select = select  # type: ignore[method-assign]
        shutil.rmtree(tmp)
    if not statements or len(batches) <= first:
        raise RuntimeError("the store's private methods changed: nothing was measured")
    transitions = RUNS * WAVES * STAGES
    per = {k: (cpu1.get(k, 0.0) - cpu0.get(k, 0.0)) / transitions * 1e6 for k in cpu1}
    window = batches[first + (len(batches) - first) // 3 :]  # the middle and the end
    lo, hi = window[0][0], window[-1][1]
    wall = hi - lo

    def overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
        return sum(max(0.0, min(e1, e2) - max(s1, s2)) for s1, e1 in a for s2, e2 in b if s2 < e1)

    busy = [(s, e) for s, e, _, _ in window]
    loop_idle = [(max(s, lo), min(e, hi)) for s, e in idle if e > lo and s < hi]
    w0 = wave[0]
    last_wave = [
        {
            "start_ms": round((s - w0) * 1e3, 2),
            "end_ms": round((e - w0) * 1e3, 2),
            "writes": n,
            "writer_cpu_ms": round(c * 1e3, 2),
            "loop_idle_ms": round(overlap([(s, e)], idle) * 1e3, 2),
        }
        for s, e, n, c in batches[wave[1] :]
    ]
    return {
        "last_wave": {"wall_ms": round((wave_end - w0) * 1e3, 1), "batches": last_wave},
        "transitions_per_s": transitions / elapsed,
        "cpu_us_per_transition": {
            "event_loop": round(per.get("MainThread", 0.0), 1),
            "writer": round(per.get("waystation-writer", 0.0), 1),
        },
        "writer_busy": sum(e - s for s, e in busy) / wall,
        "writer_on_cpu": sum(c for *_, c in window) / wall,
        "loop_idle": sum(e - s for s, e in loop_idle) / wall,
        "writer_busy_while_loop_idle": overlap(busy, loop_idle) / wall,
        "batch_sizes": [n for _, _, n, _ in window[:8]],
        "gc": {
            "share_of_wall": sum(sum(v) for v in collections_gc.values()) / elapsed,
            "by_generation": {
                g: {"count": len(v), "ms_total": round(sum(v) * 1e3, 1)}
                for g, v in sorted(collections_gc.items())
            },
        },
        "statements": {
            kind: {
                "count": len(v),
                "wall_us_median": round(statistics.median(w for w, _ in v) * 1e6, 1),
                "wall_ms_total": round(sum(w for w, _ in v) * 1e3, 1),
                "cpu_ms_total": round(sum(c for _, c in v) * 1e3, 1),
            }
            for kind, v in statements.items()
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--gc-freeze", action="store_true", help="gc.freeze() once warm")
    parser.add_argument(
        "--timeline", action="store_true", help="also print every commit of the last wave"
    )
    args = parser.parse_args()
    for k in range(args.trials):
        r = emit(
            {
                "bench": "overlap",
                "trial": k + 1,
                "gc_freeze": args.gc_freeze,
                **asyncio.run(trial(args.gc_freeze)),
            }
        )
        print(
            f"\ntrial {k + 1}: {r['transitions_per_s']:,.0f} tr/s; CPU us/transition: "
            f"loop {r['cpu_us_per_transition']['event_loop']}, "
            f"writer {r['cpu_us_per_transition']['writer']}"
        )
        print(
            f"  writer in a batch {r['writer_busy']:.0%} of the time (on CPU "
            f"{r['writer_on_cpu']:.0%}); loop idle {r['loop_idle']:.0%}; both at once "
            f"{r['writer_busy_while_loop_idle']:.0%}; batch sizes {r['batch_sizes']}"
        )
        gens = ", ".join(
            f"gen {g}: {v['count']} in {v['ms_total']} ms"
            for g, v in r["gc"]["by_generation"].items()
        )
        print(f"  garbage collection {r['gc']['share_of_wall']:.0%} of the wall time ({gens})")
        for kind, s in sorted(r["statements"].items(), key=lambda kv: -kv[1]["wall_ms_total"]):
            print(
                f"  {kind:<24} x{s['count']:<6} wall {s['wall_ms_total']:7.1f} ms "
                f"(median {s['wall_us_median']:7.1f} us)  CPU {s['cpu_ms_total']:7.1f} ms"
            )
        if args.timeline:
            print_timeline(r["last_wave"])


def print_timeline(wave: dict[str, Any]) -> None:
    """The last wave commit by commit: when each began and ended (ms from the wave's start),
    how many writes it carried, the writer's CPU in it and how long the loop sat idle
    meanwhile. Writer CPU plus the loop's busy time (wall - idle) near the commit's wall
    time means the two threads took turns rather than working at once."""
    print(f"  last wave, {wave['wall_ms']} ms, commit by commit:")
    print("     start      end  writes  writer CPU  loop idle   loop busy + writer CPU")
    for b in wave["batches"]:
        wall = b["end_ms"] - b["start_ms"]
        both = wall - b["loop_idle_ms"] + b["writer_cpu_ms"]
        print(
            f"  {b['start_ms']:8.2f} {b['end_ms']:8.2f} {b['writes']:7d} "
            f"{b['writer_cpu_ms']:8.2f} ms {b['loop_idle_ms']:7.2f} ms   "
            f"{both:6.2f} ms of {wall:6.2f} ms"
        )


if __name__ == "__main__":
    main()
