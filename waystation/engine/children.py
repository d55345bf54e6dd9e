"""`ChildRunner`: the one kernel through which every child run is launched.

`ctx.run_child`, a pipeline used as a stage, `branch`, `loop` and `map_children` all come
here, so linkage (parent, root, kind, depth), budgets, deterministic keys and waiting behave
the same for all of them. A child's key is (parent run, stage, attempt, call order): a parent
stage that runs again after a crash, a pause or a resume finds its children by key and gets
the finished ones' outputs back instead of launching them again. A new attempt of the stage
has keys of its own, but takes the output of a child an earlier attempt's same call ran to
success with the same pipeline and input (`_earlier_success`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import msgspec

from .._ids import new_run_id
from ..errors import BudgetExceeded, ChildFailed, InvalidRunState
from ..store import codec
from ..store.base import Guard, NewRun, NewTransition, RunRecord
from .context import PauseSignal, StageContext
from .models import StageError, decode_pauses
from .pipeline import CHILD_KEYS, Pipeline

if TYPE_CHECKING:
    from .engine import Engine
    from .runner import Driver

log = logging.getLogger("waystation")

_ENDED = ("succeeded", "failed", "cancelled")

_WAITING: Any = object()
"""`_outcome`: the child has not settled yet."""
_AGAIN: Any = object()
"""`_outcome`: the child was just woken; look again at once."""


@dataclass(frozen=True)
class Limits:
    """Limits over a whole tree of runs. Set on the Engine; a pipeline may override them
    for the children its stages launch."""

    max_depth: int = 8
    """How deep children may nest (the root is depth 0)."""
    max_total_stages: int = 10_000
    """Stage executions over the whole tree: every stage, parallel branch and retry that
    starts, as the journals' `started` and `retrying` rows count them (see `count_stage`)."""
    max_children: int | None = None
    """Child runs one stage execution may launch."""


@dataclass(eq=False)
class TreeCount:
    """The stage executions of one tree: its journals' `started` and `retrying` rows."""

    total: int = 0
    counted: dict[str, int] = field(default_factory=dict)
    """Per run, the journal position up to which its rows were read into `total`: a row
    committed as the journal was read may be in it already."""
    pending: list[tuple[str, int]] | None = field(default_factory=list)
    """Rows committed here while the journal is read, as (run, seq); None once read."""
    loaded: anyio.Event = field(default_factory=anyio.Event)

    def add(self, run_id: str, seq: int) -> None:
        """One more row, unless the journal was read with it in."""
        if self.pending is not None:
            self.pending.append((run_id, seq))
        elif seq > self.counted.get(run_id, 0):
            self.total += 1


