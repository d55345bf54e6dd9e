"""Writes that a batch applies together: the three every run makes (create, step, finish).

The writer thread runs a batch of queued writes in one transaction. Most writes are
statements of their own, but the three a run makes on its ordinary path have outcomes known
before they run (a new row; the next seq), so the batch applies each kind with a few
multi-row statements instead of one statement per run. That matters more than the SQL
saved: every statement gives the GIL away while SQLite works and must win it back from a
busy event loop, which costs far more than the statement itself (measured: median 7 us of
wall for 3 us of CPU per single-row statement, and up to a switch interval, 5 ms, when the
loop is busy). If any of a kind's rows does not apply (a lost lease, a cancel, an existing
id), `GuardMissed` makes the writer redo the batch one write at a time, each a plain write
(`__call__`) that reports its own outcome.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from itertools import chain
from typing import Any, ClassVar

import msgspec

from .base import NewRun, NewTransition, TransitionRecord

_RUN_COLUMNS = (
    "run_id, pipeline, pipeline_version, fingerprint, status, stage_index, seq, input, output, "
    "error, pause, parent_run_id, root_run_id, run_kind, depth, idempotency_key, lease_owner, "
    "lease_expires, cancel_requested, replay_of, created_at, updated_at, wake_at"
)
"""The columns of `runs`, in `RunRecord`'s order."""
INPUT = "COALESCE((SELECT input FROM run_inputs WHERE run_inputs.run_id = runs.run_id), runs.input)"
"""A run's input, as a column of `runs` reads it (it lives in `run_inputs`: migration 5)."""
RUN_FIELDS = _RUN_COLUMNS.replace(" seq, input,", f" seq, {INPUT},")
"""A `RunRecord`'s columns, for a SELECT or RETURNING on `runs`."""
TRANSITION_FIELDS = "run_id, seq, stage_index, stage_path, event, attempt, payload, error, at"
STORED_FIELDS = TRANSITION_FIELDS + ", next_event, next_path, next_attempt"
"""A stored journal row: a transition, and the one folded into it (see `append`)."""

FOLDED = frozenset({"started", "completed"})
"""Events a row may carry for the row after it (migration 0003)."""

Rows = list[tuple[Any, ...]]

# Statements are built for a few fixed sizes (each prepared once and cached by sqlite3): a
# batch of n rows takes about n / 256 statements. 256 rows x 23 columns stays far below
# SQLite's limit of 32,766 parameters. Size 2: a stage commit of a run alone has 2 rows.
CHUNKS = (256, 64, 16, 4, 2, 1)


def chunks(n: int) -> list[tuple[int, int]]:
    """(start, size) pieces covering n items, largest sizes first."""
    out = []
    start = 0
    for size in CHUNKS:
        while n - start >= size:
            out.append((start, size))
            start += size
    return out


def _values(width: int, n: int) -> str:
    row = f"({', '.join('?' * width)})"
    return ", ".join([row] * n)


def _sized(template: str, width: int) -> dict[int, str]:
    return {n: template.format(values=_values(width, n)) for n in CHUNKS}


