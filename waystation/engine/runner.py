"""The stepper: drives one run through its stages, committing each transition before moving on.

Read `Driver.drive` top to bottom to see the life of a run. Every commit is a guarded update
(status running, lease ours, no cancel asked): if it fails, the run was taken from us (lease
expired and claimed elsewhere) or someone asked to cancel it, and we stop without writing.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import math
import time
import traceback
import typing
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import msgspec
import tenacity

from ..errors import (
    ParallelFailed,
    StageOutputError,
    StageTimeout,
    StoreError,
    WaystationError,
)
from ..store import codec
from ..store.base import Guard, NewTransition, RunRecord, Store, TransitionRecord
from .compose import run_composite
from .context import PauseSignal, SleepSignal, StageContext
from .models import Failed, Pause, StageError
from .pipeline import Binding, Pipeline, Slot, has_child_keys
from .stage import Stage

if TYPE_CHECKING:
    from .children import ChildRunner
    from .clock import Clock
    from .tracing import Tracing

log = logging.getLogger("waystation")

_SCALARS = (int, str, bool, type(None))
_PLAIN = frozenset((int, str, bool))

_transition: Callable[[tuple[Any, ...]], NewTransition] = functools.partial(
    tuple.__new__, NewTransition
)
"""A `NewTransition` from a tuple of all six fields, built in C."""


class _Lost(BaseException):
    """The run's row no longer matches our guard: stop driving, write nothing more."""


@dataclass(slots=True)
class RunState:
    """What a driver keeps in memory for one run: its input and the outputs so far."""

    run_id: str
    input: Any
    """The typed input (a dict of fields, or the pipeline's pinned input type)."""
    input_fields: dict[str, Any]
    stage_index: int
    values: list[Any]
    """Each finished stage's output, decoded as its return annotation (None if skipped)."""
    payloads: list[str | None]
    """The same outputs as stored JSON (for re-decoding into another annotation)."""
    answers: dict[int | str, list[str]] = field(default_factory=dict)
    """Resume answers per slot (stage index, or branch path), in the order given."""
    attempts: dict[int | str, int] = field(default_factory=dict)
    """Failed attempts so far per slot (from the journal's retrying rows)."""
    branch_payloads: dict[str, str | None] = field(default_factory=dict)
    """Stored outputs of finished parallel branches, by `group.branch` path."""
    sleeps: dict[int | str, list[float]] = field(default_factory=dict)
    """Committed wake-up times per slot, in order (sleep stages and `ctx.sleep`)."""
    compensating: str | None = None
    """The failure (as stored JSON) whose compensation is under way, after a crash."""
    compensated: set[int | str] = field(default_factory=set)
    """Stages (by index) and parallel branches (by path) whose compensation already ran
    (or failed): never run twice."""
    generations: dict[int, int] = field(default_factory=dict)
    """How often `engine.retry` restarted each stage (part of its children's keys)."""
    root_run_id: str = ""
    depth: int = 0
    chain: str = ""
    """Pipelines and stages from the root to this run, for error messages."""
    lineage: tuple[str, ...] = ()
    """Run ids of this run's ancestors, root first."""
    expiries: dict[str, float] = field(default_factory=dict)
    """When each gate pause this run committed expires (by pause id), from its last
    `paused` row: a gate that pauses again (its group entered again to take in a child's
    answer) keeps its first expiry rather than starting a new one."""
    old_child_keys: bool = False
    """Created before its parallel branches' children were keyed by branch (its `created`
    row has no `CHILD_KEYS` mark): a branch looks for its children under the old key too."""

    @classmethod
    def fresh(cls, pipeline: Pipeline, run_id: str, typed_input: Any) -> RunState:
        """State for a run that has not run any stage yet."""
        n = len(pipeline.stages)
        return cls(
            run_id,
            typed_input,
            _fields(pipeline, typed_input),
            0,
            [None] * n,
            [None] * n,
            root_run_id=run_id,
            chain=pipeline.name,
        )

    @classmethod
    def load(cls, pipeline: Pipeline, record: RunRecord, rows: list[TransitionRecord]) -> RunState:
        """Rebuild the state of a run from its row and its journal (after a crash or pause)."""
        _, typed = pipeline.decode_input(record.input or "{}")
        state = cls.fresh(pipeline, record.run_id, typed)
        state.stage_index = record.stage_index
        state.root_run_id = record.root_run_id
        state.depth = record.depth
        state.old_child_keys = True  # unless its `created` row says otherwise
        for row in rows:
            if row.event == "created":
                origin = codec.decode_any(row.payload) if row.payload is not None else None
                if isinstance(origin, dict) and "chain" in origin:
                    state.chain = origin["chain"]
                    state.lineage = tuple(origin.get("lineage", ()))
                if isinstance(origin, dict) and has_child_keys(origin):
                    state.old_child_keys = False
                continue
            i = row.stage_index
            if i is None or i >= len(pipeline.stages):
                continue
            stage = pipeline.stages[i]
            if stage.group is not None and row.stage_path != stage.name:
                state._load_branch(pipeline, i, row)
                continue
            if stage.group is not None and row.event == "retried":
                for slot in pipeline.branch_slots[i].values():
                    state.attempts.pop(slot.key, None)
            if row.event in ("succeeded", "reused") and stage.group is not None:
                continue  # a group's output is the union of its branches' rows
            if row.event in ("succeeded", "reused") and row.payload is not None:
                state.payloads[i] = row.payload
                state.values[i] = codec.decode(row.payload, pipeline.stages[i].returns)
            elif row.event == "skipped":
                state.payloads[i] = None
                state.values[i] = None
            elif row.event == "retrying":
                state.attempts[i] = max(state.attempts.get(i, 0), row.attempt)
            elif row.event == "retried":  # engine.retry: a fresh retry budget
                state.attempts.pop(i, None)
                state.generations[i] = state.generations.get(i, 0) + 1
                for pause_id in [k for k in state.expiries if _of_stage(k, stage.name)]:
                    del state.expiries[pause_id]  # a new attempt waits afresh
            elif row.event == "paused" and row.payload is not None:
                state._load_expiries(record.run_id, row.payload)
            elif row.event == "failed" and row.error is not None and i < record.stage_index:
                # A continue_on_error stage: its output is the failure.
                err = msgspec.json.decode(row.error, type=StageError)
                failed = Failed(stage=pipeline.stages[i].name, type=err.type, message=err.message)
                state.values[i] = failed
                state.payloads[i] = codec.encode(failed).decode()
            elif row.event == "resumed" and row.payload is not None:
                state.answers.setdefault(i, []).append(row.payload)
            elif row.event == "sleeping" and row.payload is not None:
                state.sleeps.setdefault(i, []).append(
                    float(codec.decode_any(row.payload)["wake_at"])
                )
            elif row.event == "compensating":
                state.compensating = row.error
            elif row.event in ("compensated", "compensation_failed"):
                state.compensated.add(i)
        return state

    def _load_expiries(self, run_id: str, payload: str) -> None:
        pauses = codec.decode_any(payload)
        for pause in pauses if isinstance(pauses, list) else []:
            if (
                isinstance(pause, dict)
                and pause.get("gate")
                and isinstance(pause.get("expires_at"), int | float)
                and pause.get("run_id") in (None, run_id)
            ):
                self.expiries.setdefault(pause["pause_id"], float(pause["expires_at"]))

    def _load_branch(self, pipeline: Pipeline, i: int, row: TransitionRecord) -> None:
        path = row.stage_path or ""
        name = path.split(".", 1)[-1]
        branch = next((b for b in pipeline.stages[i].group.branches if b.name == name), None)
        if branch is None:
            return
        if row.event in ("succeeded", "reused", "skipped"):
            results = self.values[i] if isinstance(self.values[i], dict) else {}
            self.values[i] = results
            payload = row.payload if row.event != "skipped" else None
            results[name] = codec.decode(payload, branch.returns) if payload else None
            self.branch_payloads[path] = payload
        elif row.event == "failed" and branch.continue_on_error and row.payload is not None:
            # A failure handed on (its `Failed` is the row's payload; a failure that failed
            # the group has none): the branch's output, as for a continue_on_error stage.
            results = self.values[i] if isinstance(self.values[i], dict) else {}
            self.values[i] = results
            results[name] = msgspec.json.decode(row.payload, type=Failed)
            self.branch_payloads[path] = row.payload
        elif row.event == "retrying":
            self.attempts[path] = max(self.attempts.get(path, 0), row.attempt)
        elif row.event == "resumed" and row.payload is not None:
            self.answers.setdefault(path, []).append(row.payload)
        elif row.event in ("compensated", "compensation_failed"):
            self.compensated.add(path)


