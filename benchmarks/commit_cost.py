"""What one stage commit of a run alone costs SQLite, by what it writes (synchronous=FULL).

    .venv/bin/python benchmarks/commit_cost.py [--commits 3000]

Plain sqlite3, no asyncio and no engine: the transaction a stage commit runs, one at a time,
on the real disk, in four shapes, each on its own file and taken in turn commit by commit
(so that all four see the same disk at the same moment):

  A          throughput.py's A: one 4-column row in a WITHOUT ROWID table
  store      the store's stage commit now: BEGIN IMMEDIATE, the `runs` row's UPDATE, one
             journal row (the next stage's `started` folded in), COMMIT
  no_update  the same without the `runs` UPDATE
  store_with_at  the store's stage commit with the `transitions_at` index, as before
             migration 6 dropped it

It prints the median, mean and 90th percentile per commit (WAL checkpoints as SQLite does
them by default) and then the WAL frames (4 KB pages) each stage commit appends: what a
different journal layout would be worth before building it.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import tempfile
import time

from _common import emit

from waystation import migrations

SHAPES = ("A", "store", "no_update", "store_with_at")


def _open(path: str, shape: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    if shape == "A":
        conn.execute(
            "CREATE TABLE transitions (run_id TEXT NOT NULL, seq INTEGER NOT NULL, payload TEXT, "
            "at REAL NOT NULL, PRIMARY KEY (run_id, seq)) WITHOUT ROWID"
        )
    else:
        migrations.apply(conn, "sqlite")
        if shape == "store_with_at":
            conn.execute("CREATE INDEX transitions_at ON transitions (at, run_id, seq)")
    return conn


def _commit(conn: sqlite3.Connection, shape: str, run_id: str, k: int) -> None:
    now = time.time()
    if shape == "A":
        conn.execute("BEGIN")
        conn.execute("INSERT INTO transitions VALUES (?, ?, ?, ?)", (run_id, k + 1, str(k), now))
        conn.execute("COMMIT")
        return
    conn.execute("BEGIN IMMEDIATE")
    if shape in ("store", "store_with_at"):
        conn.execute(
            "UPDATE runs SET updated_at = ?, seq = ?, stage_index = ? WHERE run_id = ?",
            (now, 2 * k + 2, k + 1, run_id),
        )
    row = (run_id, 2 * k + 1, k, f"s{k}", "succeeded", 1, str(k), None, now)
    conn.execute(
        "INSERT INTO transitions (run_id, seq, stage_index, stage_path, event, attempt, payload, "
        "error, at, next_event, next_path, next_attempt) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (*row, "started", f"s{k + 1}", 1),
    )
    conn.execute("COMMIT")


FRAME_COMMITS = 200


def _next(conn: sqlite3.Connection, shape: str, n: int) -> tuple[str, int]:
    """The run and stage of the n-th commit (10 stages a run); a new run gets its row first."""
    run, k = divmod(n, 10)
    run_id = f"01a205ee-ea90-7063-9de9-{run:012d}"
    if shape != "A" and k == 0:
        conn.execute(
            "INSERT INTO runs (run_id, pipeline, pipeline_version, fingerprint, status, "
            "root_run_id, created_at, updated_at, lease_owner) "
            "VALUES (?, 'p', '1', 'f', 'running', ?, 0, 0, 'o')",
            (run_id, run_id),
        )
    return run_id, k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--commits", type=int, default=3000)
    parser.add_argument("--dir", default=None, help="where to put the databases")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="waystation-commit-", dir=args.dir)
    paths = {s: os.path.join(tmp, f"{s}.db") for s in SHAPES}
    conns = {s: _open(p, s) for s, p in paths.items()}
    times: dict[str, list[float]] = {s: [] for s in SHAPES}
    for n in range(args.commits):
        for shape, conn in conns.items():
            run_id, k = _next(conn, shape, n)
            t0 = time.perf_counter()
            _commit(conn, shape, run_id, k)
            times[shape].append(time.perf_counter() - t0)
    # Then the WAL frames a stage commit appends: a few more commits with the WAL never
    # checkpointed (so it only grows), counting its growth across each commit alone.
    frames: dict[str, float] = {}
    for shape, conn in conns.items():
        conn.execute("PRAGMA wal_autocheckpoint=0")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # an empty WAL, which then only grows
        wal, grown = paths[shape] + "-wal", 0
        for n in range(args.commits, args.commits + FRAME_COMMITS):
            run_id, k = _next(conn, shape, n)
            before = os.path.getsize(wal)
            _commit(conn, shape, run_id, k)
            grown += os.path.getsize(wal) - before
        frames[shape] = grown / (4096 + 24) / FRAME_COMMITS
    for conn in conns.values():
        conn.close()
    for path in paths.values():
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(path + suffix):
                os.remove(path + suffix)
    os.rmdir(tmp)
    print()
    for shape in SHAPES:
        v = sorted(times[shape])
        r = emit(
            {
                "bench": "commit_cost",
                "name": shape,
                "commits": args.commits,
                "median_us": statistics.median(v) * 1e6,
                "mean_us": statistics.mean(v) * 1e6,
                "p90_us": v[int(len(v) * 0.9)] * 1e6,
                "wal_frames_per_commit": frames[shape],
            }
        )
        print(
            f"{shape:<16} median {r['median_us']:6.1f} us  mean {r['mean_us']:6.1f} us  "
            f"p90 {r['p90_us']:6.1f} us  ~{r['wal_frames_per_commit']:.2f} WAL frames per commit"
        )


if __name__ == "__main__":
    main()
