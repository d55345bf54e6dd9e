"""`Engine`: the facade a service holds. Starts, resumes, cancels and inspects runs, drives
them concurrently under a limit, keeps their leases fresh and recovers abandoned runs.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import os
import secrets
import shutil
import socket
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Generator,
    Iterable,
    Mapping,
    Sequence,
)
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

import anyio
import anyio.to_thread
import msgspec

from .._ids import check_run_id, new_run_id
from ..errors import (
    InvalidInput,
    InvalidResumeInput,
    InvalidRunState,
    NotPaused,
    PipelineChanged,
    PipelineDefinitionError,
    PipelineNotRegistered,
    RunAlreadyExists,
    RunNotFound,
    StoreError,
    WaitTimeout,
    WaystationError,
)
from ..store import codec
from ..store.base import (
    ALL_STATUSES,
    SETTLED,
    TERMINAL,
    Guard,
    NewRun,
    NewTransition,
    RunRecord,
    Store,
    TransitionRecord,
)
from ..store.sqlite import Durability, SQLiteStore
from . import events
from .children import ChildRunner, Limits
from .clock import Clock, SystemClock
from .models import Pause, Run, RunTree, StageError, Transition, decode_pauses
from .pipeline import CHILD_KEYS, Pipeline, _branches
from .plan import Plan, make_plan
from .runner import Driver, RunState, expiry_of
from .stage import Stage
from .timers import Timers
from .tracing import Tracing

# anyio loads its asyncio backend, and ~20 modules with it, at its first async call: 14 ms
# (measured with bytecode cached), which landed in the first `Engine.open` of a process,
# 3/4 of a fresh process's open + resume. Loaded here, it is part of the import instead.
with contextlib.suppress(ImportError):  # a later anyio may move it: then loaded as before
    import anyio._backends._asyncio

T = TypeVar("T")

log = logging.getLogger("waystation")


def _owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def _owner_is_dead(owner: str) -> bool:
    """True only when the lease owner was a process on this host that no longer exists."""
    host, _, rest = owner.partition(":")
    pid_text, _, _ = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _handed_on(p: Pipeline, i: int, path: str | None) -> bool:
    """Whether a `failed` row at stage `i` (or its branch `path`) is a failure handed on
    as an output (`continue_on_error`) rather than one that stopped the run or group."""
    if i >= len(p.stages):
        return False
    stage = p.stages[i]
    target = p.stage_at(i, path)
    if target is stage and path not in (None, stage.name):
        return False  # a branch this version of the pipeline does not have
    return target.continue_on_error


def _first_without_result(
    p: Pipeline, rows: builtins.list[TransitionRecord], before: int, stopped_at: int
) -> int | None:
    """The first stage before `before` for which a run's `stage_results` rows hold no
    result (None if each has one), a run stopped at stage index `stopped_at`. A result is
    what `RunState.load` takes as one: a succeeded, reused or skipped row, or a failure
    handed on (`continue_on_error`: a stage's once the run went past it, a branch's with
    its `Failed` as payload). A parallel group's result is each of its branches' results,
    unless the group itself was skipped."""
    done: set[tuple[int, str | None]] = set()
    for row in rows:
        i = row.stage_index
        if i is None or i >= before:
            continue
        stage = p.stages[i]
        branch = (
            row.stage_path if stage.group is not None and row.stage_path != stage.name else None
        )
        if row.event == "failed":
            handed_on = row.payload is not None if branch else i < stopped_at
            if handed_on and _handed_on(p, i, row.stage_path):
                done.add((i, branch))
        elif row.event == "skipped" or (
            row.event in ("succeeded", "reused") and (branch or stage.group is None)
        ):
            done.add((i, branch))  # a group's own `succeeded` row: its branches' say
    for i, stage in enumerate(p.stages[:before]):
        paths = [f"{stage.name}.{b.name}" for b in _branches(stage)]
        if (i, None) not in done and not (paths and all((i, q) in done for q in paths)):
            return i
    return None


def _not_before(value: object) -> float:
    """`submit`'s `not_before` as a Unix time, or `InvalidInput` naming what it got."""
    if isinstance(value, datetime):
        return value.timestamp()
    # Below 1e11 s (the year 5138): NaN and infinities are refused, and so is a time in
    # milliseconds, which would park the run for 50,000 years.
    if isinstance(value, int | float) and not isinstance(value, bool) and abs(value) < 1e11:
        return float(value)
    raise InvalidInput(f"not_before must be a datetime or a Unix time in seconds, not {value!r}")


def _flat_layout(stage: Stage) -> builtins.list[str]:
    """A stage and its branches as `Pipeline.shape` lists them: `kind name` each."""
    return [f"{part.kind} {part.name}" for part in (stage, *_branches(stage))]


def _layout(stage: Stage) -> str:
    """A stage as `migrate_run` compares it: its kind and name, and a group's branches
    (the journal's rows name them, and a gate's pause is answered by its kind)."""
    branches = _branches(stage)
    out = f"{stage.kind} {stage.name}"
    return f"{out} [{', '.join(map(_layout, branches))}]" if branches else out


def _check_id(run_id: object) -> None:
    """A run id that cannot exist (not a string, not encodable) is simply not found."""
    if not isinstance(run_id, str) or not 0 < len(run_id) <= 512:
        raise RunNotFound(f"no run with id {run_id!r}")
    try:
        run_id.encode("utf-8")
    except UnicodeEncodeError:
        raise RunNotFound(f"no run with id {run_id!r}") from None


def _choose_pause(run_id: str, pauses: list[Pause], pause_id: str | None) -> Pause:
    if pause_id is None:
        if len(pauses) == 1:
            return pauses[0]
        raise InvalidRunState(
            f"run {run_id} has {len(pauses)} open pauses; say which one with pause_id= "
            f"(one of {', '.join(p.pause_id for p in pauses)})"
        )
    for p in pauses:
        if p.pause_id == pause_id:
            return p
    raise NotPaused(
        f"run {run_id} has no open pause {pause_id!r} "
        f"(open: {', '.join(p.pause_id for p in pauses)})"
    )


_UNSET: Any = object()