def _of_stage(pause_id: str, stage_name: str) -> bool:
    """Whether a pause id (`path#n`) is of the stage or of one of its branches."""
    path = pause_id.split("#", 1)[0]
    return path == stage_name or path.startswith(f"{stage_name}.")


def expiry_of(pauses: list[Pause], run_id: str) -> float | None:
    """When the earliest of this run's own pauses expires (None: never). Pauses shown for
    children are the children's to expire."""
    times = [p.expires_at for p in pauses if p.expires_at is not None and p.run_id == run_id]
    return min(times) if times else None


def _finished(
    base: RunRecord, stage_index: int, seq: int, output: str | None, at: float
) -> RunRecord:
    """The row of a run created as `base` once it succeeded (the columns a finish sets)."""
    return msgspec.structs.replace(
        base,
        status="succeeded",
        stage_index=stage_index,
        seq=seq,
        output=output,
        lease_owner=None,
        lease_expires=None,
        updated_at=at,
    )


def _fields(pipeline: Pipeline, typed_input: Any) -> dict[str, Any]:
    if isinstance(typed_input, dict):
        return typed_input
    return {name: getattr(typed_input, name) for name in pipeline.inputs}


def error_info(exc: BaseException, stage: Stage | None, index: int | None) -> StageError:
    """A persistable description of `exc`."""
    tp = type(exc)
    name = tp.__qualname__ if tp.__module__ == "builtins" else f"{tp.__module__}.{tp.__qualname__}"
    return StageError(
        type=name,
        message=_message(exc),
        traceback="".join(traceback.format_exception(exc)),
        stage_index=index,
        stage_name=stage.name if stage is not None else None,
    )


def _message(exc: BaseException) -> str:
    """`str(exc)`, or a stand-in when the exception's own `__str__` fails: the failure must
    still be recorded (else the run stays running and the stage runs again and again)."""
    try:
        return str(exc)
    except Exception as err:
        try:
            why = repr(err)
        except Exception:
            why = type(err).__name__
        return f"<str() of {type(exc).__name__} failed: {why}>"


def error_json(exc: BaseException, stage: Stage | None, index: int | None) -> str:
    """`error_info` as the JSON a journal row stores."""
    return codec.encode(error_info(exc, stage, index)).decode()


def describe_type(tp: Any) -> str:
    """A short readable name of a type annotation."""
    return tp.__qualname__ if isinstance(tp, type) else repr(tp).replace("typing.", "")


def _class_check(tp: Any) -> bool:
    """True for an annotation `isinstance` can check (not Any, not a TypedDict)."""
    return isinstance(tp, type) and tp is not Any and not typing.is_typeddict(tp)


_is_class = functools.lru_cache(maxsize=1024)(_class_check)
"""`_class_check`, remembered per annotation: it is asked at every stage's end."""


def _shown(value: Any) -> str:
    """At most 200 characters of `value`'s repr, for an error message. A value nested too
    deeply to repr (or whose repr fails) must not replace the error being reported."""
    try:
        return f"{value!r:.200}"
    except RecursionError:
        return f"<{type(value).__qualname__} nested too deeply to show>"
    except Exception as exc:
        return f"<{type(value).__qualname__} whose repr raised {type(exc).__name__}>"


def _too_large(stage: Stage, size: int, max_payload: int) -> StageOutputError:
    return StageOutputError(
        f"stage {stage.name!r} returned {size:,} bytes of JSON, more than the {max_payload:,} "
        "a row of the database can hold (SQLite's maximum string length, less room for the "
        "rest of the row); store large data elsewhere (a file, an object store) and return "
        "a reference to it"
    )


