"""Live events: `subscribe` streams journal rows as they are committed, by any process.

Everything goes through the database, so a subscriber sees the transitions of runs driven
by other processes exactly as those of its own. Two ways of following the journal:

- One run (`run_id=`): by sequence number. A run's journal rows are numbered 1, 2, 3, ...
  without gaps, in commit order, so polling `seq > last` is exact: nothing is missed,
  nothing comes twice, whatever the clocks do. Each poll also reads where the row numbered
  `last` is in the journal (its rowid, never given twice): if it is gone or elsewhere, the
  run was pruned, and a run started again under its id is followed from its first row.
- A tree (`root_run_id=`) or every run: by the journal's position (its rowid), which is
  commit order: SQLite gives each new row the next rowid, one transaction writes at a
  time, and prune never frees the largest. So this is exact too: a row is delivered once,
  in commit order, however long its transaction ran and whatever the clocks did, and each
  poll reads only what was committed since the last.

No task is started: the generator polls in the consumer's task, so leaving the `async for`
(or cancelling the consumer) ends it on the spot.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

import anyio
import msgspec

from ..store import codec
from ..store.base import SETTLED, Store, TransitionRecord
from .models import StageError, Transition

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["subscribe"]

PAGE = 500
"""Journal rows read per query."""

_EPSILON = 1e-6
"""`Transition.at` is a datetime (microseconds); the stored time is finer. A `since` taken
from a transition therefore means "from up to a microsecond before"."""


def to_transition(r: TransitionRecord) -> Transition:
    """A journal row as the public `Transition` (as `Engine.history` returns it)."""
    return Transition(
        run_id=r.run_id,
        seq=r.seq,
        stage_index=r.stage_index,
        stage_path=r.stage_path,
        event=r.event,
        attempt=r.attempt,
        payload=codec.decode_any(r.payload),
        error=msgspec.json.decode(r.error, type=StageError) if r.error else None,
        at=datetime.fromtimestamp(r.at, UTC),
    )


async def subscribe(
    engine: Engine,
    *,
    run_id: str | None = None,
    root_run_id: str | None = None,
    since: datetime | float | None = None,
    after_seq: int | None = None,
    poll_interval: float = 0.05,
    until_settled: bool = False,
) -> AsyncGenerator[Transition, None]:
    """Journal rows as they are committed, in commit order, by this process or any other.

    Filters: `run_id` (one run), `root_run_id` (a root and all its descendants), neither
    (every run). Both: the rows of `run_id`, provided it belongs to that tree (the stream
    ends at once if it does not).

    Where the stream starts:
    - by default, right after what is committed when iteration begins (the first
      `__anext__`, not the call: the generator is lazy). For one run, that is after the
      run's current last row (from its first row if the run does not exist yet).
    - `since` (a timezone-aware datetime, or Unix seconds): for one run, its rows stamped
      at or after it; for a tree or every run, the rows committed from the first row
      stamped at or after it (the same, as long as the wall clock never went back),
      before the subscription or not.
    - `after_seq` (with `run_id`): rows of that run numbered above `after_seq`.

    A snapshot and a stream that miss nothing and repeat nothing:
    - one run: `rows = await engine.history(run_id)`, then
      `subscribe(engine, run_id=run_id, after_seq=rows[-1].seq if rows else 0)`. The
      journal of a run is numbered without gaps, so this is exact.
    - a tree or every run: take `t0 = time.time()` (minus a margin for clock adjustments)
      before the snapshot, then `subscribe(..., since=t0)` and skip the rows whose
      `(run_id, seq)` the snapshot already holds.

    `until_settled=True` (with `run_id`, or `root_run_id` for the root) ends the stream
    once the run is paused, succeeded, failed or cancelled and every row up to that state
    was delivered: after its `completed`, final `failed` or `cancelled` row, or its
    `paused` row. A run that is already settled when the subscription starts ends it at
    once. Without it, the stream runs until the consumer stops iterating.

    The journal is polled every `poll_interval` seconds (at once again while a backlog is
    being read).
    Errors of the store (for example the engine being closed) end the stream with the
    error. To close the stream at once when leaving the loop early (`break`), iterate it
    inside `async with contextlib.aclosing(subscribe(...)) as events:`; otherwise Python
    closes it when it is garbage collected.
    """
    if poll_interval <= 0:
        raise ValueError("poll_interval must be positive")
    if after_seq is not None:
        if run_id is None:
            raise ValueError("after_seq numbers the rows of one run: pass run_id as well")
        if since is not None:
            raise ValueError("pass either since or after_seq, not both")
        if after_seq < 0:
            raise ValueError("after_seq must not be negative")
    if until_settled and run_id is None and root_run_id is None:
        raise ValueError("until_settled needs a run: pass run_id or root_run_id")
    min_at: float | None = None
    if since is not None:
        min_at = (since.timestamp() if isinstance(since, datetime) else float(since)) - _EPSILON

    store = engine.store
    follower: _Follower
    if run_id is not None:
        follower = _RunFollower(store, run_id, root_run_id, min_at, after_seq)
    else:
        follower = _JournalFollower(store, root_run_id, min_at, until_settled)
    await follower.start()
    check = until_settled
    while True:
        rows = await follower.poll()
        for row in rows:
            yield to_transition(row)
        if follower.finished:
            return
        if rows:
            check = until_settled
        if check:
            if await follower.settled():
                return
            check = False
        if not follower.more:
            await anyio.sleep(poll_interval)


class _Follower(Protocol):
    """Reads the next rows to deliver; no I/O outside `start`, `poll` and `settled`."""

    more: bool = False
    """True when `poll` stopped at a full page: poll again without waiting."""
    finished: bool = False
    """True when nothing will ever match (the run is not in the given tree)."""

    async def start(self) -> None:
        """Fix where the stream begins."""
        ...

    async def poll(self) -> list[TransitionRecord]:
        """The next rows, in order."""
        ...

    async def settled(self) -> bool:
        """True once the followed run is paused or finished and all its rows are out."""
        ...


async def _start_seq(store: Store, run_id: str, min_at: float | None) -> int:
    """The last row of `run_id` before the stream: its current last row, or with `min_at`
    the last row stamped before it."""
    record = await store.get_run(run_id)
    current = record.seq if record is not None else 0
    if min_at is None:
        return current
    # Read after the run row: a row committed in between is then found here.
    for row in await store.history(run_id):
        if row.at >= min_at:
            return row.seq - 1
    return current


async def _is_settled(store: Store, run_id: str, delivered: int) -> bool:
    record = await store.get_run(run_id)
    return record is not None and record.status in SETTLED and record.seq <= delivered


class _RunFollower(_Follower):
    """One run, by sequence number."""

    def __init__(
        self,
        store: Store,
        run_id: str,
        root_run_id: str | None,
        min_at: float | None,
        after_seq: int | None,
    ) -> None:
        self.store = store
        self.run_id = run_id
        self.root_run_id = root_run_id
        self.min_at = min_at
        self.last = after_seq or 0
        self.after_seq = after_seq
        self.holder: int | None = None
        """The journal position of the row numbered `last` (None while unknown): the row
        found there later is another if the run was pruned and its id used again."""

    async def start(self) -> None:
        if self.after_seq is None:
            self.last = await _start_seq(self.store, self.run_id, self.min_at)
        if self.last:
            self.holder = (await self.store.run_journal(self.run_id, self.last)).holder

    async def poll(self) -> list[TransitionRecord]:
        if self.root_run_id is not None:
            record = await self.store.get_run(self.run_id)
            if record is None:
                return []
            if record.root_run_id != self.root_run_id:
                self.finished = True
                return []
            self.root_run_id = None  # checked once: a run never changes trees
        page = await self.store.run_journal(self.run_id, self.last)
        if self.holder is None:
            self.holder = page.holder  # an `after_seq` the run had not reached at the start
        elif page.holder != self.holder:
            # Pruned (and maybe started again under its id): a fresh run, from its first row.
            self.last, self.holder = 0, None
            page = await self.store.run_journal(self.run_id, 0)
        if page.rows:
            self.last, self.holder = page.rows[-1].seq, page.end
        return page.rows

    async def settled(self) -> bool:
        return await _is_settled(self.store, self.run_id, self.last)


class _JournalFollower(_Follower):
    """A tree or every run, by journal position (commit order)."""

    def __init__(
        self, store: Store, root_run_id: str | None, min_at: float | None, watch_root: bool
    ) -> None:
        self.store = store
        self.root_run_id = root_run_id
        self.since = min_at
        self.watch_root = watch_root
        self.position = 0
        self.root_seq = 0
        """For `until_settled`: the root's rows up to this seq were delivered (or came
        before the stream)."""

    async def start(self) -> None:
        if self.since is None:
            self.position = await self.store.journal_end()
        else:
            self.position = await self.store.journal_position(self.since)
        # After the position: a root row committed in between is then either counted here
        # or delivered, never neither (or until_settled would wait for it for ever).
        if self.watch_root and self.root_run_id is not None:
            self.root_seq = await _start_seq(self.store, self.root_run_id, self.since)

    async def poll(self) -> list[TransitionRecord]:
        page = await self.store.journal_after(
            self.position, root_run_id=self.root_run_id, limit=PAGE
        )
        self.position, self.more = page.position, page.more
        root = self.root_run_id
        for r in page.rows:
            if r.run_id == root and r.seq > self.root_seq:
                self.root_seq = r.seq
        return page.rows

    async def settled(self) -> bool:
        assert self.root_run_id is not None
        return await _is_settled(self.store, self.root_run_id, self.root_seq)