# Python's sqlite3 (3.11) binds a None through its adapter lookup, which raises and clears
# an AttributeError each time: ~0.2 us, twice an int's whole cost. Most journal rows hold
# a few NULLs (every stage row's error), so the nullable columns, but for the payload, are
# bound as a value of another type than the column ever holds, which SQLite's NULLIF turns
# back into NULL: an int for a text column (no string equals -1, not even "-1"), "" for a
# number column (no number equals ""). Every other value, "" in a text column included,
# is stored as given.
_NO_TEXT = -1
_NO_NUMBER = ""
_JOURNAL_ROW = (
    "(?, ?, NULLIF(?, ''), NULLIF(?, -1), ?, ?, ?, NULLIF(?, -1), ?, "
    "NULLIF(?, -1), NULLIF(?, -1), NULLIF(?, ''))"
)
_INSERT_ROWS = {
    n: f"INSERT INTO transitions ({STORED_FIELDS}) VALUES {', '.join([_JOURNAL_ROW] * n)}"
    for n in CHUNKS
}
# A new run has no output, error, pause or cancel yet, and its input goes to `run_inputs`
# (literals, not parameters); its optional columns are bound as `_NO_TEXT` / `_NO_NUMBER`
# for None (`Create._bound`).
_RUN_ROW = (
    "(?, ?, ?, ?, ?, ?, ?, NULL, NULL, NULL, NULL, NULLIF(?, -1), ?, ?, ?, NULLIF(?, -1), "
    "NULLIF(?, -1), NULLIF(?, ''), 0, NULLIF(?, -1), ?, ?, NULLIF(?, ''))"
)
_CREATE_ROWS = {
    n: f"INSERT INTO runs ({_RUN_COLUMNS}) VALUES {', '.join([_RUN_ROW] * n)} "
    "ON CONFLICT DO NOTHING"
    for n in CHUNKS
}
_INPUT_ROWS = {
    n: f"INSERT OR REPLACE INTO run_inputs (run_id, input) VALUES {', '.join(['(?, ?)'] * n)}"
    for n in CHUNKS
}


def append(
    rows: Rows, run_id: str, first_seq: int, transitions: Sequence[NewTransition], now: float
) -> None:
    """Add `transitions` as journal rows numbered from `first_seq + 1`.

    A `started` or `completed` transition with nothing of its own (no payload, no error),
    for the stage after the one of the transition before it, is folded into that one's row:
    a stage commit then inserts one row, not two. `expand` gives it back unchanged.
    """
    if len(transitions) == 2:  # a stage commit, nearly always: one row, built at once
        (event, stage_index, stage_path, attempt, payload, error), after = transitions
        if (
            after[0] in FOLDED
            and after[4] is None
            and after[5] is None
            and after[1] == (0 if stage_index is None else stage_index + 1)
        ):
            rows.append(
                (
                    run_id,
                    first_seq + 1,
                    _NO_NUMBER if stage_index is None else stage_index,
                    _NO_TEXT if stage_path is None else stage_path,
                    event,
                    attempt,
                    payload,
                    _NO_TEXT if error is None else error,
                    now,
                    after[0],
                    _NO_TEXT if after[2] is None else after[2],
                    after[3],
                )
            )
            return
    _append_each(rows, run_id, first_seq, transitions, now)


def _append_each(
    rows: Rows, run_id: str, first_seq: int, transitions: Sequence[NewTransition], now: float
) -> None:
    """`append`, a transition at a time (any number of them)."""
    seq = first_seq
    last: tuple[Any, ...] | None = None  # this write's last row, if nothing is folded into it
    follows = 0  # the stage index a row folded into `last` must have
    for event, stage_index, stage_path, attempt, payload, error in transitions:
        seq += 1
        if (
            last is not None
            and event in FOLDED
            and payload is None
            and error is None
            and stage_index == follows
        ):
            rows[-1] = (*last[:9], event, _NO_TEXT if stage_path is None else stage_path, attempt)
            last = None
            continue
        follows = 0 if stage_index is None else stage_index + 1
        last = (
            run_id,
            seq,
            _NO_NUMBER if stage_index is None else stage_index,
            _NO_TEXT if stage_path is None else stage_path,
            event,
            attempt,
            payload,
            _NO_TEXT if error is None else error,
            now,
        )
        rows.append((*last, _NO_TEXT, _NO_TEXT, _NO_NUMBER))


def expand(rows: Sequence[Sequence[Any]]) -> list[TransitionRecord]:
    """Stored rows (`STORED_FIELDS`) as the transitions they hold, in order."""
    out = []
    for r in rows:
        out.append(TransitionRecord(*r[:9]))
        if r[9] is not None:
            index = 0 if r[2] is None else r[2] + 1
            out.append(
                TransitionRecord(r[0], r[1] + 1, index, r[10], r[9], r[11], None, None, r[8])
            )
    return out