def check_output(stage: Stage, out: Any, max_payload: int) -> tuple[Any, str]:
    """Encode a stage's output and check it against the return annotation, and that it fits
    in a row (`max_payload` bytes of JSON: the store's `max_payload`).

    Returns (the value later stages see, the JSON stored). The value is what decoding the
    JSON gives, so a stage sees the same thing whether or not the process restarted since.
    """
    expected = stage.returns
    if type(out) is expected and expected in _PLAIN:
        # An int, str or bool annotated as exactly that (the common case, asked at every
        # stage's end): it is what it says and it decodes to itself. Only its encoding can
        # fail (an int past 64 bits), and then the checks below say how; or its size.
        try:
            raw = codec.encode(out)
        except (TypeError, ValueError, OverflowError, msgspec.EncodeError):
            pass
        else:
            if len(raw) > max_payload:
                raise _too_large(stage, len(raw), max_payload)
            return out, raw.decode()
    try:
        is_class = _is_class(expected)
    except TypeError:  # an unhashable annotation
        is_class = _class_check(expected)
    if is_class:
        ok = isinstance(out, expected) or (expected is float and type(out) is int)
        if not ok:
            raise StageOutputError(
                f"stage {stage.name!r} must return {describe_type(expected)} "
                f"but returned {type(out).__qualname__}: {_shown(out)}"
            )
    if type(out) is float and not math.isfinite(out):
        raise StageOutputError(
            f"stage {stage.name!r} returned {out!r}, which JSON cannot store; "
            "return None or a string instead"
        )
    try:
        raw = codec.encode(out)
    except RecursionError as exc:
        raise StageOutputError(
            f"stage {stage.name!r} returned a {type(out).__qualname__} nested too deeply "
            f"to store: {exc}"
        ) from exc
    except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as exc:
        raise StageOutputError(
            f"stage {stage.name!r} returned a {type(out).__qualname__} that cannot be "
            f"serialized: {type(exc).__name__}: {exc}"
        ) from exc
    # Too large, its commit would fail, and the run, stranded, would run the stage again
    # at every recovery, for ever: fail it here, as for any output that cannot be stored.
    if len(raw) > max_payload:
        raise _too_large(stage, len(raw), max_payload)
    if type(out) in _SCALARS and (expected is Any or expected is type(out)):
        return out, raw.decode()
    # JSON has no NaN or infinity: msgspec writes them as null. Only look when a null is
    # there at all, so ordinary outputs pay nothing.
    if b"null" in raw and codec.has_nonfinite(out, 0):
        raise StageOutputError(
            f"stage {stage.name!r} returned a {type(out).__qualname__} holding NaN or "
            "infinity, which JSON cannot store; use None or a string instead"
        )
    try:
        value = codec.decode(raw, expected)
    except RecursionError as exc:
        raise StageOutputError(
            f"stage {stage.name!r} returned a value nested too deeply to store: {exc}"
        ) from exc
    except msgspec.ValidationError as exc:
        raise StageOutputError(
            f"stage {stage.name!r} must return {describe_type(expected)} "
            f"but returned {type(out).__qualname__} that does not match: {exc}"
        ) from exc
    return value, raw.decode()


