"""What each part of the writer's batch costs, per stage commit, in plain sqlite3 (CPU time).

    .venv/bin/python benchmarks/batch_cost.py [--runs 1000] [--steps 30] [--input-bytes 10]

In D (1,000 concurrent runs), once the runs are under way, the event loop sits idle while
the writer commits (`overlap.py --timeline`): the writer's CPU per stage commit sets the
pace. This script applies batches of `--runs` stage commits the way the store does (the
multi-row `runs` UPDATE guarded on owner, status, cancel and seq, then the journal rows,
then COMMIT), on one thread with nothing else running, in a file that already holds 20,000
finished runs, and times each part with `time.thread_time()`. Then the same with one thing
changed at a time:

- `with the at index`: the journal's `(at, run_id, seq)` index, which live events paged by
  until migration 6 dropped it (they follow rowids since);
- `guard read, no update`: the `runs` row only read, for the same guard (the shape the
  issue's "no per-stage SQL beyond the append" would take: a running run's position would
  then live only in the journal's tail);
- `no guard at all`: the journal rows alone (what B, the raw group commit, does);
- `journal WITHOUT ROWID`: the journal clustered on (run_id, seq) instead of a rowid table
  with its primary key as a second b-tree;
- `input in the runs row`: the run's input stored in its `runs` row, as before migration 5
  (the runs' input is `--input-bytes` long: SQLite rebuilds the whole record it updates).
Each figure is the median over `--steps` batches, in microseconds per stage commit.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import statistics
import tempfile
import time
from itertools import chain
from typing import Any

from _common import emit

from waystation import migrations
from waystation.store import batch
from waystation.store.base import NewTransition

OLD_RUNS = 20_000
OWNER = "engine-1234"

VARIANTS = {
    "the store now": set(),
    "with the at index": {"with_at"},
    "guard read, no update": {"guard_read"},
    "no guard at all": {"no_guard"},
    "journal WITHOUT ROWID": {"without_rowid"},
    "input in the runs row": {"input_in_row"},
}

_GUARD_READ = batch._sized(
    "SELECT count(*) FROM (VALUES {values}) AS v JOIN runs ON runs.run_id = v.column1 "
    "WHERE runs.status = 'running' AND runs.lease_owner = v.column2 "
    "AND runs.cancel_requested = 0",
    2,
)


def _open(path: str, changes: set[str]) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    migrations.apply(conn)
    if "without_rowid" in changes:
        conn.execute("DROP VIEW journal")
        conn.execute("DROP TABLE transitions")
        conn.execute(
            "CREATE TABLE transitions (run_id TEXT NOT NULL, seq INTEGER NOT NULL, "
            "stage_index INTEGER, stage_path TEXT, event TEXT NOT NULL, "
            "attempt INTEGER NOT NULL DEFAULT 0, payload TEXT, error TEXT, at REAL NOT NULL, "
            "next_event TEXT, next_path TEXT, next_attempt INTEGER, "
            "PRIMARY KEY (run_id, seq)) WITHOUT ROWID"
        )
    if "with_at" in changes:
        conn.execute("CREATE INDEX transitions_at ON transitions (at, run_id, seq)")
    return conn


def _insert_runs(
    conn: sqlite3.Connection, ids: list[str], status: str, owner: str | None, text: str, row: bool
) -> None:
    conn.executemany(
        "INSERT INTO runs (run_id, pipeline, pipeline_version, fingerprint, status, "
        "stage_index, seq, input, root_run_id, lease_owner, created_at, updated_at) "
        "VALUES (?, 'p', '1', 'ffffffffffffffff', ?, 0, 2, ?, ?, ?, 1.0, 1.0)",
        [(r, status, text if row else None, r, owner) for r in ids],
    )
    if not row:
        conn.executemany("INSERT INTO run_inputs VALUES (?, ?)", [(r, text) for r in ids])


def _step(k: int) -> list[NewTransition]:
    return [
        NewTransition("succeeded", k, f"s{k}", 1, str(k)),
        NewTransition("started", k + 1, f"s{k + 1}", 1),
    ]


def measure(changes: set[str], runs: int, steps: int, input_bytes: int) -> dict[str, float]:
    tmp = tempfile.mkdtemp()
    try:
        conn = _open(os.path.join(tmp, "cost.db"), changes)
        conn.execute("BEGIN")
        old = [f"0{i:07d}-old" for i in range(OLD_RUNS)]
        text = '{"doc": "' + "x" * max(0, input_bytes - 11) + '"}'
        row = "input_in_row" in changes
        _insert_runs(conn, old, "succeeded", None, text, row)
        rows: list[tuple[Any, ...]] = []
        for r in old:
            for k in range(10):
                batch.append(rows, r, 2 * k, _step(k), 1.0 + k)
        batch.insert_rows(conn, rows)
        ids = [f"1{i:07d}-aaaa-7bbb-8ccc-dddddddddddd" for i in range(runs)]
        _insert_runs(conn, ids, "running", OWNER, text, row)
        conn.execute("COMMIT")
        times: dict[str, list[float]] = {"guard": [], "journal": [], "commit": []}
        for k in range(steps):
            seq, now = 2 + 2 * k, time.time()
            transitions = _step(k)
            conn.execute("BEGIN IMMEDIATE")
            t0 = time.thread_time()
            if "guard_read" in changes:
                found = 0
                for start, size in batch.chunks(runs):
                    flat = list(chain.from_iterable((r, OWNER) for r in ids[start : start + size]))
                    found += conn.execute(_GUARD_READ[size], flat).fetchone()[0]
                assert found == runs
            elif "no_guard" not in changes:
                params = [(r, seq + 2, k + 1, OWNER, seq) for r in ids]
                assert batch._apply_chunked(conn, batch.Step._many, params, (now,)) == runs
            t1 = time.thread_time()
            rows = []
            for r in ids:
                batch.append(rows, r, seq, transitions, now)
            batch.insert_rows(conn, rows)
            t2 = time.thread_time()
            conn.execute("COMMIT")
            t3 = time.thread_time()
            times["guard"].append(t1 - t0)
            times["journal"].append(t2 - t1)
            times["commit"].append(t3 - t2)
        conn.close()
    finally:
        shutil.rmtree(tmp)
    per = {k: statistics.median(v) / runs * 1e6 for k, v in times.items()}
    per["total"] = sum(per.values())
    return per


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=1000, help="stage commits per batch")
    parser.add_argument("--steps", type=int, default=30, help="batches measured")
    parser.add_argument("--input-bytes", type=int, default=10, help="each run's input")
    args = parser.parse_args()
    results = {}
    for name, changes in VARIANTS.items():
        results[name] = measure(changes, args.runs, args.steps, args.input_bytes)
        emit(
            {
                "bench": "batch_cost",
                "variant": name,
                "input_bytes": args.input_bytes,
                "us_per_commit": results[name],
            }
        )
    base = results["the store now"]["total"]
    print(
        f"\nCPU per stage commit, batches of {args.runs}, runs with {args.input_bytes}-byte "
        f"inputs (median of {args.steps}):"
    )
    print(f"  {'':<24} {'guard':>7} {'journal':>8} {'commit':>7} {'total':>7}")
    for name, r in results.items():
        print(
            f"  {name:<24} {r['guard']:6.2f}  {r['journal']:7.2f}  {r['commit']:6.2f}  "
            f"{r['total']:6.2f} us  ({r['total'] / base - 1:+.0%})"
        )


if __name__ == "__main__":
    main()
