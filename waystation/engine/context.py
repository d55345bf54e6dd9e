"""What a running stage can see and do: `StageContext`, and the pause signal it raises."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, overload

from ..store import codec

if TYPE_CHECKING:
    import anyio

    from ..store.base import RunRecord
    from .models import Pause
    from .pipeline import Pipeline
    from .runner import Driver

T = TypeVar("T")


class PauseSignal(BaseException):
    """Unwinds a stage that paused. A BaseException so that `except Exception` in user code
    cannot swallow it (and retries do not treat it as a failure)."""

    def __init__(
        self,
        kind: str,
        schema: Any,
        reason: str | None,
        number: int,
        pauses: list[Pause] | None = None,
    ) -> None:
        super().__init__(kind)
        self.kind = kind
        self.schema = schema
        self.reason = reason
        self.number = number
        self.pauses = pauses
        """Set when child runs or parallel branches paused: their open pauses, which the
        stage's run shows as its own."""


class SleepSignal(BaseException):
    """Unwinds a stage that sleeps (`ctx.sleep`): the run is parked until `wake_at`."""

    def __init__(self, wake_at: float, number: int) -> None:
        super().__init__(wake_at)
        self.wake_at = wake_at
        self.number = number


class StageContext:
    """Handed to a stage that declares a parameter annotated `StageContext`.

    `input` is the run input, `results` the outputs of the stages before this one (by stage
    name), `attempt` counts from 1 and `idempotency_key` is the same on every attempt of this
    stage in this run, for use with external APIs that deduplicate.
    """

    __slots__ = (
        "_answers",
        "_calls",
        "_driver",
        "_earlier",
        "_earlier_lock",
        "_pauses",
        "_sleeps",
        "_slept",
        "attempt",
        "input",
        "pipeline",
        "results",
        "run_id",
        "stage_index",
        "stage_name",
        "stage_path",
    )

    def __init__(
        self,
        *,
        run_id: str,
        pipeline: str,
        stage_index: int,
        stage_name: str,
        attempt: int,
        stage_path: str | None = None,
        input: Any,
        results: Mapping[str, Any],
        answers: list[str],
        sleeps: list[float] | None = None,
        driver: Driver | None = None,
    ) -> None:
        self.run_id = run_id
        self.pipeline = pipeline
        self.stage_index = stage_index
        self.stage_name = stage_name
        self.stage_path = stage_path or stage_name
        """The stage's name, or `group.branch` inside a parallel group."""
        self.attempt = attempt
        self.input = input
        self.results = results
        self._answers = answers
        self._pauses = 0
        self._sleeps = sleeps if sleeps is not None else []
        self._slept = 0
        self._calls = 0
        self._driver = driver
        self._earlier: (
            dict[tuple[int, str | None], list[tuple[tuple[int, int], RunRecord]]] | None
        ) = None
        """The children the stage's attempts launched (`ChildRunner`), once read."""
        self._earlier_lock: anyio.Lock | None = None

    @property
    def idempotency_key(self) -> str:
        """`<run_id>:<stage_index>` (`<run_id>:<stage_index>:<group.branch>` in a parallel
        branch): stable across attempts, crashes and resumes, and different for each stage
        and each branch of a run, so an external API that deduplicates by it never takes
        one branch's call for another's."""
        if self._in_branch:
            return f"{self.run_id}:{self.stage_index}:{self.stage_path}"
        return f"{self.run_id}:{self.stage_index}"

    @property
    def _in_branch(self) -> bool:
        """Whether this stage is a branch of a parallel group (its path is `group.branch`)."""
        return self.stage_path != self.stage_name

    @overload
    async def pause(self, kind: str, *, schema: type[T], reason: str | None = None) -> T: ...

    @overload
    async def pause(self, kind: str, *, schema: Any = ..., reason: str | None = None) -> Any: ...

    async def pause(self, kind: str, *, schema: Any = Any, reason: str | None = None) -> Any:
        """Pause the run for a person's answer and return that answer (decoded as `schema`).

        The first time, this unwinds the stage and the run pauses. When the run is resumed,
        the stage starts again from its beginning, and this call now returns the answer. So
        code before a pause runs once more on resume: keep it free of side effects, or put
        the pause in a `gate` stage of its own. A stage may pause several times; on each
        re-entry the earlier answers are returned in order, and each is applied once.
        """
        if not isinstance(kind, str) or not kind:
            raise TypeError(f"ctx.pause: kind must be a non-empty string, not {kind!r}")
        if reason is not None and not isinstance(reason, str):
            raise TypeError(f"ctx.pause: reason must be a string, not {reason!r}")
        number = self._pauses
        self._pauses += 1
        if number < len(self._answers):
            return codec.decode(self._answers[number], schema)
        raise PauseSignal(kind, schema, reason, number)

    async def sleep(self, seconds: float) -> None:
        """Sleep durably: the wake-up time is committed, the run is parked (no memory, no
        worker) and, when the time comes (after a restart too), the stage runs again from
        its start and this call returns at once. As with `pause`, code before it runs
        again: keep it free of side effects. For a plain wait, prefer `ws.sleep_stage`."""
        number = self._slept
        self._slept += 1
        driver = self._require_driver()
        if number < len(self._sleeps):
            wake_at = self._sleeps[number]
            if driver.clock.time() >= wake_at:
                return
            raise SleepSignal(wake_at, number)
        raise SleepSignal(driver.clock.time() + max(0.0, seconds), number)

    # -- children ----------------------------------------------------------------------------

    async def run_child(self, pipeline: Pipeline, input: Any = None) -> Any:
        """Run `pipeline` as a child run of this one and return its output.

        The child is keyed by (this run, this stage, the call's order in the stage): when
        the stage runs again (after a crash, a resume or a pause), the same call finds the
        finished child and returns its output without launching it again. A child that
        fails raises `ws.ChildFailed`; a child that pauses pauses this run too.
        """
        return await self._run_child_call(pipeline, input, self._next_call(), kind="child")

    async def spend(self, budget: str, amount: float) -> float:
        """Spend `amount` of the named budget of this run tree (e.g. "tokens"); returns the
        total spent so far. Raises `ws.BudgetExceeded` past the limit set on the engine or
        pipeline (`budgets={"tokens": 200_000}`). Spending is at-least-once: a stage that
        runs again after a crash spends again."""
        return await self._require_driver().children.spend(self._require_driver(), budget, amount)

    @property
    def workspace(self) -> Path:
        """A directory of this run's own under the engine's `workspace_root` (a child's
        lies beneath its parent's), created on first use."""
        return self._require_driver().children.workspace(self._require_driver())

    def _next_call(self) -> int:
        call = self._calls
        self._calls += 1
        return call

    async def _run_child_call(self, pipeline: Pipeline, input: Any, call: int, kind: str) -> Any:
        driver = self._require_driver()
        return await driver.children.run(driver, self, pipeline, input, call, kind)

    async def _cancel_calls(self, calls: list[int]) -> None:
        driver = self._require_driver()
        await driver.children.cancel_calls(driver, self, calls)

    def _require_driver(self) -> Driver:
        if self._driver is None:
            raise RuntimeError("this StageContext is not attached to a running engine")
        return self._driver