class Driver:
    """Drives one run from its current stage until it pauses, finishes, fails or is stopped."""

    def __init__(
        self,
        *,
        store: Store,
        owner: str,
        lease_ttl: float,
        limiter: anyio.CapacityLimiter,
        pipeline: Pipeline,
        state: RunState,
        children: ChildRunner,
        clock: Clock,
        tracing: Tracing | None = None,
        claim: RunRecord | None = None,
    ) -> None:
        self.store = store
        self.max_payload = store.max_payload
        self.owner = owner
        self.lease_ttl = lease_ttl
        self.limiter = limiter
        self.pipeline = pipeline
        self.state = state
        self.children = children
        self.clock = clock
        self.tracing = tracing
        self.claim = claim
        """When set, the run is recovered: take its lease (guarded on this row) first."""
        self.outcome: str | None = None
        """The status the run settled in here (succeeded, failed, paused, cancelled)."""
        self.seq: int | None = None
        """The run's journal position, once this driver knows it: it is the run's only
        writer while it drives, so each stage's commit can name the position it expects."""
        self.base: RunRecord | None = None
        """The run's row as this engine created it (fresh runs only): with the commit time
        of the last stage it is the final row, so finishing needs no read back."""
        self.final: RunRecord | None = None
        """The run's row as committed when it settled here (what `engine.wait` returns)."""
        self._waits = 0
        self.guard = Guard(("running",), owner=owner, not_cancel_requested=True)
        self.scope = anyio.CancelScope()
        self.cancel_requested = False
        self.stranded = False
        self.stopping = False
        """Set when the engine closes: finish the stage in hand, then stop (still running,
        for the next engine to continue)."""
        self.unloadable = False
        """Set when a recovered run's stored values do not decode: leave it alone."""
        """Set when the run stopped unsettled (a failed commit): the engine retries it later."""
        self.done = asyncio.Event()  # asyncio's own: anyio's costs a backend lookup per run
        self.task: asyncio.Task[None] | None = None
        """The task driving the run, once launched (it also tidies up after the run)."""
        self.counting = False
        """Whether the run's tree has children, so its stage executions are held to
        `max_total_stages` (decided as the drive begins; set when the root launches one)."""

    @property
    def run_id(self) -> str:
        """The run being driven."""
        return self.state.run_id

    async def drive(self) -> None:
        """Run stages until the run settles. Never raises but for cancellation."""
        try:
            with self.scope:
                try:
                    # A free slot is taken at once, without the extra pass of the event loop
                    # that acquire_on_behalf_of makes; but a run cancelled before its task
                    # started must stop here, as it did at that pass. Asked of the scope
                    # itself (the task's outermost): anyio's checkpoint_if_cancelled looks
                    # up the backend first, ~4% of a short run's work on the loop.
                    if self.scope.cancel_called:
                        await anyio.lowlevel.checkpoint()
                    try:
                        self.limiter.acquire_on_behalf_of_nowait(self)
                    except anyio.WouldBlock:
                        await self.limiter.acquire_on_behalf_of(self)
                    try:
                        if self.claim is not None and not await self._claim(self.claim):
                            return
                        if self.tracing is None:
                            await self._steps()
                        else:
                            with self.tracing.run(self):
                                await self._steps()
                    finally:
                        if self._waits == 0:
                            self.limiter.release_on_behalf_of(self)
                except anyio.get_cancelled_exc_class():
                    if self.cancel_requested:
                        with anyio.CancelScope(shield=True):
                            await self._cancelled(self.seq, self.state.stage_index)
                    raise
        except _Lost:
            await self._on_lost()
        except anyio.get_cancelled_exc_class():
            raise
        except WaystationError as exc:  # the store failed: the run stays recoverable
            self.stranded = True
            log.error("run %s stopped: %s; it will be retried", self.run_id, exc)
        except Exception:
            self.stranded = True
            log.exception("run %s stopped by an internal error; it will be retried", self.run_id)
        finally:
            self.done.set()

    @contextlib.asynccontextmanager
    async def slot_released(self) -> AsyncIterator[None]:
        """Give back this run's concurrency slot while it waits for children, so that a
        tree deeper than the limit cannot deadlock waiting for slots its children need."""
        self._waits += 1
        if self._waits == 1:
            self.limiter.release_on_behalf_of(self)
        try:
            yield
        finally:
            self._waits -= 1
            if self._waits == 0:
                with anyio.CancelScope(shield=True):
                    await self.limiter.acquire_on_behalf_of(self)

    async def _steps(self) -> None:
        stages = self.pipeline.stages
        state = self.state
        slots = self.pipeline.slots
        plain = self.pipeline.plain if self.tracing is None else (False,) * len(stages)
        # Asked once per drive, not per stage: logging switched on mid-run shows from the
        # run's next drive (a resume, a recovery) on.
        timed = log.isEnabledFor(logging.INFO)
        i = self.state.stage_index
        self.counting = bool(state.depth) or state.root_run_id in self.children.trees
        if not self.counting and self.base is None and self.pipeline.launches:
            # A root driven again may have launched children before (in another
            # process, say): its stages count from here on as they did then.
            self.counting = await self.children.count_tree_of(self)
        if self.state.compensating is not None and i < len(stages):
            # The process died while compensating a failure: finish that, nothing else.
            await self._finish_failure(i, stages[i], self.state.compensating)
            return
        while i < len(stages):
            if self.stopping:
                log.info("run %s left at %s for the next engine", self.run_id, stages[i].name)
                return
            stage = stages[i]
            began: float | None = None  # for the log line of a stage that ran
            event = "succeeded"
            value: Any = None
            payload: str | None = None
            park: float | None = None
            # Only the stage itself runs inside `try`: what fails in there is the stage's
            # failure. Its commit comes after, so that a failed commit strands the run (to
            # be retried) rather than failing a stage that succeeded.
            try:
                if self.counting:
                    await self.children.count_stage(self)
                if plain[i]:
                    if timed:
                        began = time.perf_counter()
                    fn: Callable[..., Awaitable[Any]] = stage.fn  # type: ignore[assignment]
                    value, payload = check_output(
                        stage, await fn(**self._kwargs(slots[i].bindings)), self.max_payload
                    )
                elif stage.when is not None and not await self._condition(
                    stage, self.pipeline.when_bindings[i]
                ):
                    event = "skipped"
                elif stage.kind == "parallel":
                    value = await self._run_group(stage, i)
                elif stage.kind == "sleep":
                    wake_at = await self._wake_time(stage, i)
                    if self.clock.time() < wake_at:
                        park = wake_at
                else:
                    began = time.perf_counter()
                    if stage.kind == "gate":
                        value, payload = self._gate_answer(stage, i)
                    else:
                        value, payload = await self._execute(stage, slots[i])
            except asyncio.CancelledError as exc:
                # Real cancellation (ours or the engine's) propagates; a CancelledError the
                # stage raised by itself (awaiting a cancelled task, say) is its failure.
                task = asyncio.current_task()
                if self.scope.cancel_called or (task is not None and task.cancelling()):
                    raise
                await self._fail(i, stage, exc)
                return
            except PauseSignal as sig:
                await self._pause(i, stage, sig, self._attempt_of(i))
                return
            except SleepSignal as sig:
                await self._park(slots[i], sig.wake_at, sig.number)
                return
            except (_Lost, StoreError):
                # A commit failed (a branch's, a retry's row), not the stage: the run is left
                # to be retried, as when its own commit fails, never failed for good.
                raise
            except Exception as exc:
                if not stage.continue_on_error:
                    await self._fail(i, stage, exc)
                    return
                await self._fail_and_continue(i, stage, exc)
                i += 1
                continue
            if park is not None:
                await self._park(slots[i], park, 0)
                return
            await self._advance(i, value, payload, event)
            if began is not None and timed:
                self._log_done(stage, began)
            i += 1

    def _log_done(self, stage: Stage, began: float) -> None:
        ms = (time.perf_counter() - began) * 1000
        log.info("run %s stage %s done in %.1f ms", self.run_id, stage.name, ms)

    # -- one stage ---------------------------------------------------------------------------

    def _gate_answer(self, gate: Stage, key: int | str) -> tuple[Any, str]:
        """A gate's output: the answer waiting in the journal's `resumed` row (given by a
        process without this pipeline), or else a pause."""
        answers = self.state.answers.get(key)
        if not answers:
            raise PauseSignal(gate.name, gate.schema, gate.reason, 0)
        return codec.decode(answers[-1], gate.schema), answers[-1]

    def _attempt_of(self, key: int | str) -> int:
        return self.state.attempts.get(key, 0) + 1

    async def _execute(self, stage: Stage, slot: Slot) -> tuple[Any, str]:
        first = self._attempt_of(slot.key)
        remaining = stage.retry.attempts - first + 1
        if remaining <= 1:
            return await self._attempt(stage, slot, first)
        policy = stage.retry
        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(remaining),
            wait=policy.wait_strategy(first),
            retry=(
                tenacity.retry_if_exception_type(policy.retry_on)
                & tenacity.retry_if_not_exception_type(StageOutputError)
            ),
            before_sleep=functools.partial(self._journal_retry, stage, slot, first),
            sleep=anyio.sleep,
            reraise=True,
        )
        result: tuple[Any, str] | None = None
        async for attempt in retrying:
            with attempt:
                result = await self._attempt(
                    stage, slot, first + attempt.retry_state.attempt_number - 1
                )
        assert result is not None
        return result

    async def _run_group(self, group: Stage, i: int) -> dict[str, Any]:
        """Run the branches of a parallel group that have no committed result yet."""
        spec = group.group
        state = self.state
        results: dict[str, Any] = state.values[i] if isinstance(state.values[i], dict) else {}
        state.values[i] = results
        slots = self.pipeline.branch_slots[i]
        todo = [b for b in spec.branches if b.name not in results]
        limit = anyio.Semaphore(spec.max_concurrency or max(1, len(todo)))
        errors: list[tuple[str, BaseException]] = []
        pauses: list[Pause] = []
        fatal: list[BaseException] = []
        failing = False

        async def run(branch: Stage) -> None:
            nonlocal failing
            slot = slots[branch.name]
            async with limit:
                try:
                    if failing:
                        raise anyio.get_cancelled_exc_class()()
                    failed = await self._branch(branch, slot, results, pauses, errors)
                except anyio.get_cancelled_exc_class():
                    if failing and not fatal:  # fail_fast: journal that this branch stopped
                        with anyio.CancelScope(shield=True):
                            await self._commit(
                                [
                                    NewTransition(
                                        "cancelled", i, slot.path, self._attempt_of(slot.key)
                                    )
                                ]
                            )
                    raise
                except BaseException as exc:  # a failed commit or a lost lease: stop all
                    fatal.append(exc)
                    tg.cancel_scope.cancel()
                    return
                if failed and spec.on_error == "fail_fast":
                    failing = True
                    tg.cancel_scope.cancel()

        async with anyio.create_task_group() as tg:
            for branch in todo:
                tg.start_soon(run, branch, name=f"waystation-branch-{branch.name}")
        if fatal:
            raise fatal[0]
        if errors:
            detail = "; ".join(f"{n}: {type(e).__name__}: {e}" for n, e in errors)
            if spec.on_error == "fail_fast":
                raise ParallelFailed(f"group {group.name!r}: branch {detail}") from errors[0][1]
            raise ParallelFailed(
                f"group {group.name!r}: {len(errors)} of {len(spec.branches)} branches failed: "
                f"{detail}"
            )
        if pauses:
            first = pauses[0]
            raise PauseSignal(first.kind, Any, first.reason, first.number, pauses=pauses)
        return {b.name: results.get(b.name) for b in spec.branches}

    async def _branch(
        self,
        branch: Stage,
        slot: Slot,
        results: dict[str, Any],
        pauses: list[Pause],
        errors: list[tuple[str, BaseException]],
    ) -> bool:
        """Run one branch, committing its start and its outcome; True if it failed."""
        i = slot.index
        attempt = self._attempt_of(slot.key)
        group = self.pipeline.stages[i].name
        marker = codec.encode({"concurrent_group": group}).decode()
        seq = await self._commit([NewTransition("started", i, slot.path, attempt, payload=marker)])
        if self.counting:
            self.children.counted(self.state.root_run_id, self.run_id, seq)
        event = "succeeded"
        error: str | None = None  # a failure handed on (continue_on_error)
        try:
            if self.counting:
                await self.children.count_stage(self)
            when = self.pipeline.branch_when_bindings[slot.path]
            if branch.when is not None and not await self._condition(branch, when):
                value, payload, event = None, None, "skipped"
            elif branch.kind == "gate":
                value, payload = self._gate_answer(branch, slot.key)
            else:
                value, payload = await self._execute(branch, slot)
        except SleepSignal:
            exc = StageOutputError(
                f"branch {slot.path!r}: ctx.sleep is not supported inside a parallel group; "
                "put a sleep stage before or after the group"
            )
            return await self._branch_failed(branch, slot, exc, errors)
        except PauseSignal as sig:
            if sig.pauses is not None:  # a child pipeline branch paused
                pauses.extend(msgspec.structs.replace(p, stage_path=slot.path) for p in sig.pauses)
            else:
                schema = codec.json_schema(sig.schema)
                pauses.append(self._pause_of(slot, branch, sig, schema))
            return False
        except _Lost:
            raise
        except Exception as exc:
            if not branch.continue_on_error:
                return await self._branch_failed(branch, slot, exc, errors)
            # As a continue_on_error stage: the failure is journaled and is the branch's
            # output, for the stages after the group to see.
            info = error_info(exc, branch, i)
            value = Failed(stage=branch.name, type=info.type, message=info.message)
            payload, event = codec.encode(value).decode(), "failed"
            error = codec.encode(info).decode()
            log.warning("run %s: branch %s failed, continuing: %s", self.run_id, slot.path, exc)
        # Shielded, as is a failure's commit: once the outcome is with the writer it will
        # apply, so a sibling's failure must not cancel the wait for it (the branch would
        # then be journaled `cancelled` after its committed outcome).
        with anyio.CancelScope(shield=True):
            await self._commit(
                [NewTransition(event, i, slot.path, self._attempt_of(slot.key), payload, error)]
            )
        results[branch.name] = value
        self.state.branch_payloads[slot.path] = payload
        return False

    async def _branch_failed(
        self, branch: Stage, slot: Slot, exc: BaseException, errors: list[tuple[str, BaseException]]
    ) -> bool:
        """Journal a branch's failure; True (it failed), for `_branch` to return."""
        errors.append((branch.name, exc))
        error = error_json(exc, branch, slot.index)
        attempt = self._attempt_of(slot.key)
        with anyio.CancelScope(shield=True):  # see the outcome's commit in _branch
            await self._commit(
                [NewTransition("failed", slot.index, slot.path, attempt, error=error)]
            )
        return True

    async def _journal_retry(
        self, stage: Stage, slot: Slot, first: int, retry_state: tenacity.RetryCallState
    ) -> None:
        attempt = first + retry_state.attempt_number - 1
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        err = error_info(exc, stage, slot.index) if exc is not None else None
        wait = retry_state.upcoming_sleep
        log.info(
            "run %s stage %s attempt %d failed (%s); retrying in %.3fs",
            self.run_id,
            stage.name,
            attempt,
            err.message if err else "",
            wait,
        )
        seq = await self._commit(
            [
                NewTransition(
                    "retrying",
                    slot.index,
                    slot.path,
                    attempt,
                    payload=codec.encode({"wait": wait}).decode(),
                    error=codec.encode(err).decode() if err else None,
                )
            ]
        )
        self.state.attempts[slot.key] = attempt
        if self.counting:
            self.children.counted(self.state.root_run_id, self.run_id, seq)

    async def _attempt(self, stage: Stage, slot: Slot, attempt: int) -> tuple[Any, str]:
        if attempt > 1 and self.counting:
            # A retry (its `retrying` row counted); a first attempt was held to the limit
            # where its stage or branch started.
            await self.children.count_stage(self)
        kwargs = self._kwargs(slot.bindings)
        if stage.kind == "child":
            call: Any = functools.partial(
                run_composite, stage, kwargs, self._context(stage, slot, attempt)
            )
        else:
            if stage.context_param is not None:
                kwargs[stage.context_param] = self._context(stage, slot, attempt)
            call = functools.partial(self._call, stage, stage.fn, kwargs)
        if self.tracing is not None:
            with self.tracing.stage(self, stage, slot, attempt):
                out = await self._timed(stage, call, attempt)
        else:
            out = await self._timed(stage, call, attempt)
        return check_output(stage, out, self.max_payload)

    @staticmethod
    async def _timed(stage: Stage, call: Any, attempt: int) -> Any:
        if stage.timeout is None:
            out = await call()
        else:
            with anyio.move_on_after(stage.timeout) as scope:
                out = await call()
            if scope.cancelled_caught:
                raise StageTimeout(
                    f"stage {stage.name!r} timed out after {stage.timeout}s (attempt {attempt})"
                )
        return out

    @staticmethod
    async def _call(stage: Stage, fn: Any, kwargs: dict[str, Any]) -> Any:
        if stage.is_async:
            return await fn(**kwargs)
        out = await anyio.to_thread.run_sync(
            functools.partial(fn, **kwargs), abandon_on_cancel=True
        )
        if inspect.isawaitable(out):  # an async function behind a plain sync decorator
            out = await out
        return out

    def _context(self, stage: Stage, slot: Slot, attempt: int) -> StageContext:
        names = self.pipeline.stages
        i = slot.index
        return StageContext(
            run_id=self.run_id,
            pipeline=self.pipeline.name,
            stage_index=i,
            stage_name=stage.name,
            stage_path=slot.path,
            attempt=attempt,
            input=self.state.input,
            results={names[j].name: self.state.values[j] for j in range(i)},
            answers=self.state.answers.get(slot.key, []),
            sleeps=self.state.sleeps.get(slot.key, []),
            driver=self,
        )

    def _kwargs(self, bindings: tuple[Binding, ...]) -> dict[str, Any]:
        state = self.state
        kwargs: dict[str, Any] = {}
        for b in bindings:
            if b.from_stage is None:
                value = state.input_fields[b.key]
                if b.convert is not None:
                    value = msgspec.convert(msgspec.to_builtins(value), b.convert)
            elif b.branch is not None:
                value = state.values[b.from_stage][b.branch]
                path = f"{self.pipeline.stages[b.from_stage].name}.{b.branch}"
                # A Failed (a continue_on_error branch that failed) is handed over as it is.
                if (
                    b.convert is not None
                    and not isinstance(value, Failed)
                    and state.branch_payloads.get(path) is not None
                ):
                    value = codec.decode(state.branch_payloads[path] or "null", b.convert)
            elif isinstance(state.values[b.from_stage], Failed):
                value = state.values[b.from_stage]
            elif b.convert is not None and state.payloads[b.from_stage] is not None:
                value = codec.decode(state.payloads[b.from_stage] or "null", b.convert)
            else:
                value = state.values[b.from_stage]
            kwargs[b.param] = value
        return kwargs

    async def _condition(self, stage: Stage, bindings: tuple[Binding, ...]) -> bool:
        assert stage.when is not None
        result = stage.when(**self._kwargs(bindings))
        if hasattr(result, "__await__"):
            result = await result
        return bool(result)

    # -- commits -----------------------------------------------------------------------------

    async def _commit(
        self,
        transitions: list[NewTransition],
        values: dict[str, Any] | None = None,
        *,
        settle: bool = False,
    ) -> int:
        """Commit `transitions` under the driver's guard; the journal position of the last."""
        if settle:
            record = await self.store.settle_run(self.run_id, self.guard, transitions, values)
            if record is None:
                raise _Lost()
            self.final = record
            seq = record.seq
        else:
            found = await self.store.update_run(self.run_id, self.guard, transitions, values)
            if found is None:
                raise _Lost()
            seq = found
        # Branches of a parallel group commit concurrently: the furthest is the position.
        self.seq = seq if self.seq is None else max(self.seq, seq)
        return seq

    async def _advance(
        self, i: int, value: Any, payload: str | None, event: str | NewTransition
    ) -> None:
        stages = self.pipeline.stages
        if isinstance(event, NewTransition):
            done = event
        else:
            attempt = self.state.attempts.get(i, 0) + 1  # `_attempt_of`, inline: per stage
            # Built as the tuple it is: NamedTuple's own `__new__` is a Python function.
            done = _transition((event, i, stages[i].name, attempt, payload, None))
        if i + 1 < len(stages):
            rows = [done, self.pipeline.started[i + 1]]
            seq = None
            if self.seq is not None:
                seq = await self.store.step_run(
                    self.state.run_id, self.owner, self.seq, i + 1, rows
                )
            if seq is None:  # position unknown (or not as expected): the plain guard decides
                seq = await self._commit(rows, {"stage_index": i + 1})
            else:
                self.seq = seq
            if self.counting:
                self.children.counted(self.state.root_run_id, self.run_id, seq)
        else:
            output = payload
            if stages[i].kind == "parallel":
                output = codec.encode(value).decode()
            rows = [done, NewTransition("completed", len(stages))]
            at = None
            if self.seq is not None and self.base is not None:
                at = await self.store.finish_run(
                    self.run_id, self.owner, self.seq, len(stages), rows, output
                )
                if at is not None:
                    self.seq += len(rows)
                    self.final = _finished(self.base, len(stages), self.seq, output, at)
            if at is None:  # position unknown (or not as expected): the plain guard decides
                await self._commit(
                    rows,
                    {
                        "stage_index": len(stages),
                        "status": "succeeded",
                        "output": output,
                        "lease_owner": None,
                        "lease_expires": None,
                    },
                    settle=True,
                )
            self.outcome = "succeeded"
        state = self.state
        state.values[i] = value
        state.payloads[i] = payload
        state.stage_index = i + 1

    async def _pause(self, i: int, stage: Stage, sig: PauseSignal, attempt: int) -> None:
        if sig.pauses is not None:  # children or branches paused: show their pauses as ours
            pauses = [
                msgspec.structs.replace(
                    p, stage_index=i, stage_name=stage.name, stage_path=p.stage_path or stage.name
                )
                for p in sig.pauses
            ]
            await self._commit_pause(i, stage, pauses, attempt)
            # One of them may have been answered since we read it, before there was a
            # paused run here to wake: look again now that ours is committed.
            await self.children.engine.wake_if_stale(self.run_id)
            return
        try:
            schema = codec.json_schema(sig.schema)
        except TypeError as exc:
            await self._fail(
                i,
                stage,
                StageOutputError(
                    f"stage {stage.name!r} paused with a schema msgspec cannot describe: {exc}"
                ),
            )
            return
        pause = self._pause_of(self.pipeline.slots[i], stage, sig, schema)
        await self._commit_pause(i, stage, [pause], attempt)

    def _pause_of(
        self, slot: Slot, stage: Stage, sig: PauseSignal, schema: dict[str, Any]
    ) -> Pause:
        # A gate only pauses as itself; any other stage pauses through ctx.pause.
        gate = stage.kind == "gate"
        expires_at = None
        pause_id = f"{slot.path}#{sig.number}"
        if gate and stage.expiry is not None:
            expires_at = self.state.expiries.get(pause_id, self.clock.time() + stage.expiry[0])
        return Pause(
            expires_at=expires_at,
            pause_id=pause_id,
            kind=sig.kind,
            reason=sig.reason,
            stage_index=slot.index,
            stage_name=self.pipeline.stages[slot.index].name,
            schema=schema,
            gate=gate,
            number=sig.number,
            schema_ref=codec.type_ref(sig.schema),
            created_at=time.time(),
            run_id=self.run_id,
            stage_path=slot.path,
        )

    async def _commit_pause(self, i: int, stage: Stage, pauses: list[Pause], attempt: int) -> None:
        payload = codec.encode(pauses).decode()
        await self._commit(
            [NewTransition("paused", i, stage.name, attempt, payload=payload)],
            {
                "status": "paused",
                "pause": payload,
                "lease_owner": None,
                "lease_expires": None,
                "wake_at": expiry_of(pauses, self.run_id),
            },
            settle=True,
        )
        self.outcome = "paused"
        if any(p.expires_at is not None for p in pauses):
            self.children.engine.timers.changed()
        log.info(
            "run %s paused at %s (%s)",
            self.run_id,
            stage.name,
            ", ".join(p.kind for p in pauses),
        )

    async def _fail(self, i: int, stage: Stage, exc: BaseException) -> None:
        err = error_json(exc, stage, i)
        if self.pipeline.on_failure == "compensate":
            # Durable first: after a crash from here on, recovery finishes the compensation.
            await self._commit(
                [NewTransition("compensating", i, stage.name, self._attempt_of(i), error=err)]
            )
        await self._finish_failure(i, stage, err)

    async def _finish_failure(self, i: int, stage: Stage, err: str) -> None:
        if self.pipeline.on_failure == "compensate":
            await self._compensate(i)
        await self._commit(
            [NewTransition("failed", i, stage.name, self._attempt_of(i), error=err)],
            {"status": "failed", "error": err, "lease_owner": None, "lease_expires": None},
            settle=True,
        )
        self.outcome = "failed"
        error = msgspec.json.decode(err, type=StageError)
        log.warning(
            "run %s failed at %s: %s: %s", self.run_id, stage.name, error.type, error.message
        )

    async def _compensate(
        self,
        failed_at: int,
        journal: Callable[[list[NewTransition]], Awaitable[object]] | None = None,
    ) -> None:
        """Undo the completed stages before `failed_at`, last first, each once; the child
        runs a stage launched are undone before the stage itself (deepest first)."""
        journal = journal or self._commit
        stages = self.pipeline.stages
        state = self.state
        if failed_at < len(stages) and stages[failed_at].group is not None:
            # The group that failed: its branches that completed are steps done (a hotel
            # booked while the flight failed), undone with their children; the branches
            # that failed are not, as a failing stage is not.
            await self._undo_group(failed_at, stages[failed_at], journal, failed=True)
        for j in reversed(range(failed_at)):
            stage = stages[j]
            if stage.group is not None:
                await self._undo_group(j, stage, journal, failed=False)
                continue
            await self.children.compensate_children(self, j)
            value, payload = state.values[j], state.payloads[j]
            bindings = self.pipeline.bindings[j]
            await self._undo(j, stage, j, stage.name, bindings, value, payload, journal)

    async def _undo_group(
        self,
        i: int,
        group: Stage,
        journal: Callable[[list[NewTransition]], Awaitable[object]],
        *,
        failed: bool,
    ) -> None:
        """Undo a group's children, then each branch with its own compensation, last
        declared first. For the group that `failed`, only its completed branches (and
        their children)."""
        assert group.group is not None
        state = self.state
        results = state.values[i] if isinstance(state.values[i], dict) else {}
        slots = self.pipeline.branch_slots[i]
        done = None
        if failed:
            done = tuple(s.path for s in slots.values() if s.path in state.branch_payloads)
        await self.children.compensate_children(self, i, done)
        for branch in reversed(group.group.branches):
            slot = slots[branch.name]
            value, payload = results.get(branch.name), state.branch_payloads.get(slot.path)
            await self._undo(i, branch, slot.key, slot.path, slot.bindings, value, payload, journal)

    async def _undo(
        self,
        i: int,
        stage: Stage,
        key: int | str,
        path: str,
        bindings: tuple[Binding, ...],
        value: Any,
        payload: str | None,
        journal: Callable[[list[NewTransition]], Awaitable[object]],
    ) -> None:
        """Run one completed stage's (or branch's) compensation, once, and journal it."""
        if stage.compensate is None or key in self.state.compensated:
            return
        if isinstance(value, Failed) or (value is None and payload is None):
            return  # it failed or was skipped: nothing to undo
        kwargs = self._kwargs(bindings)
        kwargs["output"] = value
        wanted = inspect.signature(stage.compensate).parameters
        kwargs = {k: v for k, v in kwargs.items() if k in wanted}
        try:
            result = stage.compensate(**kwargs)
            if inspect.isawaitable(result):
                await result
        except Exception as exc:
            log.warning(
                "run %s: compensation of %s failed: %s: %s",
                self.run_id,
                path,
                type(exc).__name__,
                exc,
            )
            info = error_json(exc, stage, i)
            await journal([NewTransition("compensation_failed", i, path, error=info)])
        else:
            await journal([NewTransition("compensated", i, path)])
        self.state.compensated.add(key)

    async def _fail_and_continue(self, i: int, stage: Stage, exc: BaseException) -> None:
        info = error_info(exc, stage, i)
        failed = Failed(stage=stage.name, type=info.type, message=info.message)
        event = NewTransition(
            "failed", i, stage.name, self._attempt_of(i), error=codec.encode(info).decode()
        )
        await self._advance(i, failed, codec.encode(failed).decode(), event)
        log.warning("run %s: stage %s failed, continuing: %s", self.run_id, stage.name, exc)

    async def _wake_time(self, stage: Stage, i: int) -> float:
        """When a sleep stage wakes: committed on first entry, read back after."""
        recorded = self.state.sleeps.get(i)
        if recorded:
            return recorded[0]
        seconds, until = stage.expiry
        if until is None:
            return float(self.clock.time() + seconds)
        result = until(**self._kwargs(self.pipeline.bindings[i]))
        if inspect.isawaitable(result):
            result = await result
        return result.timestamp() if isinstance(result, datetime) else float(result)

    async def _park(self, slot: Slot, wake_at: float, number: int) -> None:
        """Commit the wake-up time (once) and leave the run pending until then."""
        recorded = self.state.sleeps.setdefault(slot.key, [])
        rows = []
        if number >= len(recorded):
            payload = codec.encode({"wake_at": wake_at, "number": number}).decode()
            rows.append(NewTransition("sleeping", slot.index, slot.path, payload=payload))
            recorded.append(wake_at)
        await self._commit(
            rows,
            {"status": "pending", "wake_at": wake_at, "lease_owner": None, "lease_expires": None},
        )
        self.outcome = "sleeping"
        self.children.engine.timers.changed()
        log.info("run %s sleeps at %s until %s", self.run_id, slot.path, wake_at)

    async def _cancelled(self, seq: int | None, i: int) -> None:
        """Settle the run as cancelled at stage `i`, where commit `seq` left it.

        The cancel may have come while a commit of ours was with the writer: that commit
        applies before this one (one queue, in order) and moves the run past `i`. So the
        write is guarded on `seq`, and on a miss we read where the run got to and settle
        there, unless it meanwhile finished, paused or slept (`Engine.cancel` takes it from
        there) or is no longer ours."""
        stages = self.pipeline.stages
        while True:
            record = await self.store.settle_run(
                self.run_id,
                Guard(("running", "pending"), owner=self.owner, seq=seq),
                [NewTransition("cancelled", i, stages[i].name if i < len(stages) else None)],
                {"status": "cancelled", "lease_owner": None, "lease_expires": None},
            )
            if record is not None:
                self.final = record
                self.outcome = "cancelled"
                log.info("run %s cancelled", self.run_id)
                return
            now = await self.store.get_run(self.run_id)
            if now is not None and now.status in ("succeeded", "failed"):
                # Our last commit settled it (nobody else settles a run we hold): it
                # ended as that commit says, with what follows such an end (a workspace
                # removed, the run's tree forgotten).
                self.final = now
                self.outcome = now.status
                return
            if (
                seq is None
                or now is None
                or now.seq == seq
                or now.status not in ("running", "pending")
                or now.lease_owner != self.owner
            ):
                return
            seq, i = now.seq, now.stage_index

    async def _on_lost(self) -> None:
        record = await self.store.get_run(self.run_id)
        if (
            record is not None
            and record.cancel_requested
            and record.status in ("running", "pending")
            and record.lease_owner == self.owner
        ):
            await self._cancelled(record.seq, record.stage_index)
            return
        log.warning("run %s is no longer ours (lease taken over); stopped driving it", self.run_id)

    async def _claim(self, record: RunRecord) -> bool:
        """Take over a recovered run: guarded on the row we read, so one engine wins."""
        i = record.stage_index
        stages = self.pipeline.stages
        name = stages[i].name if i < len(stages) else None
        if record.cancel_requested:
            await self.store.update_run(
                self.run_id,
                Guard(("running", "pending"), seq=record.seq),
                [NewTransition("cancelled", i, name)],
                {"status": "cancelled", "lease_owner": None, "lease_expires": None},
            )
            return False
        rows = await self.store.stage_results(self.run_id)
        try:
            state = RunState.load(self.pipeline, record, rows)
        except (WaystationError, msgspec.ValidationError, msgspec.DecodeError) as exc:
            self.unloadable = True
            log.error(
                "run %s not recovered: its stored values no longer fit pipeline %r (%s); "
                "register the version it started with",
                self.run_id,
                self.pipeline.name,
                exc,
            )
            return False
        seq = await self.store.update_run(
            self.run_id,
            Guard(("running", "pending"), seq=record.seq),
            [
                NewTransition(
                    "recovered",
                    i,
                    name,
                    payload=codec.encode({"previous_owner": record.lease_owner}).decode(),
                )
            ],
            {
                "lease_owner": self.owner,
                "lease_expires": time.time() + self.lease_ttl,
                "status": "running",
            },
        )
        if seq is None:
            return False
        self.state = state
        self.seq = seq
        log.info("run %s recovered at stage %s", self.run_id, name)
        return True
