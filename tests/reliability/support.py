"""Shared helpers for the reliability tests: raw SQL reads, journal invariants, bounded waits.

Everything here reads the database with a separate `sqlite3` connection, as another tool
would, so the assertions do not trust the engine's own view of what it wrote.
"""

from __future__ import annotations

import asyncio
import collections
import sqlite3
from collections.abc import Awaitable, Callable, Iterable
from contextlib import closing
from pathlib import Path
from typing import Any

from .. import processes
from ..processes import ROOT as ROOT  # test_security reads the package files from here

SAFETY = 20.0
"""Upper bound of any single wait in these tests (a loaded 2-core machine included)."""

TERMINAL_EVENTS = {"completed": "succeeded", "cancelled": "cancelled"}
"""Journal events that end a run, and the status they leave it in (`failed` is special:
a `continue_on_error` stage journals `failed` without ending the run)."""


def query(db: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Read `db` with a fresh sqlite3 connection."""
    with closing(sqlite3.connect(db, timeout=SAFETY)) as conn:
        return conn.execute(sql, params).fetchall()


def integrity(db: Path) -> list[tuple[Any, ...]]:
    """`PRAGMA integrity_check` rows; `[("ok",)]` for a sound file."""
    return query(db, "PRAGMA integrity_check")


def tables(db: Path) -> set[str]:
    return {r[0] for r in query(db, "SELECT name FROM sqlite_master WHERE type = 'table'")}


def run_row(db: Path, run_id: str) -> dict[str, Any] | None:
    with closing(sqlite3.connect(db, timeout=SAFETY)) as conn:
        conn.row_factory = sqlite3.Row
        row = conn.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            return None
        found = conn.execute("SELECT input FROM run_inputs WHERE run_id = ?", (run_id,))
        stored = found.fetchone()  # the input has a table of its own (migration 5)
        return {**dict(row), "input": stored[0] if stored else None}


def journal(db: Path, run_id: str) -> list[tuple[Any, ...]]:
    """(seq, stage_index, event, attempt, payload, error) of one run, in seq order."""
    return query(
        db,
        "SELECT seq, stage_index, event, attempt, payload, error FROM journal "
        "WHERE run_id = ? ORDER BY seq",
        (run_id,),
    )


def events(db: Path, run_id: str) -> list[tuple[str, int | None]]:
    return [(e, i) for _, i, e, *_ in journal(db, run_id)]


def count_events(db: Path, run_id: str, event: str) -> int:
    ((n,),) = query(
        db, "SELECT COUNT(*) FROM journal WHERE run_id = ? AND event = ?", (run_id, event)
    )
    return int(n)


def check_journal(db: Path, run_id: str) -> list[tuple[Any, ...]]:
    """Assert the invariants every run's journal keeps, whatever happened to it; returns it.

    - seq runs 1, 2, 3, ... without gaps, and the run row's `seq` is the last one;
    - no stage has two `succeeded` rows (a committed stage never runs again), nor a
      `cancelled` row after its `succeeded` or `skipped` one;
    - since the last `retried` row (engine.retry), at most one event ended the run, and it is
      the last row, matching the run's status;
    - a settled run holds no lease.
    """
    rows = journal(db, run_id)
    row = run_row(db, run_id)
    assert row is not None, f"run {run_id} has no row"
    seqs = [r[0] for r in rows]
    assert seqs == list(range(1, len(rows) + 1)), f"run {run_id}: seq has gaps: {seqs}"
    assert row["seq"] == len(rows), f"run {run_id}: row seq {row['seq']} != {len(rows)} rows"
    # Keyed by (index, path): the branches of a parallel group share their group's index.
    done = collections.Counter(
        query(
            db,
            "SELECT stage_index, stage_path FROM journal WHERE run_id = ? AND event = 'succeeded'",
            (run_id,),
        )
    )
    twice = {i: n for i, n in done.items() if n > 1}
    assert not twice, f"run {run_id}: stages committed more than once: {twice}"
    # A `cancelled` row never follows its stage's own outcome (`succeeded`, `skipped`);
    # one without a path (written by `cancel` without the pipeline) stands for the
    # top-level stage at its index, whose paths have no dot (branches' do).
    committed: set[tuple[Any, Any]] = set()
    for seq, index, path, event in query(
        db,
        "SELECT seq, stage_index, stage_path, event FROM journal WHERE run_id = ? "
        "AND event IN ('succeeded', 'skipped', 'cancelled') ORDER BY seq",
        (run_id,),
    ):
        if event != "cancelled":
            committed.add((index, path))
            if path is not None and "." not in path:
                committed.add((index, None))
        else:
            assert (index, path) not in committed, (
                f"run {run_id}: `cancelled` at seq {seq} after stage {path} committed"
            )
    last_retry = max((k for k, r in enumerate(rows) if r[2] == "retried"), default=-1)
    tail = rows[last_retry + 1 :]
    enders = [r for r in tail if r[2] in TERMINAL_EVENTS]
    status = row["status"]
    if status == "failed":
        assert tail and tail[-1][2] == "failed", f"run {run_id} failed, journal ends {tail[-1:]}"
        assert not enders, f"run {run_id}: failed, yet journal has {enders}"
    elif status in ("succeeded", "cancelled"):
        assert len(enders) == 1, f"run {run_id}: {status} with end events {enders}"
        assert tail[-1] == enders[0], f"run {run_id}: rows after the end: {tail}"
        assert TERMINAL_EVENTS[enders[0][2]] == status, f"run {run_id}: {status} vs {enders}"
    else:
        assert not enders, f"run {run_id}: {status}, yet journal has {enders}"
    if status in ("succeeded", "failed", "cancelled", "paused"):
        assert row["lease_owner"] is None, f"run {run_id} is {status} but leased"
    return rows


def check_all(db: Path) -> None:
    """`check_journal` for every run in `db`, and the file's integrity."""
    assert integrity(db) == [("ok",)]
    for (run_id,) in query(db, "SELECT run_id FROM runs"):
        check_journal(db, run_id)


async def wait_until(
    what: str, check: Callable[[], bool | Awaitable[bool]], timeout: float = SAFETY
) -> None:
    """Poll `check` until true; fail naming `what` after `timeout` seconds."""
    await processes.wait_until(what, check, timeout, poll=0.005)


def subprocess_env() -> dict[str, str]:
    """Environment for `python -m tests.reliability...` children: the repo importable."""
    return processes.child_env()


async def spawn(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> Child:
    return Child(await processes.start_python(*args, env=env, cwd=cwd))


class Child:
    """A subprocess whose stdout is read line by line, every wait bounded."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def line(self, timeout: float = SAFETY) -> str:
        assert self.proc.stdout is not None
        try:
            raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        except TimeoutError:
            raise AssertionError(f"child {self.proc.pid} printed nothing in {timeout}s") from None
        if not raw:
            code, _, err = await self.finish()
            raise AssertionError(f"child {self.proc.pid} exited ({code}) early:\n{err}")
        return raw.decode().strip()

    async def finish(self, timeout: float = SAFETY) -> tuple[int, str, str]:
        """Wait for exit; (return code, rest of stdout, stderr)."""
        try:
            out, err = await asyncio.wait_for(self.proc.communicate(), timeout)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise AssertionError(f"child {self.proc.pid} did not exit in {timeout}s") from None
        assert self.proc.returncode is not None
        return self.proc.returncode, out.decode(), err.decode()

    async def cleanup(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


def stage_counts(rows: Iterable[tuple[Any, ...]]) -> collections.Counter[int]:
    """`succeeded` rows per stage index."""
    return collections.Counter(r[1] for r in rows if r[2] == "succeeded")
