"""`Timers`: what happens to runs by itself when their time comes.

A parked run (a durable sleep, a scheduled start) and a pause that can expire both carry a
`wake_at` in their row. One task per engine waits, on the engine's clock, for the earliest
`wake_at` in the database and then acts, each action a guarded update so that of several
workers exactly one acts: a parked run is taken and driven; an expired pause is answered
with its default or fails the run with `PauseExpired`.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import anyio

from ..errors import PauseExpired, PipelineChanged, PipelineNotRegistered, WaystationError
from ..store import codec
from ..store.base import Guard, NewTransition, RunRecord
from .models import StageError, decode_pauses
from .runner import expiry_of

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger("waystation")

_RECHECK = 1.0
"""Seconds (real time) between looks at the database for wake-ups set by other processes."""

_PAGE = 500
"""Due runs read at a time."""


class Timers:
    """Wakes parked runs and expires pauses for one engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._changed = anyio.Event()

    def changed(self) -> None:
        """A wake-up time was set here: look again now rather than at the next poll."""
        self._changed.set()

    async def run(self) -> None:
        """The timer loop (runs in the engine's task group until it closes)."""
        engine = self.engine
        clock = engine.clock
        while True:
            self._changed = anyio.Event()
            try:
                now = clock.time()
                acted = await self.fire(now)
                nxt = await engine.store.next_wake()
                if nxt is not None and nxt <= now and not acted:
                    # Due, and all left as they were: another engine's pipeline, or a
                    # wake-up that failed. Not again at once (that would spin), but at
                    # the recheck. (Acted on some: more may be due past the batch.)
                    nxt = None
            except Exception:
                log.exception("timer check failed; will try again")
                nxt = None
            await self._sleep(nxt if nxt is not None else clock.time() + 3600.0)

    async def _sleep(self, target: float) -> None:
        """Until `target` on the clock, a wake-up set here, or a real-time recheck (for
        wake-ups set by other processes), whichever comes first."""
        recheck = min(_RECHECK, self.engine.poll_interval * 5)
        async with anyio.create_task_group() as tg:

            async def due() -> None:
                await self.engine.clock.sleep_until(target)
                tg.cancel_scope.cancel()

            async def changed() -> None:
                await self._changed.wait()
                tg.cancel_scope.cancel()

            async def later() -> None:
                await anyio.sleep(recheck)
                tg.cancel_scope.cancel()

            for wait in (due, changed, later):
                tg.start_soon(wait)

    async def fire(self, now: float) -> int:
        """Act on every run due at `now`; returns how many were acted on."""
        engine = self.engine
        acted = 0
        if engine._closing:
            return 0
        # Only runs of pipelines registered here (those of others are for engines that
        # have them), and page after page: due runs this engine cannot act on (a changed
        # version, state that no longer loads) must not hold back the ones after them.
        names = {name for name, _ in engine._pipelines}
        after: tuple[float, str] | None = None
        while True:
            page = await engine.store.due_runs(now, _PAGE, pipelines=names, after=after)
            for record in page:
                if record.run_id in engine._unloadable:
                    continue  # said why once already
                try:
                    if record.status == "pending":
                        acted += await self._wake(record)
                    elif record.status == "paused":
                        acted += await self._expire(record, now)
                except PipelineNotRegistered:
                    continue  # an engine with this pipeline will act on it
                except WaystationError as exc:
                    engine._warn_once(
                        record.run_id, f"run {record.run_id}: timer not applied: {exc}"
                    )
            if len(page) < _PAGE or engine._closing:
                return acted
            last = page[-1]
            assert last.wake_at is not None
            after = (last.wake_at, last.run_id)

    async def _wake(self, record: RunRecord) -> int:
        engine = self.engine
        if record.run_id in engine._active:
            return 0
        p = engine._pipeline_of(record)
        # Before taking it, as resume does: a run whose stored values no longer decode
        # would be left taken and never driven.
        await self._loadable(p, record)
        seq = await engine.store.update_run(
            record.run_id,
            Guard(("pending",), seq=record.seq),
            [NewTransition("woke", record.stage_index, _stage_name(p, record.stage_index))],
            {
                "status": "running",
                "wake_at": None,
                "lease_owner": engine.owner,
                "lease_expires": time.time() + engine.lease_ttl,
            },
        )
        if seq is None:
            return 0  # another worker woke it
        log.info("run %s woke", record.run_id)
        await engine._continue(p, record.run_id)
        return 1

    async def _expire(self, record: RunRecord, now: float) -> int:
        engine = self.engine
        p = engine._pipeline_of(record)
        pauses = decode_pauses(record.pause)
        due = [
            q
            for q in pauses
            if q.run_id == record.run_id and q.expires_at is not None and q.expires_at <= now
        ]
        if not due:
            return 0
        pause = min(due, key=lambda q: q.expires_at or 0.0)
        gate = p.stage_at(pause.stage_index, pause.stage_path)
        on_expire: Any = gate.expiry[1] if gate.expiry is not None else "fail"
        if isinstance(on_expire, str) and on_expire == "fail":
            err = PauseExpired(
                f"pause {pause.kind!r} at stage {pause.stage_path or pause.stage_name!r} "
                f"expired unanswered"
            )
            info = StageError(
                type=f"{type(err).__module__}.{type(err).__qualname__}",
                message=str(err),
                stage_index=pause.stage_index,
                stage_name=pause.stage_name,
            )
            stored = codec.encode(info).decode()
            expired = NewTransition("expired", pause.stage_index, pause.stage_path)
            if p.on_failure == "compensate":
                await self._loadable(p, record)  # a driver goes on with it (see _wake)
                # A failure like any other: its stages before the gate are undone first.
                # Committed as a compensation under way (as after a crash there), and
                # continued by a driver that finishes it and then fails the run.
                seq = await engine.store.update_run(
                    record.run_id,
                    Guard(("paused",), seq=record.seq),
                    [
                        expired,
                        NewTransition(
                            "compensating", pause.stage_index, pause.stage_name, error=stored
                        ),
                    ],
                    {
                        "status": "running",
                        "pause": None,
                        "wake_at": None,
                        "lease_owner": engine.owner,
                        "lease_expires": time.time() + engine.lease_ttl,
                    },
                )
                if seq is None:
                    return 0
                log.info("run %s: %s; compensating", record.run_id, err)
                await engine._continue(p, record.run_id)
                await engine._wake_ancestors(record)
                return 1
            seq = await engine.store.update_run(
                record.run_id,
                Guard(("paused",), seq=record.seq),
                [
                    expired,
                    NewTransition("failed", pause.stage_index, pause.stage_name, error=stored),
                ],
                {"status": "failed", "error": stored, "pause": None, "wake_at": None},
            )
            if seq is None:
                return 0
            log.info("run %s failed: %s", record.run_id, err)
            await engine._failed(record, time.time())
            if record.depth == 0:
                await engine._root_ended(record.run_id, "failed")
        else:
            await self._loadable(p, record)  # it goes on (see _wake)
            answer = engine._check_answer(record.run_id, p, pause, on_expire)
            transitions, values = engine._answer(record, p, pauses, pause, answer)
            transitions.insert(0, NewTransition("expired", pause.stage_index, pause.stage_path))
            remaining = [q for q in pauses if q.pause_id != pause.pause_id]
            values["wake_at"] = expiry_of(remaining, record.run_id)
            seq = await engine.store.update_run(
                record.run_id, Guard(("paused",), seq=record.seq), transitions, values
            )
            if seq is None:
                return 0
            log.info(
                "run %s: pause %s expired; went on with its default", record.run_id, pause.kind
            )
            if values.get("status") == "running":
                await engine._continue(p, record.run_id)
            elif record.depth == 0 and values.get("status") == "succeeded":
                await engine._root_ended(record.run_id, "succeeded")  # the gate was last
        await engine._wake_ancestors(record)
        return 1

    async def _loadable(self, p: Any, record: RunRecord) -> None:
        """`PipelineChanged` if the run's stored values no longer decode; such a run is
        then left alone by this engine (said once, not at every look)."""
        try:
            await self.engine._check_loadable(p, record)
        except PipelineChanged:
            self.engine._unloadable.add(record.run_id)
            raise


def _stage_name(p: Any, i: int) -> str | None:
    return p.stages[i].name if i < len(p.stages) else None
