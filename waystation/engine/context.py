"""What a running stage can see and do: `StageContext`, and the pause signal it raises."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar, overload

from ..store import codec

T = TypeVar("T")


class PauseSignal(BaseException):
    """Unwinds a stage that paused. A BaseException so that `except Exception` in user code
    cannot swallow it (and retries do not treat it as a failure)."""

    def __init__(self, kind: str, schema: Any, reason: str | None, number: int) -> None:
        super().__init__(kind)
        self.kind = kind
        self.schema = schema
        self.reason = reason
        self.number = number


class StageContext:
    """Handed to a stage that declares a parameter annotated `StageContext`.

    `input` is the run input, `results` the outputs of the stages before this one (by stage
    name), `attempt` counts from 1 and `idempotency_key` is the same on every attempt of this
    stage in this run, for use with external APIs that deduplicate.
    """

    __slots__ = (
        "_answers",
        "_pauses",
        "attempt",
        "input",
        "pipeline",
        "results",
        "run_id",
        "stage_index",
        "stage_name",
    )

    def __init__(
        self,
        *,
        run_id: str,
        pipeline: str,
        stage_index: int,
        stage_name: str,
        attempt: int,
        input: Any,
        results: Mapping[str, Any],
        answers: list[str],
    ) -> None:
        self.run_id = run_id
        self.pipeline = pipeline
        self.stage_index = stage_index
        self.stage_name = stage_name
        self.attempt = attempt
        self.input = input
        self.results = results
        self._answers = answers
        self._pauses = 0

    @property
    def idempotency_key(self) -> str:
        """`<run_id>:<stage_index>`: stable across attempts, crashes and resumes."""
        return f"{self.run_id}:{self.stage_index}"

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
        number = self._pauses
        self._pauses += 1
        if number < len(self._answers):
            return codec.decode(self._answers[number], schema)
        raise PauseSignal(kind, schema, reason, number)