def _when(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


class Engine:
    """Runs pipelines durably on a `Store`.

    Open it with `async with Engine.open("runs.db", pipelines=[...]) as engine:` (or
    `engine = await Engine.open(...)` and later `await engine.close()`). On open it recovers
    runs whose previous owner died. On close, stages in flight are interrupted and left for
    recovery (their last committed state is intact); a new engine continues them at once.
    """

    def __init__(
        self,
        store: Store,
        pipelines: Iterable[Pipeline] = (),
        *,
        max_concurrent_runs: int = 1000,
        lease_ttl: float = 30.0,
        recover: bool = True,
        poll_interval: float = 1.0,
        limits: Limits | None = None,
        budgets: Mapping[str, float] | None = None,
        workspace_root: str | os.PathLike[str] | None = None,
        workspace_policy: Literal["keep", "remove_on_success"] = "remove_on_success",
        clock: Clock | None = None,
        tracer: Any = None,
        shutdown_grace: float = 5.0,
    ) -> None:
        if lease_ttl <= 0 or poll_interval <= 0:
            raise ValueError("lease_ttl and poll_interval must be positive")
        self.store = store
        self.lease_ttl = lease_ttl
        self.poll_interval = poll_interval
        self.owner = _owner_id()
        self._recover_on_open = recover
        self._pipelines: dict[tuple[str, str], Pipeline] = {}
        self._latest: dict[str, Pipeline] = {}
        for p in pipelines:
            self.register(p)
        self._limiter = anyio.CapacityLimiter(max_concurrent_runs)
        self.limits = limits or Limits()
        self.budgets: dict[str, float] = dict(budgets or {})
        if workspace_root is None:
            base = getattr(store, "path", None)
            workspace_root = f"{base}.workspaces" if base else "waystation-workspaces"
        self.workspace_root = Path(workspace_root).absolute()
        self.workspace_policy = workspace_policy
        self.children = ChildRunner(self)
        self.clock: Clock = clock or SystemClock()
        """The time of durable sleeps, scheduled starts and pause expiry (leases use the
        real time: they are about processes being alive)."""
        self.timers = Timers(self)
        self.tracing = Tracing(tracer) if tracer is not None else None
        self.shutdown_grace = shutdown_grace
        self._closing = False
        self._active: dict[str, Driver] = {}
        self._stranded: dict[str, float] = {}
        """Runs under our lease that nothing here drives (a driver stopped on a failed
        commit, a caller cancelled mid-launch), by when they were marked: recovery takes
        them."""
        self._unloadable: set[str] = set()
        self._warned: set[str] = set()
        """Runs this engine said it cannot act on (said once, not at every look)."""
        self._cascading = False
        """`_cascades` is under way (one at a time)."""
        self._task_group: anyio.abc.TaskGroup | None = None
        self._runs: set[asyncio.Task[None]] = set()
        """The tasks driving runs. Plain asyncio tasks rather than the task group's: a run
        is started per submit, and the group's bookkeeping per task (a wrapper coroutine
        resumed at every commit, a weak-keyed state) was a measurable share of the cost."""
        self._service: asyncio.Task[None] | None = None
        self._ready: asyncio.Event | None = None
        self._stop: asyncio.Event | None = None
        self._opened = False

    # -- opening and closing -----------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str] | Store,
        pipelines: Iterable[Pipeline] = (),
        *,
        durability: Durability = "full",
        max_concurrent_runs: int = 1000,
        lease_ttl: float = 30.0,
        recover: bool = True,
        poll_interval: float = 1.0,
        limits: Limits | None = None,
        budgets: Mapping[str, float] | None = None,
        workspace_root: str | os.PathLike[str] | None = None,
        workspace_policy: Literal["keep", "remove_on_success"] = "remove_on_success",
        clock: Clock | None = None,
        tracer: Any = None,
        shutdown_grace: float = 5.0,
    ) -> Engine:
        """An engine on the SQLite file at `path` (created if missing) or on a given `Store`.

        Use it as `async with Engine.open(...) as engine:` or `engine = await Engine.open(...)`.
        `durability="full"` makes every commit survive power loss; `"normal"` survives a
        process crash but may lose the last commits on power loss (see README).
        With `recover=True` (the default) the engine is also a worker: on open and then
        every `poll_interval` seconds it takes over runs that are runnable and unowned
        (their owner died, their lease expired, or they were resumed by a process that
        does not have their pipeline). Read-only tools pass `recover=False`.
        `limits` bound trees of child runs (depth, stage executions, children per stage),
        `budgets` the named budgets stages spend (`ctx.spend`). Each run may use a directory
        under `workspace_root` (`ctx.workspace`); with "remove_on_success" a root run's
        directory (its children's included) is removed when it succeeds, kept otherwise.
        On close, stages in flight get `shutdown_grace` seconds to finish (no new stage,
        run or claim starts meanwhile); then the rest are interrupted and left, with their
        leases released, for the next engine to continue at once.
        `clock` is the time of durable sleeps, scheduled starts and pause expiry
        (`ws.ManualClock` in tests). `tracer`, an OpenTelemetry tracer, turns on spans per
        run and per stage attempt (children nested under their launching stage).
        """
        store: Store
        if isinstance(path, str | os.PathLike):
            store = SQLiteStore(path, durability=durability)
        else:
            store = path
        return cls(
            store,
            pipelines,
            max_concurrent_runs=max_concurrent_runs,
            lease_ttl=lease_ttl,
            recover=recover,
            poll_interval=poll_interval,
            limits=limits,
            budgets=budgets,
            workspace_root=workspace_root,
            workspace_policy=workspace_policy,
            clock=clock,
            tracer=tracer,
            shutdown_grace=shutdown_grace,
        )

    def __await__(self) -> Generator[Any, None, Engine]:
        return self._open().__await__()

    async def __aenter__(self) -> Engine:
        return await self._open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _open(self) -> Engine:
        if self._opened:
            return self
        await self.store.open()
        self._opened = True
        self._ready = asyncio.Event()
        self._stop = asyncio.Event()
        # The task group lives in a task of its own, so the caller's code is never inside
        # its cancel scope (and an engine may be opened in one task and closed in another).
        self._service = asyncio.create_task(self._serve(), name="waystation-engine")
        ready = asyncio.ensure_future(self._ready.wait())
        await asyncio.wait({ready, self._service}, return_when=asyncio.FIRST_COMPLETED)
        if not self._ready.is_set():
            ready.cancel()
            await self._service  # re-raises what went wrong
        if self._recover_on_open:
            await self.recover()
        return self

    async def _serve(self) -> None:
        assert self._ready is not None and self._stop is not None
        try:
            async with anyio.create_task_group() as tg:
                self._task_group = tg
                tg.start_soon(self._maintain)
                if self._recover_on_open:
                    tg.start_soon(self.timers.run)
                self._ready.set()
                await self._stop.wait()
                tg.cancel_scope.cancel()
        finally:
            self._task_group = None
            # Through each driver's cancel scope, as the task group did: anyio delivers it
            # again at every await until the run lets go, and respects the shields that
            # protect the driver's last writes. A bare task.cancel() is delivered once.
            driving = set()
            for driver in list(self._active.values()):
                driver.scope.cancel()
                driving.add(driver.task)
            runs = [t for t in self._runs if not t.done()]
            for task in runs:
                if task not in driving:  # past its driver: tidying up after the run
                    task.cancel()
            if runs:
                with anyio.CancelScope(shield=True):
                    await asyncio.gather(*runs, return_exceptions=True)

    async def close(self, *, grace: float | None = None) -> None:
        """Stop claiming runs, let stages in flight finish within `grace` seconds (default:
        the engine's `shutdown_grace`), interrupt the rest (they stay recoverable), release
        leases so another engine continues at once, and close the store."""
        if not self._opened:
            return
        self._opened = False
        self._closing = True
        wait = self.shutdown_grace if grace is None else grace
        for driver in list(self._active.values()):
            driver.stopping = True  # finish the stage in hand, start no other
        if wait > 0 and self._runs:
            with anyio.move_on_after(wait):
                for driver in list(self._active.values()):
                    await driver.done.wait()
                if self._runs:  # and what follows a run (removing its workspace)
                    await asyncio.wait(set(self._runs))
        if self._stop is not None:
            self._stop.set()
        if self._service is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._service
        try:
            # An engine with no pipeline and no recovery (the CLI's reading commands, a
            # web handler that only answers) never holds a lease: it must not wait for the
            # write lock of a busy database on its way out (7 s seen, up to busy_timeout).
            if self._pipelines or self._recover_on_open:
                await self.store.release_leases(self.owner)
        except StoreError as exc:  # a read-only file, a full disk: the leases just expire
            log.warning("leases not released on close (%s); they expire by themselves", exc)
        finally:
            await self.store.close()

    # -- pipelines ---------------------------------------------------------------------------

    def register(self, pipeline: Pipeline) -> None:
        """Make `pipeline` runnable here. Several versions of one name may be registered."""
        if not isinstance(pipeline, Pipeline):
            raise PipelineDefinitionError(f"{pipeline!r} is not a Pipeline")
        key = (pipeline.name, pipeline.version)
        seen = self._pipelines.get(key)
        if seen is not None and seen.fingerprint != pipeline.fingerprint:
            raise PipelineDefinitionError(
                f"two different pipelines are registered as {pipeline.name!r} version "
                f"{pipeline.version!r}; give the new one another version"
            )
        self._pipelines[key] = pipeline
        self._latest[pipeline.name] = pipeline
        for child in pipeline.children():
            self._ensure_registered(child)

    def _ensure_registered(self, pipeline: Pipeline) -> Pipeline:
        """Register a child pipeline on first use (a child run must be recoverable here)."""
        found = self._pipelines.get((pipeline.name, pipeline.version))
        if found is None:
            self.register(pipeline)
            return pipeline
        if found.fingerprint != pipeline.fingerprint:
            raise PipelineDefinitionError(
                f"two different pipelines are named {pipeline.name!r} version "
                f"{pipeline.version!r}; give one another name or version"
            )
        return found

    @property
    def pipelines(self) -> list[Pipeline]:
        """The registered pipelines."""
        return list(self._pipelines.values())

    def _resolve(self, pipeline: Pipeline | str) -> Pipeline:
        if isinstance(pipeline, str):
            found = self._latest.get(pipeline)
            if found is None:
                raise PipelineNotRegistered(
                    f"no pipeline named {pipeline!r} is registered; pass it in "
                    "Engine.open(..., pipelines=[...])"
                )
            return found
        found = self._pipelines.get((pipeline.name, pipeline.version))
        if found is None or found.fingerprint != pipeline.fingerprint:
            raise PipelineNotRegistered(
                f"pipeline {pipeline.name!r} version {pipeline.version!r} is not registered "
                "with this engine; pass it in Engine.open(..., pipelines=[...])"
            )
        return found

    async def _pipeline_for(self, record: RunRecord) -> Pipeline:
        """`_pipeline_of`, with a `PipelineChanged` that says which stages changed (from the
        shape the run's journal recorded for its version)."""
        try:
            return self._pipeline_of(record)
        except PipelineChanged as exc:
            registered = self._pipelines.get((record.pipeline, record.pipeline_version))
            if registered is None:
                raise
            before = await self._recorded_shape(record.run_id)
            if before is None:
                raise
            now = registered.shape()
            changes = [f"- {line}" for line in before if line not in now]
            changes += [f"+ {line}" for line in now if line not in before]
            if not changes:
                raise
            raise PipelineChanged(f"{exc}\nwhat changed:\n" + "\n".join(changes)) from None

    def _pipeline_of(self, record: RunRecord) -> Pipeline:
        """The registered pipeline a stored run can continue under, or a clear error."""
        found = self._pipelines.get((record.pipeline, record.pipeline_version))
        if found is None:
            versions = sorted(v for (n, v) in self._pipelines if n == record.pipeline)
            if versions:
                raise PipelineChanged(
                    f"run {record.run_id} was started on {record.pipeline!r} version "
                    f"{record.pipeline_version!r}, but this engine only has version(s) "
                    f"{', '.join(versions)}; register the old version too"
                )
            raise PipelineNotRegistered(
                f"run {record.run_id} belongs to pipeline {record.pipeline!r}, which is not "
                "registered with this engine"
            )
        if found.fingerprint != record.fingerprint:
            raise PipelineChanged(
                f"pipeline {record.pipeline!r} version {record.pipeline_version!r} changed "
                f"since run {record.run_id} started (fingerprint {record.fingerprint} -> "
                f"{found.fingerprint}: stages, their order or their signatures differ); "
                "register the unchanged pipeline under its version, and the new one under "
                "a new version"
            )
        return found

    # -- starting ----------------------------------------------------------------------------

    async def submit(
        self,
        pipeline: Pipeline | str,
        input: Any = None,
        *,
        run_id: str | None = None,
        idempotency_key: str | None = None,
        not_before: datetime | float | None = None,
        drive: bool = True,
    ) -> Run:
        """Create a run and start driving it; returns at once with the run as created.

        With an `idempotency_key` or `run_id` that already exists, nothing is created and the
        existing run is returned (a different pipeline under the same id is an error).
        With `not_before` (a datetime or Unix time on the engine's clock) the run is created
        `pending` and parked; a worker starts it when the time comes. With `drive=False`
        the run is created `pending` and left to any worker engine (a web process that only
        enqueues work, say).
        """
        return self._to_run(
            await self._create(
                pipeline,
                input,
                run_id=run_id,
                idempotency_key=idempotency_key,
                not_before=not_before,
                drive=drive,
            )
        )

    async def _create(
        self,
        pipeline: Pipeline | str,
        input: Any,
        *,
        run_id: str | None,
        idempotency_key: str | None,
        not_before: datetime | float | None = None,
        drive: bool = True,
    ) -> RunRecord:
        """`submit` without turning the row into a `Run` (which `start` would discard)."""
        self._check_open()
        p = self._resolve(pipeline)
        text, typed = p.validate_input(input)
        if run_id is not None:
            try:
                check_run_id(run_id)
            except WaystationError as exc:
                raise InvalidInput(str(exc)) from None
        if idempotency_key is not None and (
            not isinstance(idempotency_key, str) or not 0 < len(idempotency_key) <= 512
        ):
            raise InvalidInput("idempotency_key must be a string of 1-512 characters")
        rid = run_id or new_run_id()
        wake_at = None
        if not_before is not None:
            wake_at = _not_before(not_before)
            if wake_at <= self.clock.time():
                wake_at = None
        here = wake_at is None and drive
        created, record = await self._to_drive(
            rid if here else None,
            self.store.create_run(
                NewRun(
                    run_id=rid,
                    pipeline=p.name,
                    pipeline_version=p.version,
                    fingerprint=p.fingerprint,
                    status="running" if here else "pending",
                    input=text,
                    root_run_id=rid,
                    idempotency_key=idempotency_key,
                    lease_owner=self.owner if here else None,
                    lease_expires=time.time() + self.lease_ttl if here else None,
                    wake_at=wake_at,
                    transitions=[
                        NewTransition("created", payload=p.created_payload),
                        NewTransition("started", 0, p.stages[0].name, 1)
                        if here
                        else NewTransition(
                            "scheduled", payload=codec.encode({"not_before": wake_at}).decode()
                        ),
                    ],
                )
            ),
        )
        if not created:
            if record.pipeline != p.name:
                raise RunAlreadyExists(
                    f"run {record.run_id} already exists for pipeline {record.pipeline!r}"
                )
            return record
        if not here:
            log.info("run %s queued (%s v%s) for %s", rid, p.name, p.version, wake_at or "now")
            self.timers.changed()
            return record
        log.info("run %s started (%s v%s)", rid, p.name, p.version)
        self._launch_new(p, RunState.fresh(p, rid, typed), record)
        return record

    async def start(
        self,
        pipeline: Pipeline | str,
        input: Any = None,
        *,
        run_id: str | None = None,
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> Run:
        """Create a run and return once it pauses, succeeds, fails or is cancelled."""
        record = await self._create(pipeline, input, run_id=run_id, idempotency_key=idempotency_key)
        return await self.wait(record.run_id, timeout=timeout)

    def _driver_args(self, pipeline: Pipeline) -> dict[str, Any]:
        return {
            "store": self.store,
            "owner": self.owner,
            "lease_ttl": self.lease_ttl,
            "limiter": self._limiter,
            "pipeline": pipeline,
            "children": self.children,
            "clock": self.clock,
            "tracing": self.tracing,
        }

    def _launch_new(self, pipeline: Pipeline, state: RunState, created: RunRecord) -> None:
        """Drive a run this engine has just created (as `created`)."""
        driver = Driver(**self._driver_args(pipeline), state=state)
        driver.seq = created.seq
        driver.base = created
        self._launch(driver)

    def _launch(self, driver: Driver) -> None:
        if self._task_group is None:
            # Closed (a shielded create or a wake-up that finished after close stopped
            # the drivers): nothing may run past close; the run stays as committed, and
            # its lease is released or expires, for the next engine.
            log.info("run %s left for the next engine (closing)", driver.run_id)
            return
        if self._closing:
            driver.stopping = True  # a child launched while closing: left for recovery
        self._active[driver.run_id] = driver
        if driver.state.depth:  # a child woken here: a parent waiting on its sleep looks now
            self.children.changed(driver.run_id)
        task = asyncio.get_running_loop().create_task(
            self._drive(driver), name=f"waystation-run-{driver.run_id}"
        )
        driver.task = task
        self._runs.add(task)

    async def _drive(self, driver: Driver) -> None:
        # What a done-callback did (one more loop handle per run), in the task itself.
        try:
            try:
                await driver.drive()
                final = driver.final
                if final is not None and final.status == "failed":
                    await self._failed(final, final.updated_at)
                if final is not None and final.depth and final.status in TERMINAL:
                    await self._wake_ancestors(final)
            finally:
                if self._active.get(driver.run_id) is driver:
                    del self._active[driver.run_id]
                if driver.stranded:
                    self._stranded[driver.run_id] = time.monotonic()
                if driver.unloadable:
                    self._unloadable.add(driver.run_id)
                state = driver.state
                if state.depth == 0 and driver.outcome in ("succeeded", "failed", "cancelled"):
                    await self._root_ended(state.run_id, driver.outcome)
        except Exception:
            log.error(
                "run %s: its driver stopped by an internal error", driver.run_id, exc_info=True
            )
        finally:
            self._runs.discard(driver.task)

    async def _root_ended(self, run_id: str, outcome: str) -> None:
        """Tidy up after a root run that ended `outcome`, by its driver or by a commit that
        settled it without one (its last stage a gate, answered or expired): its tree's
        count is dropped and, if it succeeded, its workspace removed."""
        self.children.forget(run_id)
        if (
            outcome == "succeeded"
            and self.workspace_policy == "remove_on_success"
            and run_id in self.children.workspaces
        ):
            await anyio.to_thread.run_sync(self.children.clean_workspace, run_id)

    async def wait(self, run_id: str, *, timeout: float | None = None) -> Run:
        """Wait until the run pauses, succeeds, fails or is cancelled; returns it then.

        Runs driven by this engine are awaited directly; a run driven elsewhere is polled.
        """
        if timeout is None:
            return await self._wait(run_id)
        try:
            with anyio.fail_after(timeout):
                return await self._wait(run_id)
        except TimeoutError:
            raise WaitTimeout(
                f"run {run_id} did not pause or finish within {timeout}s; it goes on "
                "(wait again, or look at it with get)"
            ) from None

    async def _wait(self, run_id: str) -> Run:
        _check_id(run_id)
        delay = 0.01
        while True:
            driver = self._active.get(run_id)
            if driver is not None:
                await driver.done.wait()
                task = driver.task
                if task is not None and not task.done():  # removing the run's workspace
                    await asyncio.wait({task})
                if driver.final is not None and run_id not in self._active:
                    # The row as the settling commit left it: no need to read it back.
                    return self._to_run(driver.final)
            record = await self._record(run_id)
            if record.status in SETTLED:
                return self._to_run(record)
            if run_id not in self._active:
                await anyio.sleep(delay)
                delay = min(delay * 2, 0.5)

    # -- pausing -----------------------------------------------------------------------------

    async def resume(
        self,
        run_id: str,
        value: Any = None,
        *,
        pause_id: str | None = None,
        wait: bool = True,
        timeout: float | None = None,
    ) -> Run:
        """Answer one of the run's open pauses with `value` and continue the run.

        `value` is checked against the pause's schema first (`InvalidResumeInput`, and the
        run stays paused, untouched). Of two concurrent resumes exactly one wins; the other
        gets `NotPaused`. With several open pauses (parallel branches, child runs), name one
        with `pause_id`; the run continues once all are answered. A parent waiting on a
        child shows the child's pause, and resuming either answers it. Returns once the run
        pauses again or finishes (or at once, with `wait=False`). An engine that does not
        have the run's pipeline (a web handler, the CLI) only records the answer and leaves
        the run `pending`: a worker engine that has the pipeline continues it.
        """
        self._check_open()
        record = await self._record(run_id)
        pauses = decode_pauses(record.pause)
        if record.status != "paused" or not pauses:
            raise NotPaused(f"run {run_id} is {record.status}, not paused; nothing to resume")
        chosen = _choose_pause(run_id, pauses, pause_id)
        # A parent shows its children's pauses: answer the run that actually waits.
        while chosen.run_id is not None and chosen.run_id != record.run_id:
            deeper = await self.store.get_run(chosen.run_id)
            origin = chosen.origin_id or chosen.pause_id
            found = decode_pauses(deeper.pause) if deeper and deeper.status == "paused" else []
            match = next((q for q in found if q.pause_id == origin), None)
            if deeper is None or match is None:
                raise NotPaused(
                    f"run {run_id} waits on run {chosen.run_id}, whose pause {origin!r} is "
                    "no longer open; it continues when that run finishes"
                )
            record, pauses, chosen = deeper, found, match
        try:
            p: Pipeline | None = await self._pipeline_for(record)
        except PipelineNotRegistered:
            p = None
        answer = self._check_answer(record.run_id, p, chosen, value)
        if p is not None:
            await self._check_loadable(p, record)
        while True:
            transitions, values = self._answer(record, p, pauses, chosen, answer)
            seq = await self._to_drive(
                record.run_id if p is not None and values.get("status") == "running" else None,
                self.store.update_run(
                    record.run_id, Guard(("paused",), seq=record.seq), transitions, values
                ),
            )
            if seq is not None:
                break
            # The run moved meanwhile: another of its pauses answered (or expired), or this
            # one, or the run cancelled. Only if this pause is gone is the answer refused;
            # else it is given again, to the run as it is now.
            now = await self.store.get_run(record.run_id)
            found = decode_pauses(now.pause) if now is not None and now.status == "paused" else []
            match = next((q for q in found if q.pause_id == chosen.pause_id), None)
            if now is None or match is None:
                raise NotPaused(f"run {run_id} was resumed or cancelled by someone else meanwhile")
            record, pauses, chosen = now, found, match
        if transitions[-1].event == "started":
            self.children.counted(record.root_run_id, record.run_id, seq)
        log.info("run %s answered at %s", record.run_id, chosen.stage_path or chosen.stage_name)
        if p is not None and values.get("status") == "running":
            await self._continue(p, record.run_id)
        elif record.depth == 0 and values.get("status") == "succeeded":
            await self._root_ended(record.run_id, "succeeded")  # a gate was its last stage
        await self._wake_ancestors(record)
        if not wait or p is None:
            return await self.get(run_id)
        return await self.wait(run_id, timeout=timeout)

    def _answer(
        self,
        record: RunRecord,
        p: Pipeline | None,
        pauses: builtins.list[Pause],
        chosen: Pause,
        answer: str,
    ) -> tuple[builtins.list[NewTransition], dict[str, Any]]:
        """The rows and run values that commit `answer` to the pause `chosen`."""
        i = chosen.stage_index
        path = chosen.stage_path or chosen.stage_name
        remaining = [q for q in pauses if q.pause_id != chosen.pause_id]
        top_level = path == chosen.stage_name
        # A gate's answer is its output: stored once, in its `succeeded` row. Without the
        # pipeline, the answer waits in the `resumed` row for a worker to make it so.
        as_output = chosen.gate and p is not None
        transitions = [NewTransition("resumed", i, path, payload=None if as_output else answer)]
        values: dict[str, Any] = {}
        if as_output:
            transitions.append(NewTransition("succeeded", i, path, 1, payload=answer))
        if remaining:
            values["pause"] = codec.encode(remaining).decode()
            values["wake_at"] = expiry_of(remaining, record.run_id)
            return transitions, values
        values.update(
            pause=None, status="pending", lease_owner=None, lease_expires=None, wake_at=None
        )
        if p is None:
            return transitions, values
        values.update(
            status="running", lease_owner=self.owner, lease_expires=time.time() + self.lease_ttl
        )
        if as_output and top_level:
            stages = p.stages
            values["stage_index"] = i + 1
            if i + 1 < len(stages):
                transitions.append(NewTransition("started", i + 1, stages[i + 1].name, 1))
            else:
                transitions.append(NewTransition("completed", len(stages)))
                values.update(
                    status="succeeded", output=answer, lease_owner=None, lease_expires=None
                )
        return transitions, values

    async def _check_loadable(self, p: Pipeline, record: RunRecord) -> None:
        """Refuse, before writing anything, to continue a run whose stored input or outputs
        no longer decode under the registered pipeline (a type changed shape)."""
        rows = await self.store.stage_results(record.run_id)
        try:
            RunState.load(p, record, rows)
        except (WaystationError, msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise PipelineChanged(
                f"run {record.run_id}: its stored input or stage outputs no longer fit "
                f"pipeline {p.name!r} version {p.version!r} ({exc}); register the version "
                "it started with, or give the changed pipeline a new version"
            ) from exc

    async def _wake_ancestors(self, run: RunRecord) -> None:
        """Continue the runs above `run` that were paused on a pause that is no longer
        open (`run` was answered, its pause expired, it ended or was cancelled): each
        re-enters the stage that launched its child, finds it by key, and waits for it
        again (or shows the pauses still open). Nearest first, every level: a run paused
        on a child's pause shows the deepest run's pause."""
        self.children.changed(run.run_id)
        parent_id = run.parent_run_id
        seen = 0
        while parent_id is not None and seen < 64 and not self._closing:
            seen += 1
            await self.wake_if_stale(parent_id)
            try:
                parent = await self.store.get_run(parent_id)
            except WaystationError:
                return
            parent_id = parent.parent_run_id if parent is not None else None

    async def wake_if_stale(self, run_id: str | None) -> bool:
        """Continue `run_id` if it is paused on a pause of a run below it that is no longer
        open. That happens when it read the run below as paused just before the pause was
        answered (or the run ended) and committed its own pause after `resume` had looked
        for paused ancestors to wake. Called after such a pause commits, and when a child
        run ends; one read when, as usual, the run is not paused."""
        if run_id is None or self._closing:
            return False  # closing: left as it is, for the next engine
        try:
            record = await self.store.get_run(run_id)
            if record is None or record.status != "paused":
                return False
            pauses = decode_pauses(record.pause)
            for pause in pauses:
                if pause.run_id is None or pause.run_id == run_id:
                    continue
                below = await self.store.get_run(pause.run_id)
                origin = pause.origin_id or pause.pause_id
                if below is None or not (
                    below.status == "paused"
                    and any(q.pause_id == origin for q in decode_pauses(below.pause))
                ):
                    return await self._wake(record, pauses)
        except WaystationError as exc:
            log.warning("run %s: could not look at its pauses again: %s", run_id, exc)
        return False

    async def _wake(self, parent: RunRecord, pauses: builtins.list[Pause]) -> bool:
        """Take a run paused on its children's pauses out of its pause: it re-enters the
        stage that launched them and waits for them again (or shows their remaining pauses
        again). False if it changed meanwhile, or if its stored values no longer load (it
        is then left paused, and remembered: taken, it would be driven by nobody)."""
        if parent.run_id in self._unloadable:
            return False
        try:
            p: Pipeline | None = self._pipeline_of(parent)
        except PipelineNotRegistered:
            p = None
        if p is not None:
            try:
                await self._check_loadable(p, parent)
            except PipelineChanged as exc:
                self._unloadable.add(parent.run_id)
                log.error("run %s not continued: %s", parent.run_id, exc)
                return False
        # Its pauses' expiry goes with them (the stage pauses again with what is still
        # open, gates keeping their first expiry): a wake-up time left behind would park
        # the run, unclaimed by any worker, until then.
        values: dict[str, Any] = {"status": "pending", "pause": None, "wake_at": None}
        if p is not None:
            values.update(lease_owner=self.owner, lease_expires=time.time() + self.lease_ttl)
            values["status"] = "running"
        seq = await self._to_drive(
            parent.run_id if p is not None else None,
            self.store.update_run(
                parent.run_id,
                Guard(("paused",), seq=parent.seq),
                [NewTransition("resumed", parent.stage_index, pauses[0].stage_name)],
                values,
            ),
        )
        if seq is None:
            return False
        if p is not None:
            await self._continue(p, parent.run_id)
        return True

    def _check_answer(self, run_id: str, p: Pipeline | None, pause: Pause, value: Any) -> str:
        """Validate a resume value against the pause's schema; the JSON to commit."""
        try:
            raw = codec.encode(value)
        except RecursionError as exc:
            raise InvalidResumeInput(
                f"resume value for run {run_id} is nested too deeply to store: {exc}"
            ) from exc
        except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as exc:
            raise InvalidResumeInput(
                f"resume value for run {run_id} cannot be serialized: {exc}"
            ) from exc
        if b"null" in raw and codec.has_nonfinite(value):
            raise InvalidResumeInput(
                f"resume value for run {run_id} holds NaN or infinity, which JSON cannot "
                "store (it would be stored as null); send None or a string instead"
            )
        tp: Any = None
        if pause.gate and p is not None:
            tp = p.stage_at(pause.stage_index, pause.stage_path).schema
        elif pause.schema_ref is not None:
            tp = codec.resolve_type_ref(pause.schema_ref)
        try:
            if tp is not None:
                return codec.encode(codec.decode(raw, tp)).decode()
            codec.validate_schema(codec.decode_any(raw), pause.schema)
            return raw.decode()
        except (msgspec.ValidationError, codec.SchemaViolation) as exc:
            raise InvalidResumeInput(
                f"resume value for run {run_id} ({pause.kind} at stage {pause.stage_name!r}) "
                f"does not match its schema: {exc}"
            ) from exc
        except RecursionError as exc:  # decoding, or checking it against the schema
            raise InvalidResumeInput(
                f"resume value for run {run_id} is nested too deeply to check: {exc}"
            ) from exc

    # -- retry and replay --------------------------------------------------------------------

    async def retry(self, run_id: str, *, wait: bool = True, timeout: float | None = None) -> Run:
        """Continue a failed or cancelled run at the stage where it stopped (same run id).

        Earlier results are kept; the stage gets a fresh retry budget. The journal shows a
        `retried` row. Refused (`InvalidRunState`) for a run that is not failed or cancelled,
        and for a failed run whose completed stages were compensated: their results stand
        for work that was undone (replay it from its first stage instead). A run cancelled
        while compensating continues its compensation and then fails as it would have.
        """
        self._check_open()
        record = await self._record(run_id)
        if record.status not in ("failed", "cancelled"):
            raise InvalidRunState(
                f"run {run_id} is {record.status}; only failed or cancelled runs can be retried"
            )
        if record.status == "failed" and await self._compensated(run_id):
            raise InvalidRunState(
                f"run {run_id} failed and its completed stages were compensated (undone); "
                "continuing it would build on undone work. Run it again from its first "
                f"stage: engine.replay({run_id!r}, from_stage=0)"
            )
        p = await self._pipeline_for(record)
        await self._check_loadable(p, record)
        i = record.stage_index
        name = p.stages[i].name if i < len(p.stages) else None
        seq = await self._to_drive(
            run_id,
            self.store.update_run(
                run_id,
                Guard(("failed", "cancelled"), seq=record.seq),
                [NewTransition("retried", i, name), NewTransition("started", i, name, 1)],
                {
                    "status": "running",
                    "error": None,
                    "cancel_requested": 0,
                    "lease_owner": self.owner,
                    "lease_expires": time.time() + self.lease_ttl,
                },
            ),
        )
        if seq is None:
            raise InvalidRunState(f"run {run_id} changed meanwhile; look at it again")
        self.children.counted(record.root_run_id, run_id, seq)
        log.info("run %s retried at %s", run_id, name)
        await self._continue(p, run_id)
        if not wait:
            return await self.get(run_id)
        return await self.wait(run_id, timeout=timeout)

    async def _compensated(self, run_id: str) -> bool:
        """Whether the run's saga undid (or began to undo) its completed stages."""
        return any(t.event == "compensating" for t in await self.store.history(run_id))

    async def replay(
        self,
        run_id: str,
        *,
        from_stage: str | int | None = None,
        input: Any = None,
        wait: bool = True,
        timeout: float | None = None,
    ) -> Run:
        """Fork a finished run into a new one that re-executes from `from_stage`.

        The new run (`run_kind="replay"`, `replay_of=run_id`) reuses the committed outputs of
        the stages before `from_stage` without executing them (journal rows `reused`), and
        executes from there with the code registered now (a fixed bug, say). `from_stage`
        defaults to the stage where the run failed or was cancelled (the first stage, if
        its completed stages were compensated: their outputs stand for undone work); a
        succeeded run needs it. With `input=` the run input is replaced and, unless
        `from_stage` says otherwise, nothing is reused. A `from_stage` after a stage that
        left no result (it failed and stopped the run, or a branch of its group did) is
        refused with `InvalidInput`, and nothing is created.
        """
        self._check_open()
        record = await self._record(run_id)
        if record.status not in TERMINAL:
            raise InvalidRunState(
                f"run {run_id} is {record.status}; only finished runs can be replayed"
            )
        p = await self._pipeline_for(record)
        if from_stage is None:
            if input is not None:
                start = 0
            elif record.status == "succeeded":
                raise InvalidRunState(
                    f"run {run_id} succeeded; say which stage to replay from (from_stage=)"
                )
            elif await self._compensated(run_id):  # failed, or cancelled while compensating
                start = 0  # what it would reuse was undone
            else:
                start = record.stage_index
        elif isinstance(from_stage, int):
            if not 0 <= from_stage < len(p.stages):
                raise InvalidInput(f"from_stage {from_stage} is not a stage index of {p.name!r}")
            start = from_stage
        else:
            if from_stage not in p.index:
                raise InvalidInput(
                    f"pipeline {p.name!r} has no stage {from_stage!r} "
                    f"(stages: {', '.join(p.index)})"
                )
            start = p.index[from_stage]
        if input is not None:
            text, _ = p.validate_input(input)
        else:
            text = record.input or "{}"
        rows = await self.store.stage_results(run_id)
        missing = _first_without_result(p, rows, start, record.stage_index)
        if missing is not None:
            # Nothing would stand for that stage's output: the stages after it would be
            # called with None for whatever they take from it.
            names = [s.name for s in p.stages[: missing + 1]]
            raise InvalidInput(
                f"run {run_id} has no result for stage {names[-1]!r} (index {missing}), "
                f"which comes before {p.stages[start].name!r}; replay it from one of "
                f"{', '.join(map(repr, names))} (from_stage=0 to {missing})"
            )
        reused: list[NewTransition] = []
        for row in rows:
            i = row.stage_index
            if i is None or i >= start:
                continue
            if row.event in ("succeeded", "reused"):
                reused.append(NewTransition("reused", i, row.stage_path, 0, payload=row.payload))
            elif row.event == "skipped":
                reused.append(NewTransition("skipped", i, row.stage_path, 0))
            elif row.event == "failed" and _handed_on(p, i, row.stage_path):
                # A continue_on_error failure is that stage's (or branch's) output.
                reused.append(
                    NewTransition(
                        "failed", i, row.stage_path, 0, payload=row.payload, error=row.error
                    )
                )
        new_id = new_run_id()
        origin = codec.encode({"replay_of": run_id, "from_stage": start, **CHILD_KEYS}).decode()
        created, _ = await self._to_drive(
            new_id,
            self.store.create_run(
                NewRun(
                    run_id=new_id,
                    pipeline=p.name,
                    pipeline_version=p.version,
                    fingerprint=p.fingerprint,
                    status="running",
                    input=text,
                    root_run_id=new_id,
                    run_kind="replay",
                    replay_of=run_id,
                    stage_index=start,
                    lease_owner=self.owner,
                    lease_expires=time.time() + self.lease_ttl,
                    transitions=[
                        NewTransition("created", payload=origin),
                        *reused,
                        NewTransition("started", start, p.stages[start].name, 1),
                    ],
                )
            ),
        )
        assert created
        log.info("run %s replays %s from %s", new_id, run_id, p.stages[start].name)
        await self._continue(p, new_id)
        if not wait:
            return await self.get(new_id)
        return await self.wait(new_id, timeout=timeout)

    async def migrate_run(self, run_id: str, *, to: Pipeline) -> Run:
        """Move a run that is not running (paused, failed, cancelled, pending) to another
        registered version of its pipeline, explicitly.

        Refused (`PipelineChanged`, the run left as it was) unless `to` has the same name,
        the stages the run has reached are the same kinds under the same names at the same
        places in `to` (a parallel group with the same branches) as in the version it is on
        (registered, or else as its journal recorded it: a version edited in place is what
        migrating is for), and their stored outputs (and the input) decode under `to`'s
        types. The journal records a `migrated` row; later resumes, retries and
        recoveries use `to`.
        """
        self._check_open()
        record = await self._record(run_id)
        target = self._resolve(to)
        if record.status in ("running", "succeeded"):
            raise InvalidRunState(
                f"run {run_id} is {record.status}; only a paused, failed, cancelled or "
                "pending run can be migrated"
            )
        if target.name != record.pipeline:
            raise PipelineChanged(
                f"run {run_id} belongs to pipeline {record.pipeline!r}, not {target.name!r}"
            )
        reached = record.stage_index + 1
        try:
            current = self._pipeline_of(record)
            passed = [_layout(s) for s in current.stages[:reached]]
            theirs = [_layout(s) for s in target.stages[: len(passed)]]
        except WaystationError as exc:
            # Its version is not registered as it was (gone, or edited in place: the usual
            # reason to migrate): compare with the stages its journal recorded. Flattened,
            # a group's branches follow it, so a branch added at the end of the last
            # reached group is not told apart from the next stage.
            recorded = await self._recorded_layout(record.run_id)
            if recorded is None:
                raise PipelineChanged(
                    f"run {run_id} cannot be migrated without the version it is on, to "
                    f"compare it with {target.version!r}: {exc}"
                ) from None
            theirs = [part for s in target.stages[:reached] for part in _flat_layout(s)]
            passed = recorded[: len(theirs)]
        if passed != theirs:
            raise PipelineChanged(
                f"run {run_id} cannot move to {target.name!r} version {target.version!r}: "
                f"the stages it has reached ({', '.join(passed)}) are "
                f"{', '.join(theirs) or 'missing'} there"
            )
        moved = msgspec.structs.replace(
            record, pipeline_version=target.version, fingerprint=target.fingerprint
        )
        await self._check_loadable(target, moved)
        seq = await self.store.update_run(
            run_id,
            Guard((record.status,), seq=record.seq),
            [
                NewTransition(
                    "migrated",
                    record.stage_index,
                    payload=codec.encode(
                        {
                            "from": record.pipeline_version,
                            "to": target.version,
                            "shape": target.shape(),
                        }
                    ).decode(),
                )
            ],
            {"pipeline_version": target.version, "fingerprint": target.fingerprint},
        )
        if seq is None:
            raise InvalidRunState(f"run {run_id} changed meanwhile; look at it again")
        log.info("run %s moved to %s v%s", run_id, target.name, target.version)
        return await self.get(run_id)

    async def _recorded_shape(self, run_id: str) -> builtins.list[str] | None:
        """`Pipeline.shape` of the version the run is on, as its journal recorded it: in
        its `created` row, or its last `migrated` row (None if neither has one)."""
        shape: builtins.list[str] | None = None
        for row in await self.store.history(run_id):
            if row.event in ("created", "migrated") and row.payload is not None:
                found = codec.decode_any(row.payload)
                if isinstance(found, dict) and isinstance(found.get("shape"), list):
                    shape = [str(line) for line in found["shape"]]
        return shape

    async def _recorded_layout(self, run_id: str) -> builtins.list[str] | None:
        """`_recorded_shape` as `_flat_layout` gives a stage: `kind name` each."""
        shape = await self._recorded_shape(run_id)
        if shape is None:
            return None
        return [" ".join(line.split("(", 1)[0].split(":", 1)) for line in shape]

    async def _continue(self, p: Pipeline, run_id: str) -> None:
        """Start driving a run we hold the lease of, from its committed state."""
        rows = await self._to_drive(run_id, self.store.stage_results(run_id))
        record = await self._to_drive(run_id, self._record(run_id))
        driver = Driver(**self._driver_args(p), state=RunState.load(p, record, rows))
        # The position the run's next commit is guarded on (nobody else moves a run we
        # hold the lease of): its stages take the one-statement step from the first one.
        driver.seq = record.seq
        self._launch(driver)

    async def _to_drive(self, run_id: str | None, step: Awaitable[T]) -> T:
        """Await `step`, a commit that leaves `run_id` running under this engine's lease
        (or a read on the way to launching its driver; None: one that does not). If the
        caller is cancelled meanwhile (a dropped web request, `asyncio.wait_for`), the
        commit may still apply, with the writer, and nothing here would drive the run while
        `_maintain` renewed its lease for ever: recovery takes it instead, as a run whose
        driver stopped (if it is running under our lease)."""
        try:
            return await step
        except asyncio.CancelledError:
            if run_id is not None and run_id not in self._active:
                self._stranded[run_id] = time.monotonic()
            raise

    # -- cancelling --------------------------------------------------------------------------

    async def cancel(self, run_id: str) -> Run:
        """Cancel a run that has not finished, and its unfinished descendants.

        A run driven here is interrupted in its current stage; if the stage's commit was
        already under way, the run is cancelled at the stage after it (or, if that commit
        finished the run, stays succeeded). A paused run, or one no engine drives (asleep,
        waiting for a worker with its pipeline, left by a closed engine), is cancelled at
        once. A run driven by another engine is marked; that engine interrupts it within
        its `poll_interval` (or at its next commit, if sooner); the returned run then still
        says `running`, `cancel_requested`.
        """
        run = await self._cancel_one(run_id)
        return await self.get(run_id) if await self._cancel_below([run_id], every=True) else run

    async def _failed(self, record: RunRecord, failed_at: float) -> None:
        """A run has failed (committed at `failed_at`): children it left open (paused at a
        gate, say, while a sibling failed) can do nothing for it any more (a retry launches
        them afresh), so they are cancelled rather than left waiting for answers
        that would go nowhere. Children created after the failure (by a retry of the run
        that came meanwhile) are its new attempt's and are left alone."""
        try:
            await self._cancel_below([record.run_id], created_by=failed_at)
        except WaystationError as exc:  # closing, or the store failed: they stay as they are
            log.warning(
                "run %s failed; its open children were not cancelled: %s", record.run_id, exc
            )

    async def _cancel_runs(self, run_ids: builtins.list[str]) -> None:
        """Cancel these runs, if unfinished, and their unfinished descendants: `cancel` for
        many runs of one parent (one walk by parent, not a tree read per run)."""
        for run_id in run_ids:
            with contextlib.suppress(InvalidRunState):
                await self._cancel_one(run_id)
        await self._cancel_below(run_ids)

    async def _cancel_below(
        self,
        parents: builtins.list[str],
        *,
        created_by: float | None = None,
        every: bool = False,
    ) -> int:
        """Cancel the unfinished descendants of `parents`; returns how many descendants it
        found. With `created_by`, only the children of `parents` created by then (and what
        is below them): later ones are a retry's. Walked by parent, an index lookup per run
        it descends into: a failing leaf in a fan-out of thousands costs one empty lookup,
        not a tree read. It descends into unfinished runs only (a finished run's children
        finished with it, or it recorded them for `_cascades`), or into `every` run
        (`cancel`: also what a crash left open under a finished run). Each run's children
        are all read before any is cancelled."""
        found = 0
        todo = [(parent, created_by) for parent in parents]
        while todo:
            parent, by = todo.pop()
            kids: builtins.list[RunRecord] = []
            after: str | None = None
            while True:
                page = await self.store.list_runs(parent_run_id=parent, after=after, limit=500)
                kids += page
                if len(page) < 500:
                    break
                after = page[-1].run_id
            found += len(kids)
            for kid in kids:
                if by is not None and kid.created_at > by:
                    continue
                if kid.status not in TERMINAL:
                    with contextlib.suppress(InvalidRunState):
                        await self._cancel_one(kid.run_id)
                elif not every:
                    continue
                # Below, every child goes: a run cancelled here has no retry to spare.
                todo.append((kid.run_id, None))
            if kids:
                # This run's children are seen to: what its ending recorded for a
                # recovery to do this (`_cascades`) is done.
                await self.store.clear_cascade(parent, upto=by)
        return found

    def _start_cascades(self) -> None:
        """Start `_cascades` in a task of its own, unless it is under way: a walk through
        thousands of children must not hold up lease renewal or cancel requests."""
        if self._cascading or self._task_group is None or self._closing:
            return
        self._cascading = True
        self._task_group.start_soon(self._cascades, name="waystation-cascades")

    async def _cascades(self) -> None:
        """Cancel what a failed or cancelled run left open when the process that ended it
        died before cancelling its children (the store records such a run in the commit
        that ends it). Only records older than a lease, so as not to race the engine that
        is doing it right now."""
        try:
            for run_id, since in await self.store.open_cascades(time.time() - self.lease_ttl):
                try:
                    if not await self._cancel_below([run_id], created_by=since):
                        await self.store.clear_cascade(run_id, upto=since)
                except WaystationError as exc:
                    self._warn_once(run_id, f"run {run_id}: open children not cancelled: {exc}")
                    continue
                log.debug("run %s: the children its ending left open are seen to", run_id)
        except WaystationError as exc:  # closing, or the store failed: the next poll retries
            log.debug("open children of ended runs not looked at: %s", exc)
        except Exception:
            log.exception("looking after the open children of ended runs failed; will retry")
        finally:
            self._cascading = False

    async def _cancel_one(self, run_id: str) -> Run:
        self._check_open()
        _check_id(run_id)
        driver = self._active.get(run_id)
        if driver is not None:
            driver.cancel_requested = True
            driver.scope.cancel()
            await driver.done.wait()
            record = await self._record(run_id)
            if record.status in TERMINAL:
                return self._to_run(record)
            # Its last commit (a pause, a sleep) got in first, or it stopped unsettled (a
            # failed commit): then it is cancelled below like a run not driven here.
        else:
            record = await self._record(run_id)
            if record.status in TERMINAL:
                raise InvalidRunState(
                    f"run {run_id} already {record.status}; it cannot be cancelled"
                )
        if record.status == "paused" or record.lease_owner is None:
            # Paused, or with no engine on it (asleep, waiting for a worker with its
            # pipeline, left running by an engine that closed): cancelled at once. The
            # guard on `seq` loses to an engine that takes it up meanwhile; then we look
            # again.
            p = self._pipelines.get((record.pipeline, record.pipeline_version))
            i = record.stage_index
            name = p.stages[i].name if p is not None and i < len(p.stages) else None
            seq = await self.store.update_run(
                run_id,
                Guard((record.status,), seq=record.seq),
                [NewTransition("cancelled", i, name)],
                {"status": "cancelled", "pause": None, "wake_at": None},
            )
            if seq is None:
                return await self._cancel_one(run_id)  # it moved on meanwhile: look again
            # A run above, paused on this run's pause (or on one below it, which it shows),
            # would otherwise wait forever: it continues, and finds its child cancelled.
            await self._wake_ancestors(record)
        else:
            await self.store.update_run(
                run_id, Guard(("running", "pending")), [], {"cancel_requested": 1}
            )
            # Its engine interrupts it (at its next poll or commit). But it may
            # have paused or gone to sleep between our read and the mark, which then
            # missed or waits for its wake-up: look again.
            now = await self._record(run_id)
            if now.status == "paused" or (now.status not in TERMINAL and not now.lease_owner):
                return await self._cancel_one(run_id)
            log.info("run %s cancel requested", run_id)
            return self._to_run(now)
        log.info("run %s cancelled", run_id)
        return self._to_run(await self._record(run_id))

    # -- reading -----------------------------------------------------------------------------

    async def _record(self, run_id: str) -> RunRecord:
        _check_id(run_id)
        record = await self.store.get_run(run_id)
        if record is None:
            raise RunNotFound(f"no run with id {run_id!r} in this database")
        return record

    async def get(self, run_id: str) -> Run:
        """The run as last committed (`RunNotFound` if there is none)."""
        return self._to_run(await self._record(run_id))

    async def list(
        self,
        *,
        status: str | None = None,
        pipeline: str | None = None,
        parent_run_id: str | None = None,
        after: str | None = None,
        limit: int = 100,
        newest_first: bool = False,
    ) -> builtins.list[Run]:
        """Runs in creation order, filtered; page with `after=<last run_id>`. With
        `newest_first`, the newest first (and `after` pages on to older ones)."""
        if status is not None and status not in ALL_STATUSES:
            raise InvalidInput(
                f"unknown status {status!r}; use one of {', '.join(sorted(ALL_STATUSES))}"
            )
        records = await self.store.list_runs(
            status=status,
            pipeline=pipeline,
            parent_run_id=parent_run_id,
            after=after,
            limit=limit,
            newest_first=newest_first,
        )
        return [self._to_run(r) for r in records]

    async def iter_runs(
        self, *, status: str | None = None, pipeline: str | None = None, page: int = 500
    ) -> AsyncIterator[Run]:
        """Every matching run, fetched page by page (constant memory)."""
        after: str | None = None
        while True:
            batch = await self.list(status=status, pipeline=pipeline, after=after, limit=page)
            for run in batch:
                yield run
            if len(batch) < page:
                return
            after = batch[-1].run_id

    def plan(self, pipeline: Pipeline, input: Any = None) -> Plan:
        """Check `pipeline` (and its child pipelines) and `input` without running anything:
        input fields, bindings and their conversions, child input/output paths, depth and
        cycles. Returns the ordered plan with every problem found (`plan.ok`, `render()`)."""
        return make_plan(pipeline, input, limits=self.limits)

    def subscribe(
        self,
        *,
        run_id: str | None = None,
        root_run_id: str | None = None,
        since: datetime | float | None = None,
        after_seq: int | None = None,
        poll_interval: float = 0.05,
        until_settled: bool = False,
    ) -> AsyncGenerator[Transition, None]:
        """Live transitions, in commit order, from this and other processes (it reads the
        journal): of one run, of one tree, or of every run. Use with
        `contextlib.aclosing(...)`. For a snapshot plus a stream that misses nothing, take
        `history(run_id)` and pass its last `seq` as `after_seq`. With `until_settled` the
        stream ends once the run is paused or finished. See `waystation.engine.events`."""
        return events.subscribe(
            self,
            run_id=run_id,
            root_run_id=root_run_id,
            since=since,
            after_seq=after_seq,
            poll_interval=poll_interval,
            until_settled=until_settled,
        )

    async def tree(self, run_id: str) -> RunTree:
        """The run and all its descendants, nested."""
        record = await self._record(run_id)
        children: dict[str | None, builtins.list[RunRecord]] = {}
        for r in await self.store.tree(record.root_run_id):
            children.setdefault(r.parent_run_id, []).append(r)

        def build(r: RunRecord) -> RunTree:
            return RunTree(
                run=self._to_run(r), children=[build(c) for c in children.get(r.run_id, [])]
            )

        return build(record)

    async def history(self, run_id: str) -> builtins.list[Transition]:
        """The run's transition journal, oldest first."""
        await self._record(run_id)
        rows = await self.store.history(run_id)
        try:
            return self._transitions(rows)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise StoreError(
                f"run {run_id}: a stored journal row is corrupt and cannot be read ({exc}); "
                "the row was changed outside waystation"
            ) from exc

    def _transitions(self, rows: builtins.list[TransitionRecord]) -> builtins.list[Transition]:
        return [events.to_transition(r) for r in rows]

    def _to_run(self, r: RunRecord) -> Run:
        try:
            return self._decode_run(r)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise StoreError(
                f"run {r.run_id}: a stored value is corrupt and cannot be read ({exc}); "
                "the row was changed outside waystation"
            ) from exc

    def _decode_run(self, r: RunRecord) -> Run:
        p = self._pipelines.get((r.pipeline, r.pipeline_version))
        if p is not None and p.fingerprint != r.fingerprint:
            p = None
        # Typed by the pipeline where it is registered; else (or if the stored value no
        # longer fits) as plain JSON.
        input_value: Any = _UNSET
        output: Any = None if r.output is None else _UNSET
        stage_name: str | None = None
        if p is not None:
            # try/except, not contextlib.suppress: this runs for every Run handed out
            # (submit, wait), and a suppress is three Python calls.
            try:
                input_value = p.decode_input(r.input or "{}")[1]
            except (WaystationError, msgspec.ValidationError):
                pass
            if r.output is not None:
                try:
                    output = codec.decode(r.output, p.stages[-1].returns)
                except msgspec.ValidationError:
                    pass
            if r.stage_index < len(p.stages):
                stage_name = p.stages[r.stage_index].name
        if input_value is _UNSET:
            input_value = codec.decode_any(r.input)
        if output is _UNSET:
            output = codec.decode_any(r.output)
        pauses = decode_pauses(r.pause)
        pause = pauses[0] if pauses else None
        if pause is not None:
            stage_name = pause.stage_name
        return Run(  # in field order (see `Run`)
            r.run_id,
            r.pipeline,
            r.pipeline_version,
            r.status,
            r.stage_index,
            stage_name,
            input_value,
            output,
            msgspec.json.decode(r.error, type=StageError) if r.error else None,
            pause,
            pauses,
            r.parent_run_id,
            r.root_run_id,
            r.run_kind,
            r.depth,
            r.idempotency_key,
            r.fingerprint,
            bool(r.cancel_requested),
            r.replay_of,
            _when(r.created_at),
            _when(r.updated_at),
        )

    async def prune(
        self,
        *,
        older_than: timedelta | float,
        status: Sequence[str] = ("succeeded", "cancelled"),
    ) -> int:
        """Delete finished runs last changed more than `older_than` ago (seconds or a
        timedelta), with their journals; returns how many runs were deleted.

        A tree of runs (a root and its children) goes only as a whole, once every run in it
        has one of `status`, and its workspace with it. A run id used again after pruning
        starts a fresh run.
        """
        self._check_open()
        seconds = older_than.total_seconds() if isinstance(older_than, timedelta) else older_than
        unknown = set(status) - TERMINAL
        if unknown:
            raise InvalidRunState(f"only finished runs can be pruned, not {sorted(unknown)}")
        cutoff = time.time() - float(seconds)
        total = 0
        after: str | None = None
        while True:
            page = await self.store.prune(cutoff, tuple(status), after=after)
            total += page.deleted
            if page.roots and self.workspace_root.exists():
                # A workspace goes with its runs (a child's lies beneath its root's): left
                # behind, it was kept for ever, and a run given the id again found it.
                await anyio.to_thread.run_sync(self._remove_workspaces, page.roots)
            if page.last is None:
                return total
            after = page.last

    def _remove_workspaces(self, roots: builtins.list[str]) -> None:
        for root in roots:
            self.children.workspaces.discard(root)
            shutil.rmtree(self.workspace_root / root, ignore_errors=True)

    # -- leases and recovery -----------------------------------------------------------------

    async def recover(self) -> int:
        """Take over runs whose owner died or whose lease expired; returns how many.

        Called on open and periodically. Runs of pipelines not registered here are left for
        an engine that has them.
        """
        if self._closing:
            return 0
        self._check_open()
        now = time.time()
        claimed = 0
        after: str | None = None
        # Marked a lease time ago or more, and not found running in a whole pass: not
        # ours to drive (a cancelled call whose commit did not apply, say). Younger marks
        # stay: their commit may still be with the writer.
        settled = time.monotonic() - self.lease_ttl
        unseen = {r for r, marked in self._stranded.items() if marked < settled}
        while True:
            batch = await self.store.active_runs(
                after=after, limit=500, exclude_owner=None if self._stranded else self.owner
            )
            if not batch:
                for run_id in unseen:
                    self._stranded.pop(run_id, None)
                return claimed
            after = batch[-1].run_id
            for record in batch:
                unseen.discard(record.run_id)
                if record.run_id in self._active or not self._abandoned(record, now):
                    continue
                try:
                    p = self._pipeline_of(record)
                except PipelineNotRegistered:
                    continue  # for an engine that has its pipeline (not worth a word here)
                except WaystationError as exc:
                    self._warn_once(record.run_id, f"run {record.run_id} not recovered: {exc}")
                    continue
                self._stranded.pop(record.run_id, None)
                state = RunState(record.run_id, None, {}, record.stage_index, [], [])
                self._launch(Driver(**self._driver_args(p), state=state, claim=record))
                claimed += 1

    def _abandoned(self, record: RunRecord, now: float) -> bool:
        if record.run_id in self._unloadable:
            return False
        if (
            record.status == "pending"
            and record.wake_at is not None
            and record.wake_at > self.clock.time()
        ):
            # Parked until then (a durable sleep or a scheduled start), on the engine's
            # clock: a test's ManualClock need not be anywhere near real time. Only a
            # pending run is parked: a running one left with a wake-up time (by earlier
            # code, which kept a woken run's expiry) is recovered like any other.
            return False
        if record.lease_owner is None or record.lease_expires is None:
            return True
        if record.lease_owner == self.owner:
            # Ours: abandoned only if our driver stopped on a failed commit.
            return record.run_id in self._stranded
        return record.lease_expires < now or _owner_is_dead(record.lease_owner)

    async def _maintain(self) -> None:
        """Renew our leases every third of the lease time; look for runnable runs."""
        renew_every = self.lease_ttl / 3
        last_renewal = time.monotonic()
        while True:
            await anyio.sleep(min(self.poll_interval, renew_every))
            # A run's task leaves `_runs` itself, unless it was cancelled before its first
            # step (its `finally` never ran): such done tasks are dropped here.
            self._runs.difference_update([t for t in self._runs if t.done()])
            try:
                if time.monotonic() - last_renewal >= renew_every:
                    await self.store.renew_leases(self.owner, time.time() + self.lease_ttl)
                    last_renewal = time.monotonic()
                if self._active:
                    await self._honour_cancel_requests()
                if self._recover_on_open:
                    await self.recover()
                    # Not in `recover`, which `Engine.open` awaits: a fresh process's open
                    # and first resume should not share the reader with it.
                    self._start_cascades()
            except Exception:
                log.exception("lease maintenance failed; will try again")

    async def _honour_cancel_requests(self) -> None:
        """Interrupt the runs driven here that another process asked to cancel (`cancel`
        there can only mark them): within a poll interval, not at their next commit,
        which a long stage may put off for hours."""
        for run_id in await self.store.cancel_requests(self.owner):
            driver = self._active.get(run_id)
            if driver is not None and not driver.cancel_requested:
                log.info("run %s: cancel asked elsewhere; interrupting it", run_id)
                driver.cancel_requested = True
                driver.scope.cancel()

    def _warn_once(self, run_id: str, message: str) -> None:
        """Log a warning about a run that this engine keeps finding and cannot act on (a
        changed pipeline version, say) once, not at every poll."""
        if run_id not in self._warned:
            self._warned.add(run_id)
            log.warning("%s", message)

    def _check_open(self) -> None:
        if not self._opened:
            raise WaystationError(
                "the engine is not open; use `async with Engine.open(...) as engine:`"
            )

    @property
    def active_runs(self) -> Sequence[str]:
        """Ids of the runs this engine is driving right now."""
        return list(self._active)