class ChildRunner:
    """Launches, finds and waits for child runs on behalf of a parent's driver."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.trees: dict[str, TreeCount] = {}
        """Stage executions per root, kept here for trees that have children."""
        self.workspaces: set[str] = set()
        """Roots whose runs made a workspace in this process (the others need no cleanup)."""
        self._changed: dict[str, anyio.Event] = {}
        """Per child waited on here: set when it ends, is cancelled or wakes (`changed`)."""

    # -- launching ---------------------------------------------------------------------------

    async def run(
        self,
        parent: Driver,
        ctx: StageContext,
        pipeline: Pipeline,
        input: Any,
        call: int,
        kind: str,
        *,
        stage_outputs: bool = False,
    ) -> Any:
        """Launch (or find) the child for this call and wait for it to settle.

        Returns its output (or, with `stage_outputs`, {stage name: output}). Raises
        `ChildFailed`, `BudgetExceeded`, or a `PauseSignal` carrying the child's pause.
        """
        engine = self.engine
        p = engine._ensure_registered(pipeline)
        state = parent.state
        limits = parent.pipeline.limits or engine.limits
        chain = f"{state.chain} > {ctx.stage_name} > {p.name}[{call}]"
        if state.depth + 1 > limits.max_depth:
            raise BudgetExceeded(
                f"max_depth {limits.max_depth} exceeded: launching depth {state.depth + 1} "
                f"at {chain}"
            )
        if limits.max_children is not None and call + 1 > limits.max_children:
            raise BudgetExceeded(
                f"max_children {limits.max_children} exceeded: child #{call + 1} of stage "
                f"{ctx.stage_name!r} at {chain}"
            )
        await self.count_stage(parent, launching=True)
        text, typed = p.validate_input(input)
        # Shielded to the launch: a create already with the writer applies even if the
        # parent's stage is stopped meanwhile, and a child row nobody drives would keep
        # this engine's lease (renewed, so never recovered) until the process ends.
        with anyio.CancelScope(shield=True):
            child_id = await self._launch(parent, ctx, p, text, typed, call, kind, chain)
        return await self._settle(parent, p, child_id, chain, stage_outputs)

    async def _launch(
        self,
        parent: Driver,
        ctx: StageContext,
        p: Pipeline,
        text: str,
        typed: Any,
        call: int,
        kind: str,
        chain: str,
    ) -> str:
        """Create the child for this call, or find the one created before; start driving
        a new one. Returns its run id."""
        engine = self.engine
        child_id = new_run_id()
        state = parent.state
        i = ctx.stage_index
        key = _child_key(parent, ctx, call)
        if state.old_child_keys and ctx._in_branch:
            before = await self._legacy_branch_child(parent, ctx, call)
            if before is not None:
                return before.run_id
        if ctx.attempt > 1 or state.generations.get(i, 0):
            earlier = await self._earlier_success(parent, ctx, p, text, call)
            if earlier is not None:
                return earlier
        created, record = await engine.store.create_run(
            NewRun(
                run_id=child_id,
                pipeline=p.name,
                pipeline_version=p.version,
                fingerprint=p.fingerprint,
                status="running",
                input=text,
                root_run_id=state.root_run_id,
                parent_run_id=state.run_id,
                run_kind=kind,
                depth=state.depth + 1,
                idempotency_key=key,
                lease_owner=engine.owner,
                lease_expires=time.time() + engine.lease_ttl,
                transitions=[
                    NewTransition(
                        "created",
                        i,
                        ctx.stage_name,
                        payload=codec.encode(
                            {
                                "parent": state.run_id,
                                "call": call,
                                "chain": chain,
                                "lineage": [*state.lineage, state.run_id],
                                **CHILD_KEYS,
                            }
                        ).decode(),
                    ),
                    NewTransition("started", 0, p.stages[0].name, 1),
                ],
            )
        )
        if created:
            self.counted(state.root_run_id, child_id, record.seq)
            from .runner import RunState

            child_state = RunState.fresh(p, child_id, typed)
            child_state.root_run_id = state.root_run_id
            child_state.depth = state.depth + 1
            child_state.chain = chain
            child_state.lineage = (*state.lineage, state.run_id)
            engine._launch_new(p, child_state, record)
        return record.run_id

    async def _earlier_success(
        self, parent: Driver, ctx: StageContext, p: Pipeline, text: str, call: int
    ) -> str | None:
        """The child this call launched in an earlier attempt of the stage, if it succeeded
        with the same pipeline (version and code) and the same input: a new attempt (the
        stage's `Retry`, or `engine.retry`) takes its output instead of running it again.
        None if there is none, or if this attempt launched the call already (its own key
        finds that child)."""
        i = ctx.stage_index
        here = (parent.state.generations.get(i, 0), ctx.attempt)
        path = ctx.stage_path if ctx._in_branch else None
        for attempt, record in (await self._earlier_children(parent, ctx)).get((call, path), []):
            if attempt >= here:
                return None
            if (
                record.status == "succeeded"
                and record.pipeline == p.name
                and record.pipeline_version == p.version
                and record.fingerprint == p.fingerprint
                and record.input == text
            ):
                log.info(
                    "run %s stage %s attempt %d: child %s of an earlier attempt succeeded; "
                    "its output is taken",
                    parent.run_id,
                    ctx.stage_path,
                    ctx.attempt,
                    record.run_id,
                )
                return record.run_id
        return None

    async def _earlier_children(
        self, parent: Driver, ctx: StageContext
    ) -> dict[tuple[int, str | None], list[tuple[tuple[int, int], RunRecord]]]:
        """The children the stage has launched, by (call, branch path), newest attempt
        first: read once per attempt (a map's calls share it), on new attempts only."""
        found = ctx._earlier
        if found is None:
            if ctx._earlier_lock is None:
                ctx._earlier_lock = anyio.Lock()
            async with ctx._earlier_lock:
                found = ctx._earlier
                if found is None:
                    prefix = _child_prefix(parent.run_id, ctx.stage_index)
                    children = await self._stage_children(parent.run_id, ctx.stage_index)
                    found = ctx._earlier = _by_call(prefix, children)
        return found

    async def _settle(
        self, parent: Driver, p: Pipeline, child_id: str, chain: str, stage_outputs: bool
    ) -> Any:
        engine = self.engine
        delay = 0.005
        changed: anyio.Event | None = None
        try:
            while True:
                # Before reading the child: a change notified after the read is not lost.
                changed = self._changed.setdefault(child_id, anyio.Event())
                driver = engine._active.get(child_id)
                if driver is not None:
                    await self._wait(parent, child_id, driver.done.wait)
                record = await engine.store.get_run(child_id)
                assert record is not None
                result = await self._outcome(p, record, chain, stage_outputs)
                if result is _AGAIN:
                    continue
                if result is not _WAITING:
                    return result
                if child_id in engine._active:
                    continue
                if (
                    record.status == "pending"
                    and record.wake_at is not None
                    and record.wake_at > engine.clock.time()
                ):
                    # Asleep (a durable sleep parked it): nothing happens to it before its
                    # wake-up, but for an end or a cancel (notified, if made here; seen at
                    # the next look, within a lease time, if made by another process).
                    asleep = functools.partial(self._asleep, changed, record.wake_at)
                    await self._wait(parent, child_id, asleep)
                    delay = 0.005
                    continue
                # Driven by another engine, or waiting to be recovered: look again soon.
                await self._wait(parent, child_id, functools.partial(anyio.sleep, delay))
                delay = min(delay * 2, 0.5)
        finally:
            if changed is not None and self._changed.get(child_id) is changed:
                del self._changed[child_id]

    async def _asleep(self, changed: anyio.Event, wake_at: float) -> None:
        """Until the sleeping child's wake-up (on the engine's clock), a change to it made
        here, or a lease time (real time) for changes made by other processes."""
        engine = self.engine
        with anyio.move_on_after(engine.lease_ttl):
            async with anyio.create_task_group() as tg:

                async def due() -> None:
                    await engine.clock.sleep_until(wake_at)
                    tg.cancel_scope.cancel()

                tg.start_soon(due)
                await changed.wait()
                tg.cancel_scope.cancel()

    def changed(self, run_id: str) -> None:
        """A child run ended, was cancelled or woke here: its parent, if it waits on the
        child's sleep, looks again now."""
        event = self._changed.pop(run_id, None)
        if event is not None:
            event.set()

    async def _outcome(
        self, p: Pipeline, record: RunRecord, chain: str, stage_outputs: bool
    ) -> Any:
        """What the parent's wait gives for the child's row as read: its output, a raise
        (failed, cancelled, paused), `_AGAIN` (look again now) or `_WAITING`."""
        engine = self.engine
        child_id = record.run_id
        if record.status == "succeeded":
            if stage_outputs:
                return await self.stage_outputs(p, child_id)
            return codec.decode(record.output, p.stages[-1].returns) if record.output else None
        if record.status == "failed":
            raise ChildFailed(_failure_chain(p, record, chain))
        if record.status == "cancelled":
            raise ChildFailed(f"{chain}: child run {child_id} was cancelled")
        if record.status == "paused" and record.pause is not None:
            if await engine.wake_if_stale(child_id):
                return _AGAIN  # it was paused on a pause below it that is gone: wait for it
            if child_id in engine._unloadable:
                # Stale, and it cannot be continued here: showing its pause again would
                # only wake this run again, and again.
                raise ChildFailed(
                    f"{chain}: child run {child_id} cannot go on: its stored values no "
                    "longer load under its pipeline (see the log)"
                )
            # The parent shows the child's open pauses, each still pointing at the run
            # that waits (pause.run_id) and named uniquely within the parent.
            pauses = []
            for pause in decode_pauses(record.pause):
                waiting = pause.run_id or child_id
                origin = pause.origin_id or pause.pause_id
                pauses.append(
                    msgspec.structs.replace(
                        pause, run_id=waiting, origin_id=origin, pause_id=f"{waiting}/{origin}"
                    )
                )
            first = pauses[0]
            raise PauseSignal(first.kind, Any, first.reason, first.number, pauses=pauses)
        return _WAITING

    async def _wait(
        self, parent: Driver, child_id: str, wait: Callable[[], Awaitable[Any]]
    ) -> None:
        """`wait` with the parent's slot given back. If the parent's stage is stopped
        meanwhile (cancelled, timed out, a failing sibling branch), its child is stopped
        too, before the slot is taken again (the child may hold the last one), unless the
        engine is closing: then both stay as they are, for the next engine."""
        async with parent.slot_released():
            try:
                await wait()
            except anyio.get_cancelled_exc_class():
                if not self.engine._closing:
                    with anyio.CancelScope(shield=True):
                        await self._stop(child_id)
                raise

    async def _stop(self, child_id: str) -> None:
        try:
            await self.engine.cancel(child_id)
        except InvalidRunState:
            pass  # it ended meanwhile
        except Exception as exc:  # tidying up: the stop must go on as it was
            # (the engine closing meanwhile, say); the child is cancelled by the tree walk
            # of a cancel, or recovered with its parent.
            log.warning("child run %s not stopped: %s", child_id, exc)

    async def _legacy_branch_child(
        self, parent: Driver, ctx: StageContext, call: int
    ) -> RunRecord | None:
        """A child this branch call launched before branch keys named the branch: found
        under the old key if its `created` row says this branch launched it (another branch
        of the group may hold that key). Lets a run started before the change, re-entering
        its branch now, find its child instead of launching it again."""
        old = await self.engine.store.get_run_by_key(_legacy_key(parent, ctx, call))
        if old is None or old.parent_run_id != parent.run_id:
            return None
        chain = await self._chain_of(old.run_id)
        ours = f"{parent.state.chain} > {ctx.stage_name} > "
        if chain is not None and chain.startswith(ours) and chain.endswith(f"[{call}]"):
            return old
        return None

    async def _of_branches(
        self, parent: Driver, child: RunRecord, branches: tuple[str, ...]
    ) -> bool:
        """Whether one of these branches (`group.branch` paths) launched `child`: by its
        key, or, keyed before keys named the branch, by its `created` row."""
        key = child.idempotency_key or ""
        if "@" in key:
            return key.rsplit("@", 1)[1] in branches
        if not parent.state.old_child_keys:
            return False
        chain = await self._chain_of(child.run_id)
        names = [path.split(".", 1)[1] for path in branches]
        return chain is not None and any(
            chain.startswith(f"{parent.state.chain} > {name} > ") for name in names
        )

    async def _chain_of(self, run_id: str) -> str | None:
        """The chain a child's `created` row names (`parent chain > stage > pipeline[n]`)."""
        rows = await self.engine.store.history(run_id, after_seq=0)
        origin = codec.decode_any(rows[0].payload) if rows and rows[0].payload else None
        chain = origin.get("chain") if isinstance(origin, dict) else None
        return chain if isinstance(chain, str) else None

    async def stage_outputs(self, p: Pipeline, run_id: str) -> dict[str, Any]:
        """The outputs of a finished run's stages, by stage name."""
        out: dict[str, Any] = {}
        for row in await self.engine.store.stage_results(run_id):
            i = row.stage_index
            if i is None or i >= len(p.stages):
                continue
            if row.event in ("succeeded", "reused") and row.payload is not None:
                out[p.stages[i].name] = codec.decode(row.payload, p.stages[i].returns)
            elif row.event == "skipped":
                out[p.stages[i].name] = None
        return out

    async def cancel_calls(self, parent: Driver, ctx: StageContext, calls: list[int]) -> None:
        """Cancel the children these calls launched that have not finished (and theirs)."""
        open_ids = []
        for call in calls:
            found = [await self.engine.store.get_run_by_key(_child_key(parent, ctx, call))]
            if parent.state.old_child_keys and ctx._in_branch:
                # Both, if an engine of each kind launched one: the branch waits on the
                # old-keyed one (`_launch` looks there first).
                found.append(await self._legacy_branch_child(parent, ctx, call))
            for record in found:
                if record is not None and record.status not in _ENDED:
                    open_ids.append(record.run_id)
        if open_ids:
            with contextlib.suppress(Exception):
                await self.engine._cancel_runs(open_ids)

    # -- compensation ------------------------------------------------------------------------

    async def _stage_children(self, parent_run_id: str, stage_index: int) -> list[RunRecord]:
        """The children a stage of a run launched, in all its attempts (by key), in the
        order the store lists a run's children."""
        prefix = _child_prefix(parent_run_id, stage_index)
        return [
            r
            for r in await self.engine.store.list_runs(parent_run_id=parent_run_id, limit=100_000)
            if (r.idempotency_key or "").startswith(prefix)
        ]

    async def compensate_children(
        self, parent: Driver, stage_index: int, branches: tuple[str, ...] | None = None
    ) -> None:
        """Undo the succeeded child runs that the parent's stage launched (with `branches`,
        only those of these branches of its group), last launched first, each with its own
        pipeline's compensations (and its children's, deeper first). Journaled in the
        child's own journal, so each is undone once."""
        from .runner import Driver, RunState

        engine = self.engine
        kids = [
            r
            for r in await self._stage_children(parent.run_id, stage_index)
            if r.status == "succeeded"
        ]
        if branches is not None:
            kids = [r for r in kids if await self._of_branches(parent, r, branches)]
        for record in reversed(kids):
            try:
                p = engine._pipeline_of(record)
            except Exception as exc:
                log.warning("child run %s not compensated: %s", record.run_id, exc)
                continue
            rows = await engine.store.stage_results(record.run_id)
            child = Driver(**engine._driver_args(p), state=RunState.load(p, record, rows))
            run_id = record.run_id

            async def journal(transitions: list[NewTransition], run_id: str = run_id) -> None:
                await engine.store.update_run(run_id, Guard(("succeeded",)), transitions)

            await child._compensate(len(p.stages), journal)

    # -- budgets ---------------------------------------------------------------------------

    async def count_stage(self, driver: Driver, *, launching: bool = False) -> None:
        """Hold the tree's stage executions to `max_total_stages` (the driver's pipeline's
        limits, else the engine's); raise `BudgetExceeded` past it. Trees with children
        only: a driver asks when `driver.counting`, and on launching a child, which makes
        the launching root's tree one that counts.

        The count is the journals' `started` and `retrying` rows: read from the store when
        a tree is first asked about here, then kept by `counted` as this engine writes
        such rows. So it is the same whether one engine ran the whole tree or another
        read it back after a restart, and whichever run launched the first child."""
        state = driver.state
        root = state.root_run_id
        tree = await self._tree(root)
        if launching:
            driver.counting = True
        limits = driver.pipeline.limits or self.engine.limits
        if tree.total > limits.max_total_stages:
            raise BudgetExceeded(
                f"max_total_stages {limits.max_total_stages} exceeded: {tree.total} stage "
                f"executions in the tree of {root} (at {state.chain})"
            )

    async def count_tree_of(self, driver: Driver) -> bool:
        """For a root run driven again (resumed, recovered, retried) whose pipeline may
        launch children: read its tree's count if it has children. Whether it has."""
        root = driver.state.root_run_id
        if root in self.trees:
            return True
        tree = await self._tree(root)
        if len(tree.counted) > 1:
            return True
        if self.trees.get(root) is tree:
            del self.trees[root]  # no children: a root alone does not count
        return False

    def counted(self, root_run_id: str, run_id: str, seq: int) -> None:
        """A `started` or `retrying` row of `run_id`, committed as journal position `seq`:
        one more stage execution, if its tree is counted here."""
        tree = self.trees.get(root_run_id)
        if tree is not None:
            tree.add(run_id, seq)

    async def _tree(self, root: str) -> TreeCount:
        """The tree's count, read from the journals once (one reader; the others wait)."""
        while True:
            tree = self.trees.get(root)
            if tree is None:
                break
            if tree.pending is None:
                return tree
            await tree.loaded.wait()
        tree = self.trees[root] = TreeCount()
        try:
            runs = await self.engine.store.count_stage_executions(root)
        except BaseException:
            if self.trees.get(root) is tree:
                del self.trees[root]
            raise
        finally:
            tree.loaded.set()
        tree.counted = {run_id: seq for run_id, (_, seq) in runs.items()}
        tree.total = sum(n for n, _ in runs.values())
        pending, tree.pending = tree.pending or [], None
        for run_id, seq in pending:
            tree.add(run_id, seq)
        driver = self.engine._active.get(root)
        if driver is not None:
            driver.counting = True  # the root, driven here, counts its stages from now on
        return tree

    async def spend(self, driver: Driver, budget: str, amount: float) -> float:
        """Add `amount` to the tree's named budget, refusing to pass its limit."""
        if amount < 0:
            raise ValueError("cannot spend a negative amount")
        limit = (driver.pipeline.budgets or {}).get(budget, self.engine.budgets.get(budget))
        total = await self.engine.store.spend(driver.state.root_run_id, budget, amount, limit)
        if total is None:
            raise BudgetExceeded(
                f"budget {budget!r} exceeded: spending {amount:g} would pass its limit "
                f"{limit:g} for the tree of {driver.state.root_run_id} (at {driver.state.chain})"
            )
        return total

    def forget(self, root_run_id: str) -> None:
        """Drop the in-memory count of a finished tree."""
        self.trees.pop(root_run_id, None)

    # -- workspaces --------------------------------------------------------------------------

    def workspace(self, driver: Driver) -> Path:
        """The run's directory: root/<root id>/<child id>/... following the lineage."""
        state = driver.state
        parts = [*state.lineage, state.run_id]
        path = self.engine.workspace_root.joinpath(*parts)
        path.mkdir(parents=True, exist_ok=True)
        self.workspaces.add(state.root_run_id)
        return path

    def clean_workspace(self, run_id: str) -> None:
        """Remove a finished root run's workspace (with its children's beneath it). A
        workspace made in an earlier process is kept: only roots seen using one here are
        cleaned, which spares every other run a filesystem call."""
        self.workspaces.discard(run_id)
        shutil.rmtree(self.engine.workspace_root / run_id, ignore_errors=True)


def _child_prefix(parent_run_id: str, stage_index: int) -> str:
    """What the keys of every child launched by one stage of a run start with."""
    return f"child:{parent_run_id}/{stage_index}/"


def _child_key(parent: Driver, ctx: StageContext, call: int) -> str:
    """The idempotency key of a child: (parent run, stage, retry generation, attempt, call
    order, and the branch's path in a parallel group), so a stage that runs again finds
    the children it launched before. Branches of one group share its stage index and each
    counts its calls from 0: without the path, two branches' first calls shared one key, so
    the second branch got the first one's child (and its output)."""
    key = _legacy_key(parent, ctx, call)
    return f"{key}@{ctx.stage_path}" if ctx._in_branch else key


def _legacy_key(parent: Driver, ctx: StageContext, call: int) -> str:
    """`_child_key` without the branch's path: every child's key before that was added."""
    i = ctx.stage_index
    generation = parent.state.generations.get(i, 0)
    return f"{_child_prefix(parent.run_id, i)}{generation}.{ctx.attempt}/{call}"


def _by_call(
    prefix: str, children: list[RunRecord]
) -> dict[tuple[int, str | None], list[tuple[tuple[int, int], RunRecord]]]:
    """Children keyed under `prefix` (`_child_key`: `<generation>.<attempt>/<call>`, then
    `@<branch path>` in a parallel group), by (call, path), newest attempt first."""
    out: dict[tuple[int, str | None], list[tuple[tuple[int, int], RunRecord]]] = {}
    for record in children:
        head, at, path = (record.idempotency_key or "")[len(prefix) :].partition("@")
        attempt, _, call = head.partition("/")
        generation, _, number = attempt.partition(".")
        try:
            found = ((int(generation), int(number)), record)
            slot = (int(call), path if at else None)
        except ValueError:  # not a key of this shape
            continue
        out.setdefault(slot, []).append(found)
    for found_list in out.values():
        found_list.sort(key=lambda item: item[0], reverse=True)
    return out


def _failure_chain(p: Pipeline, record: RunRecord, chain: str) -> str:
    if record.error is None:
        return f"{chain}: failed"
    error = msgspec.json.decode(record.error, type=StageError)
    if error.type.endswith("ChildFailed"):
        return error.message
    short = error.type.rsplit(".", 1)[-1]
    return f"{chain} > {error.stage_name}: {short}: {error.message}"
