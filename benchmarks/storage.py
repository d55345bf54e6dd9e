"""Memory and storage (issue 6): bytes on disk per stage against the payload size, paging
through many paused runs in constant memory, engine memory per paused run, and prune.

    .venv/bin/python benchmarks/storage.py [--paused 100000]

Prints one JSON line per measurement and a table. Nothing here is timed against a target;
the figures show growth (linear in payload, flat in memory), which is what the targets ask.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sqlite3
import tempfile
import tracemalloc
from pathlib import Path
from typing import Any

from _common import emit

import waystation as ws

STAGES = 10


def _sized(k: int) -> ws.Stage:
    async def fn(size: int) -> str:
        return "x" * size

    fn.__name__ = fn.__qualname__ = f"p{k}"
    return ws.Stage(fn, name=f"p{k}")


payloads = ws.Pipeline("payloads", [_sized(k) for k in range(STAGES)])


@ws.stage
async def first(n: int) -> int:
    return n


approval = ws.gate("approval", schema=bool)
waiting = ws.Pipeline("waiting", [first, approval])


def _db_bytes(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        size = conn.execute("PRAGMA page_size").fetchone()[0]
    return int((pages - free) * size)


async def bytes_per_stage(tmp: Path) -> list[dict[str, Any]]:
    """Bytes used per stage for payloads of 10 B .. 100 kB (each output stored once)."""
    out = []
    for size in (10, 1_000, 10_000, 100_000):
        db = tmp / f"payload-{size}.db"
        async with ws.Engine.open(db, pipelines=[payloads]) as engine:
            empty = _db_bytes(db)
            runs = 20
            await asyncio.gather(*[engine.start(payloads, {"size": size}) for _ in range(runs)])
        used = _db_bytes(db) - empty
        per_stage = used / (runs * STAGES)
        out.append(
            emit(
                {
                    "bench": "storage",
                    "name": "bytes_per_stage",
                    "payload_bytes": size,
                    "bytes_per_stage": round(per_stage),
                    "overhead_bytes": round(per_stage - size),
                }
            )
        )
    return out


async def paused_runs(tmp: Path, count: int) -> dict[str, Any]:
    """Create `count` paused runs, then page through them all and measure Python memory."""
    db = tmp / "paused.db"
    async with ws.Engine.open(db, pipelines=[waiting]) as engine:
        batch = 2_000
        for start in range(0, count, batch):
            await asyncio.gather(
                *[engine.start(waiting, {"n": i}) for i in range(start, min(count, start + batch))]
            )
        gc.collect()
        assert engine.active_runs == []  # paused runs are not held by the engine
        tracemalloc.start()
        seen = 0
        async for _run in engine.iter_runs(status="paused", page=500):
            seen += 1
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return emit(
        {
            "bench": "storage",
            "name": "page_through_paused",
            "paused_runs": count,
            "listed": seen,
            "peak_python_bytes_while_listing": peak,
            "db_bytes_per_paused_run": round(_db_bytes(db) / count),
        }
    )


async def prune_keeps_size(tmp: Path) -> dict[str, Any]:
    """Run waves of runs with pruning between them: the file stops growing."""
    db = tmp / "prune.db"
    sizes = []
    async with ws.Engine.open(db, pipelines=[payloads]) as engine:
        for _ in range(5):
            await asyncio.gather(*[engine.start(payloads, {"size": 1000}) for _ in range(200)])
            await engine.prune(older_than=0)
            sizes.append(_db_bytes(db))
    return emit({"bench": "storage", "name": "prune_waves", "file_bytes_after_each": sizes})


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--paused", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        rows = await bytes_per_stage(tmp)
        paged = await paused_runs(tmp, args.paused)
        pruned = await prune_keeps_size(tmp)
    print()
    print(f"{'payload':>10} {'bytes/stage':>12} {'overhead':>10}")
    for r in rows:
        print(f"{r['payload_bytes']:>10} {r['bytes_per_stage']:>12} {r['overhead_bytes']:>10}")
    print(
        f"{paged['listed']} paused runs listed page by page; peak Python memory while "
        f"listing {paged['peak_python_bytes_while_listing'] / 1e6:.1f} MB; "
        f"{paged['db_bytes_per_paused_run']} bytes on disk per paused run"
    )
    print(f"file size after each wave + prune: {pruned['file_bytes_after_each']}")


if __name__ == "__main__":
    asyncio.run(main())
