"""The `Store` protocol: everything the engine asks of a database, and the rows it gets back.

Records carry payloads as JSON text; decoding into user types is the engine's job, since only
the engine knows the pipeline's annotations. Every state change is a guarded update: the
database, not Python, decides which of two racing writers wins.
"""

from __future__ import annotations

from collections.abc import Awaitable, Collection, Sequence
from typing import Any, Literal, NamedTuple, Protocol

import msgspec

RunStatus = Literal["pending", "running", "paused", "succeeded", "failed", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
SETTLED: frozenset[str] = TERMINAL | {"paused"}
ALL_STATUSES: frozenset[str] = SETTLED | {"pending", "running"}


# The records are msgspec structs, not dataclasses: a frozen dataclass's generated
# `__init__` sets each field through `object.__setattr__` (23 Python-level calls for a run
# row), and every run makes a few of these. They hold only strings and numbers, so they
# need not be tracked by the garbage collector either (`gc=False`).


class RunRecord(msgspec.Struct, frozen=True, gc=False):
    """A run row as stored."""

    run_id: str
    pipeline: str
    pipeline_version: str
    fingerprint: str
    status: str
    stage_index: int
    seq: int
    input: str | None
    output: str | None
    error: str | None
    pause: str | None
    parent_run_id: str | None
    root_run_id: str
    run_kind: str
    depth: int
    idempotency_key: str | None
    lease_owner: str | None
    lease_expires: float | None
    cancel_requested: bool
    replay_of: str | None
    created_at: float
    updated_at: float
    wake_at: float | None


class TransitionRecord(msgspec.Struct, frozen=True, gc=False):
    """A journal row as stored."""

    run_id: str
    seq: int
    stage_index: int | None
    stage_path: str | None
    event: str
    attempt: int
    payload: str | None
    error: str | None
    at: float


class NewTransition(NamedTuple):
    """A journal row to append; the store assigns `seq` and `at`. (A NamedTuple: one is
    made per stage, and a tuple is the cheapest thing Python builds.)"""

    event: str
    stage_index: int | None = None
    stage_path: str | None = None
    attempt: int = 0
    payload: str | None = None
    error: str | None = None


class Guard(msgspec.Struct, frozen=True):
    """What must hold of a run row for an update to apply."""

    statuses: tuple[str, ...]
    """The run's status must be one of these."""
    owner: str | None = None
    """If set, the run's lease must belong to this owner (fencing off a stale driver)."""
    seq: int | None = None
    """If set, the journal must not have moved since this sequence number was read."""
    not_cancel_requested: bool = False
    """If set, the update fails once somebody has asked for the run to be cancelled."""


RUN_COLUMNS: frozenset[str] = frozenset(
    {
        "status",
        "stage_index",
        "output",
        "error",
        "pause",
        "lease_owner",
        "lease_expires",
        "cancel_requested",
        "input",
        "fingerprint",
        "pipeline_version",
        "wake_at",
    }
)
"""Columns an update may set (anything else is refused; no SQL is built from user strings)."""


class NewRun(msgspec.Struct):
    """A run to insert, with its first journal rows."""

    run_id: str
    pipeline: str
    pipeline_version: str
    fingerprint: str
    status: str
    input: str | None
    root_run_id: str
    parent_run_id: str | None = None
    run_kind: str = "root"
    depth: int = 0
    idempotency_key: str | None = None
    lease_owner: str | None = None
    lease_expires: float | None = None
    stage_index: int = 0
    replay_of: str | None = None
    wake_at: float | None = None
    transitions: list[NewTransition] = msgspec.field(default_factory=list)


class PrunePage(NamedTuple):
    """One step of `Store.prune`."""

    deleted: int
    """Runs deleted (roots and their children)."""
    roots: list[str]
    """The roots whose trees were deleted."""
    last: str | None
    """The last run looked at (the `after` of the next step); None: nothing more to see."""


class JournalPage(NamedTuple):
    """One step of `Store.journal_after`."""

    rows: list[TransitionRecord]
    position: int
    """Where the next step starts: after every row this one looked at."""
    more: bool
    """True when the step stopped at its limit: more rows are committed already."""


class RunJournal(NamedTuple):
    """One step of `Store.run_journal`."""

    holder: int | None
    """The position of the stored row that holds the row `after_seq` (None: there is no such
    row, or `after_seq` is 0). Positions are never given twice, so another one means the
    run was pruned and its id used again."""
    rows: list[TransitionRecord]
    """The run's rows after `after_seq`, in order."""
    end: int | None
    """The position of the stored row that holds the last of `rows` (None: no rows)."""


class Store(Protocol):
    """Durable storage of runs and their journals."""

    max_payload: int
    """The largest stage output, in bytes of JSON, that a row can hold (known once open).
    A larger output fails its stage: its commit would fail at every attempt."""

    async def open(self) -> None:
        """Open connections and apply (or, read-only, verify) migrations."""

    async def close(self) -> None:
        """Flush pending writes and close. Writes submitted before close are committed."""

    async def create_run(self, run: NewRun) -> tuple[bool, RunRecord]:
        """Insert `run` unless its id or idempotency key exists; returns (created, row)."""

    async def update_run(
        self,
        run_id: str,
        guard: Guard,
        transitions: Sequence[NewTransition],
        values: dict[str, Any] | None = None,
    ) -> int | None:
        """Append `transitions` and set `values` if `guard` holds; the new seq, else None."""

    def step_run(
        self,
        run_id: str,
        owner: str,
        seq: int,
        stage_index: int,
        transitions: Sequence[NewTransition],
    ) -> Awaitable[int | None]:
        """The hot path: a running run moves to stage `stage_index`. Applies (appending
        `transitions`, giving the new seq) only if the run is running, leased by `owner`,
        not asked to cancel, and its journal is at `seq`; else None. The new seq is known
        in advance, so a store can apply many runs' steps in one statement. (An awaitable
        rather than a coroutine, so that a store may hand back its own future.)"""

    async def finish_run(
        self,
        run_id: str,
        owner: str,
        seq: int,
        stage_index: int,
        transitions: Sequence[NewTransition],
        output: str | None,
    ) -> float | None:
        """A running run's last stage is done: it succeeds with `output` and its lease is
        let go. Guarded as `step_run`; returns the commit time (the row's `updated_at`), or
        None if the guard failed."""

    async def settle_run(
        self,
        run_id: str,
        guard: Guard,
        transitions: Sequence[NewTransition],
        values: dict[str, Any] | None = None,
    ) -> RunRecord | None:
        """`update_run` that returns the whole row as committed (or None), for the commit
        that settles a run: whoever waits for the run gets it without reading it back."""

    async def renew_leases(self, owner: str, expires: float) -> int:
        """Extend every lease `owner` holds on an active run; returns how many."""

    async def release_leases(self, owner: str) -> int:
        """Drop `owner`'s leases (clean shutdown) so another engine may continue at once."""

    async def cancel_requests(self, owner: str) -> list[str]:
        """Ids of the active runs `owner` holds that someone has asked to cancel."""

    async def get_run(self, run_id: str) -> RunRecord | None:
        """One run row, or None."""

    async def get_run_by_key(self, idempotency_key: str) -> RunRecord | None:
        """The run started with this idempotency key, or None."""

    async def list_runs(
        self,
        *,
        status: str | None = None,
        pipeline: str | None = None,
        parent_run_id: str | None = None,
        after: str | None = None,
        limit: int = 100,
        newest_first: bool = False,
    ) -> list[RunRecord]:
        """Runs in run id order (creation order), after `after`, at most `limit`; with
        `newest_first`, in the reverse order, before `after`."""

    async def history(self, run_id: str, after_seq: int = 0) -> list[TransitionRecord]:
        """The run's journal rows after `after_seq`, in order."""

    async def run_journal(self, run_id: str, after_seq: int = 0) -> RunJournal:
        """The run's journal rows after `after_seq`, with the positions that tell this run
        from another run given its id later (for live events)."""

    async def stage_results(self, run_id: str) -> list[TransitionRecord]:
        """The rows a driver needs to continue a run: created, succeeded, reused, skipped,
        retrying, retried, resumed, failed, sleeping, the last paused row (for gates'
        expiries) and the compensation rows."""

    async def active_runs(
        self, after: str | None = None, limit: int = 1000, exclude_owner: str | None = None
    ) -> list[RunRecord]:
        """Pending or running runs in run id order after `after` (recovery scans these),
        leaving out those leased by `exclude_owner`."""

    async def tree(self, root_run_id: str) -> list[RunRecord]:
        """Every run of the tree under `root_run_id`, the root included."""

    async def journal_end(self) -> int:
        """The journal position after its last committed row (0 if it is empty)."""

    async def journal_position(self, at: float) -> int:
        """The journal position just before the first row stamped at or after `at` (or the
        end). Stamps follow commit order while the wall clock does not go back, so the
        rows after it are those committed from that time on."""

    async def journal_after(
        self, position: int, *, root_run_id: str | None = None, limit: int = 500
    ) -> JournalPage:
        """Journal rows committed after `position`, in commit order (every run's, or those
        of the tree under `root_run_id`), for live events across processes. At most about
        `limit` stored rows are looked at (a folded row gives two transitions)."""

    async def due_runs(
        self,
        now: float,
        limit: int = 500,
        *,
        pipelines: Collection[str] | None = None,
        after: tuple[float, str] | None = None,
    ) -> list[RunRecord]:
        """Pending runs whose `wake_at` has come, and paused runs whose pause expired, in
        (wake_at, run_id) order: only those of `pipelines` (names) if given, and only those
        after the cursor `after` (the last one's wake_at and run_id) if given."""

    async def next_wake(self) -> float | None:
        """The earliest `wake_at` of any pending or paused run."""

    async def count_stage_executions(self, root_run_id: str) -> dict[str, tuple[int, int]]:
        """Per run of a whole tree: its stage executions (its journal's `started` and
        `retrying` rows) and the journal position (seq) they were counted up to, read
        together."""

    async def spend(
        self, root_run_id: str, name: str, amount: float, limit: float | None
    ) -> float | None:
        """Add `amount` to a tree's named budget unless that passes `limit`; the new total,
        or None when refused."""

    async def open_cascades(self, before: float, limit: int = 100) -> list[tuple[str, float]]:
        """Runs whose unfinished children are still to be cancelled, as (run_id, since),
        oldest first, only those that ended before `before`. An update that sets a run's
        status to failed or cancelled while the run has unfinished (pending, running or
        paused) children records the run here with the commit time, in the same
        transaction; `clear_cascade` removes it."""

    async def clear_cascade(self, run_id: str, upto: float | None = None) -> None:
        """Forget the run's entry in `open_cascades` (only if recorded at or before `upto`,
        when given: an entry from a later ending stays)."""

    async def prune(
        self,
        before: float,
        statuses: tuple[str, ...],
        *,
        after: str | None = None,
        limit: int = 2000,
    ) -> PrunePage:
        """Look at the next `limit` runs (ids after `after`, in id order) for roots that
        have one of `statuses` and were last updated before `before`, and delete the trees
        of those whose whole tree does (every run of it). The looking is a read: only the
        deletes hold the write lock."""