def insert_rows(conn: sqlite3.Connection, rows: Rows) -> None:
    """Insert journal rows, a chunk per statement."""
    for start, size in chunks(len(rows)):
        # flattened in C (chain.from_iterable), not by a comprehension
        conn.execute(_INSERT_ROWS[size], list(chain.from_iterable(rows[start : start + size])))


class GuardMissed(Exception):
    """A batched write did not apply: redo the batch one write at a time."""


def _apply_chunked(
    conn: sqlite3.Connection,
    sql: dict[int, str],
    params: list[tuple[Any, ...]],
    lead: tuple[Any, ...],
) -> int:
    """Run `sql` over `params` a chunk at a time; the number of rows changed."""
    changed = 0
    for start, size in chunks(len(params)):
        flat = [*lead, *chain.from_iterable(params[start : start + size])]
        changed += conn.execute(sql[size], flat).rowcount
    return changed


class Create:
    """Insert a new run and its first journal rows, unless its id or idempotency key is
    taken. Result: (True, the row written), or (False, the row that exists)."""

    __slots__ = ("run",)

    _many: ClassVar[dict[int, str]] = _CREATE_ROWS

    def __init__(self, run: NewRun) -> None:
        self.run = run

    def values(self, now: float) -> tuple[Any, ...]:
        run = self.run
        return (
            run.run_id,
            run.pipeline,
            run.pipeline_version,
            run.fingerprint,
            run.status,
            run.stage_index,
            len(run.transitions),
            run.input,
            None,  # output
            None,  # error
            None,  # pause
            run.parent_run_id,
            run.root_run_id,
            run.run_kind,
            run.depth,
            run.idempotency_key,
            run.lease_owner,
            run.lease_expires,
            0,  # cancel_requested
            run.replay_of,
            now,
            now,
            run.wake_at,
        )

    @staticmethod
    def _bound(v: tuple[Any, ...]) -> tuple[Any, ...]:
        """`values` as `_RUN_ROW` binds them."""
        return (
            *v[:7],
            _NO_TEXT if v[11] is None else v[11],  # parent_run_id
            v[12],
            v[13],
            v[14],
            _NO_TEXT if v[15] is None else v[15],  # idempotency_key
            _NO_TEXT if v[16] is None else v[16],  # lease_owner
            _NO_NUMBER if v[17] is None else v[17],  # lease_expires
            _NO_TEXT if v[19] is None else v[19],  # replay_of
            v[20],
            v[21],
            _NO_NUMBER if v[22] is None else v[22],  # wake_at
        )

    def __call__(self, conn: sqlite3.Connection, rows: Rows) -> tuple[bool, Any]:
        now = time.time()
        values = self.values(now)
        run = self.run
        if conn.execute(self._many[1], self._bound(values)).rowcount == 1:
            conn.execute(_INPUT_ROWS[1], (run.run_id, run.input))
            append(rows, run.run_id, 0, run.transitions, now)
            return True, values
        # Nothing inserted: an existing id or idempotency key. Return what exists.
        if run.idempotency_key is not None:
            row = conn.execute(
                f"SELECT {RUN_FIELDS} FROM runs WHERE idempotency_key = ?", (run.idempotency_key,)
            ).fetchone()
            if row is not None:
                return False, row
        row = conn.execute(
            f"SELECT {RUN_FIELDS} FROM runs WHERE run_id = ?", (run.run_id,)
        ).fetchone()
        return False, row

    @classmethod
    def apply_many(
        cls, conn: sqlite3.Connection, ops: list[Any], now: float, rows: Rows
    ) -> list[Any]:
        values = [op.values(now) for op in ops]
        bound = cls._bound
        if _apply_chunked(conn, cls._many, [bound(v) for v in values], ()) != len(ops):
            raise GuardMissed()
        # Every run gets its row, None too: nothing left by a run of the same id can show.
        _apply_chunked(conn, _INPUT_ROWS, [(op.run.run_id, op.run.input) for op in ops], ())
        for op in ops:
            append(rows, op.run.run_id, 0, op.run.transitions, now)
        return [(True, v) for v in values]


# A step's guard: the run is running, leased by the driver, not asked to cancel, and its
# journal at the position the driver expects. `_ONE` for a single statement (parameters
# ?2 run id, ?5 owner, ?6 expected seq); `_MANY` for rows of a VALUES list `v`.
_GUARD_ONE = (
    "WHERE run_id = ?2 AND status = 'running' AND lease_owner = ?5 AND seq = ?6 "
    "AND cancel_requested = 0"
)
_GUARD_MANY = (
    "FROM (VALUES {values}) AS v WHERE runs.run_id = v.column1 "
    "AND runs.status = 'running' AND runs.lease_owner = v.column4 "
    "AND runs.seq = v.column5 AND runs.cancel_requested = 0"
)


class Step(msgspec.Struct, gc=False):
    """A running run's move to its next stage, guarded by its owner and its journal
    position (and no cancel asked). Result: the new seq, or None if the guard failed.

    A msgspec Struct without GC tracking: one is made per stage commit, and a Struct is
    built in C (no Python `__init__` frame) and never walked by the garbage collector (it
    holds strings, numbers and a list of tuples, so it cannot be part of a cycle).
    """

    run_id: str
    owner: str
    seq: int
    stage_index: int
    transitions: Sequence[NewTransition]

    # `_one` numbers its parameters as `_many` orders its VALUES columns (after the commit
    # time): one `_params` serves both.
    _one: ClassVar[str] = (
        "UPDATE runs SET updated_at = ?1, seq = ?3, stage_index = ?4 " + _GUARD_ONE
    )
    _many: ClassVar[dict[int, str]] = _sized(
        "UPDATE runs SET updated_at = ?, seq = v.column2, stage_index = v.column3 " + _GUARD_MANY,
        5,
    )

    def _params(self) -> tuple[Any, ...]:
        return (
            self.run_id,
            self.seq + len(self.transitions),
            self.stage_index,
            self.owner,
            self.seq,
        )

    def __call__(self, conn: sqlite3.Connection, rows: Rows) -> Any:
        now = time.time()
        if conn.execute(self._one, (now, *self._params())).rowcount != 1:
            return None
        append(rows, self.run_id, self.seq, self.transitions, now)
        return self._result(now)

    def _result(self, now: float) -> Any:
        return self.seq + len(self.transitions)

    @classmethod
    def apply_many(
        cls, conn: sqlite3.Connection, ops: list[Any], now: float, rows: Rows
    ) -> list[Any]:
        if _apply_chunked(conn, cls._many, [op._params() for op in ops], (now,)) != len(ops):
            raise GuardMissed()
        for op in ops:
            append(rows, op.run_id, op.seq, op.transitions, now)
        return [op._result(now) for op in ops]


class Finish(Step, gc=False):
    """A running run's last stage done: the run succeeds with `output`, its lease let go.
    Guarded as a `Step`. Result: (the new seq, the commit time), or None."""

    output: str | None

    _one: ClassVar[str] = (
        "UPDATE runs SET updated_at = ?1, seq = ?3, stage_index = ?4, status = 'succeeded', "
        "output = ?7, lease_owner = NULL, lease_expires = NULL " + _GUARD_ONE
    )
    _many: ClassVar[dict[int, str]] = _sized(
        "UPDATE runs SET updated_at = ?, seq = v.column2, stage_index = v.column3, "
        "status = 'succeeded', output = v.column6, lease_owner = NULL, lease_expires = NULL "
        + _GUARD_MANY,
        6,
    )

    def _params(self) -> tuple[Any, ...]:
        return (*super()._params(), self.output)

    def _result(self, now: float) -> Any:
        return (self.seq + len(self.transitions), now)


BATCHED: frozenset[type] = frozenset({Create, Step, Finish})
"""Kinds of write a batch applies together (kind by kind, within each stretch of the batch
between two writes of other kinds)."""
