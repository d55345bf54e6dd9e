"""Stage definitions: `@stage`, `gate`, `Retry`, and the signature analysis they rest on.

Everything that can be worked out once is worked out here, when the stage is defined: which
parameters it takes and their types, whether it is async, where the context goes. The stepper
then only looks things up.
"""

from __future__ import annotations

import inspect
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, overload

import msgspec
import tenacity

from ..errors import PipelineDefinitionError
from ..store import codec

EMPTY: Any = inspect.Parameter.empty


@dataclass(frozen=True, slots=True)
class Param:
    """A parameter of a stage (or of a `when` condition)."""

    name: str
    annotation: Any
    """The resolved type annotation, or `Any` when there is none."""
    default: Any = EMPTY
    """The default value, or `EMPTY` when the parameter is required."""

    @property
    def required(self) -> bool:
        """True when no default exists."""
        return self.default is EMPTY


@dataclass(frozen=True)
class Retry:
    """How often to retry a failing stage and how long to wait in between (via tenacity).

    The wait before attempt n+1 is `backoff * multiplier ** (n - 1)`, at most `max_backoff`,
    plus up to `jitter` seconds at random. Every failed attempt is journaled (`retrying`).
    """

    attempts: int = 3
    """Total attempts, the first included (1 = no retry)."""
    backoff: float = 0.0
    """Seconds to wait after the first failure."""
    multiplier: float = 2.0
    """Growth of the wait after each further failure."""
    max_backoff: float = 60.0
    """Upper bound of one wait, in seconds."""
    jitter: float = 0.0
    """Random extra wait, in seconds, to spread out retries of many runs."""
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    """Only these exceptions are retried; others fail the stage at once."""

    def __post_init__(self) -> None:
        # NaN compares false with everything, so the range checks below would pass it
        # (attempts=nan retried for ever); an infinite count or wait means no schedule.
        for field in ("attempts", "backoff", "multiplier", "max_backoff", "jitter"):
            value = getattr(self, field)
            if not math.isfinite(value):
                raise PipelineDefinitionError(f"Retry({field}={value!r}): must be finite")
        if self.attempts < 1:
            raise PipelineDefinitionError(f"Retry(attempts={self.attempts}): must be >= 1")
        if self.backoff < 0 or self.max_backoff < 0 or self.jitter < 0:
            raise PipelineDefinitionError("Retry: waits must not be negative")

    def wait_strategy(self, first_attempt: int = 1) -> tenacity.wait.wait_base:
        """The tenacity wait strategy this policy describes, for a retry loop whose first
        attempt is attempt number `first_attempt` of the stage (a run recovered after a
        crash continues the schedule where it was, rather than starting it over)."""
        wait: tenacity.wait.wait_base = _OffsetWait(
            tenacity.wait_exponential(
                multiplier=self.backoff, exp_base=self.multiplier, max=self.max_backoff
            ),
            first_attempt - 1,
        )
        if self.jitter:
            wait = wait + tenacity.wait_random(0, self.jitter)
        return wait


class _OffsetWait(tenacity.wait.wait_base):
    """Shifts the attempt number a wait strategy sees by `offset`."""

    def __init__(self, inner: tenacity.wait.wait_base, offset: int) -> None:
        self.inner = inner
        self.offset = offset

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        if not self.offset:
            return self.inner(retry_state)
        retry_state.attempt_number += self.offset
        try:
            return self.inner(retry_state)
        finally:
            retry_state.attempt_number -= self.offset


StageKind = Literal["stage", "gate", "child", "parallel", "sleep"]


class Stage:
    """One step of a pipeline: an async (or sync) function, or a gate that only pauses.

    Parameters bind by name to the run input's fields and to earlier stages' outputs; a
    parameter annotated `StageContext` receives the context. Create stages with `@stage` or
    `gate()`; a `Stage` is still callable as the function it wraps.
    """

    __slots__ = (
        "compensate",
        "compose",
        "context_param",
        "continue_on_error",
        "expiry",
        "fn",
        "group",
        "is_async",
        "kind",
        "name",
        "params",
        "reason",
        "retry",
        "returns",
        "schema",
        "timeout",
        "when",
        "when_params",
    )

    def __init__(
        self,
        fn: Callable[..., Any] | None,
        *,
        name: str,
        kind: StageKind = "stage",
        retry: Retry | None = None,
        timeout: float | None = None,
        when: Callable[..., Any] | None = None,
        schema: Any = Any,
        reason: str | None = None,
        continue_on_error: bool = False,
        compose: Any = None,
        group: Any = None,
        compensate: Callable[..., Any] | None = None,
        expiry: Any = None,
    ) -> None:
        from .context import StageContext

        if not isinstance(name, str) or not name.isidentifier():
            raise PipelineDefinitionError(
                f"stage name {name!r} must be a Python identifier (later stages bind it by name)"
            )
        if timeout is not None and not (isinstance(timeout, int | float) and 0 < timeout < 1e9):
            raise PipelineDefinitionError(
                f"stage {name!r}: timeout must be a positive number of seconds, not {timeout!r}"
            )
        self.fn = fn
        self.name = name
        self.kind: StageKind = kind
        self.retry = retry or Retry(attempts=1)
        self.timeout = timeout
        self.when = when
        self.schema = schema
        self.reason = reason
        self.continue_on_error = continue_on_error
        self.compose = compose
        """For a `child` stage: how it launches child runs (see `compose.ChildSpec`)."""
        self.group = group
        """For a `parallel` group: its branches (see `parallel.ParallelSpec`)."""
        self.compensate = compensate
        """Undoes the stage when a later stage fails (pipelines with on_failure="compensate");
        called with what the stage received plus its output as `output`."""
        self.expiry = expiry
        """For a gate: (seconds, on_expire); for a sleep stage: (seconds or None, wake_at
        function or None)."""
        self.context_param: str | None = None
        self.is_async = False
        params: list[Param] = []
        self.returns: Any = Any
        if fn is not None:
            self.is_async = inspect.iscoroutinefunction(fn)
            hints = resolve_hints(fn, f"stage {name!r}")
            for p in signature_params(fn, f"stage {name!r}"):
                annotation = hints.get(p.name, Any)
                if annotation is StageContext:
                    self.context_param = p.name
                    continue
                params.append(Param(p.name, annotation, p.default))
            self.returns = hints.get("return", Any)
        elif kind == "gate":
            self.returns = schema
        self.params: tuple[Param, ...] = tuple(params)
        self.when_params: tuple[Param, ...] = ()
        if when is not None:
            hints = resolve_hints(when, f"`when` of stage {name!r}")
            self.when_params = tuple(
                Param(p.name, hints.get(p.name, Any), p.default)
                for p in signature_params(when, f"`when` of stage {name!r}")
            )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.fn is None:
            raise TypeError(f"gate {self.name!r} is not callable")
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<{self.kind} {self.name}>"


def signature_params(fn: Callable[..., Any], what: str) -> list[inspect.Parameter]:
    """The named parameters of `fn`; *args/**kwargs cannot be bound by name and are refused."""
    out = []
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise PipelineDefinitionError(
                f"{what}: *{p.name} cannot be bound; name each parameter you need"
            )
        if p.kind is p.POSITIONAL_ONLY:
            raise PipelineDefinitionError(
                f"{what}: positional-only parameter {p.name!r} cannot be bound by name"
            )
        out.append(p)
    return out


def resolve_hints(fn: Callable[..., Any], what: str) -> dict[str, Any]:
    """Type hints with string annotations resolved; a clear error when one cannot be."""
    try:
        return typing.get_type_hints(fn)
    except Exception as exc:
        raise PipelineDefinitionError(
            f"{what}: cannot resolve its type annotations ({exc}); define the types at "
            "module level or import them where the function is defined"
        ) from exc


@overload
def stage(fn: Callable[..., Any], /) -> Stage: ...


@overload
def stage(
    *,
    name: str | None = None,
    retry: Retry | None = None,
    timeout: float | None = None,
    when: Callable[..., Any] | None = None,
    continue_on_error: bool = False,
    compensate: Callable[..., Any] | None = None,
) -> Callable[[Callable[..., Any]], Stage]: ...


def stage(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    retry: Retry | None = None,
    timeout: float | None = None,
    when: Callable[..., Any] | None = None,
    continue_on_error: bool = False,
    compensate: Callable[..., Any] | None = None,
) -> Stage | Callable[[Callable[..., Any]], Stage]:
    """Make a function a pipeline stage: `@stage` or `@stage(retry=..., timeout=..., when=...)`.

    A sync function runs in a worker thread. `timeout` (seconds) applies to each attempt;
    a sync stage that times out is abandoned in its thread, not interrupted. `when` is a
    function bound like a stage; when it returns false the stage is skipped and outputs None.
    With `continue_on_error`, a failure (after retries) is journaled and the run goes on:
    the stage's output is then a `ws.Failed`, which later stages may bind.
    `compensate` undoes the stage if a later one fails, in a pipeline with
    `on_failure="compensate"`: it gets the stage's parameters (by name) and `output`.
    """

    def wrap(f: Callable[..., Any]) -> Stage:
        if isinstance(f, Stage):
            raise PipelineDefinitionError(f"{f.name!r} is already a stage")
        return Stage(
            f,
            name=f.__name__ if name is None else name,
            retry=retry,
            timeout=timeout,
            when=when,
            continue_on_error=continue_on_error,
            compensate=compensate,
        )

    if fn is not None:
        return wrap(fn)
    return wrap


_FAIL = "fail"


def gate(
    name: str,
    *,
    schema: Any = Any,
    reason: str | None = None,
    when: Callable[..., Any] | None = None,
    expires_after: timedelta | float | None = None,
    on_expire: Any = _FAIL,
) -> Stage:
    """A stage that only pauses, for a person's answer.

    The run pauses here with `run.pause.kind == name`; `engine.resume(run_id, value)` checks
    `value` against `schema` and commits it as this stage's output, and the run continues at
    the next stage. Nothing before the gate runs again.

    No pause expires unless `expires_after` is given (a person may take a week). Then, once
    that time has passed, the run either fails with `ws.PauseExpired` (`on_expire="fail"`,
    the default) or continues as if resumed with `on_expire` as the answer; once, even with
    several workers.
    """
    expiry = None
    if expires_after is not None:
        seconds = (
            expires_after.total_seconds()
            if isinstance(expires_after, timedelta)
            else float(expires_after)
        )
        if not (math.isfinite(seconds) and seconds > 0):  # NaN would never expire
            raise PipelineDefinitionError(
                f"gate {name!r}: expires_after must be a positive, finite number of seconds, "
                f"not {expires_after!r}"
            )
        if not (isinstance(on_expire, str) and on_expire == _FAIL):
            # Checked as `resume` would check it, now rather than when the pause expires
            # (then it could only be logged, again and again, with the run left paused).
            try:
                raw = codec.encode(on_expire)
                codec.decode(raw, schema)
            except RecursionError:
                raise PipelineDefinitionError(
                    f"gate {name!r}: on_expire is nested too deeply to store"
                ) from None
            except (TypeError, ValueError, msgspec.EncodeError, msgspec.ValidationError) as exc:
                raise PipelineDefinitionError(
                    f"gate {name!r}: on_expire={on_expire!r} is not a valid answer: {exc}"
                ) from None
            if b"null" in raw and codec.has_nonfinite(on_expire):
                raise PipelineDefinitionError(
                    f"gate {name!r}: on_expire={on_expire!r} holds NaN or infinity, which "
                    "JSON cannot store; use None or a string instead"
                )
        expiry = (seconds, on_expire)
    return Stage(
        None, name=name, kind="gate", schema=schema, reason=reason, when=when, expiry=expiry
    )


def sleep_stage(name: str, seconds: timedelta | float) -> Stage:
    """A stage that waits `seconds`, durably: the wake-up time is committed first, the run
    is parked (no memory, no worker) and after a restart it sleeps only for the time left."""
    value = seconds.total_seconds() if isinstance(seconds, timedelta) else float(seconds)
    if not (math.isfinite(value) and value >= 0):  # NaN would not sleep, infinity for ever
        raise PipelineDefinitionError(
            f"sleep stage {name!r}: seconds must be a finite number, not negative, not {seconds!r}"
        )
    return Stage(None, name=name, kind="sleep", expiry=(value, None))


def wait_until(name: str, at: datetime | float | Callable[..., Any]) -> Stage:
    """A stage that waits, durably, until `at`: a datetime, a Unix time, or a function bound
    like a stage (its parameters come from the input and earlier outputs) returning one."""
    if callable(at) and not isinstance(at, datetime):
        stage = Stage(None, name=name, kind="sleep", expiry=(None, at))
        hints = resolve_hints(at, f"wait_until {name!r}")
        stage.params = tuple(
            Param(p.name, hints.get(p.name, Any), p.default)
            for p in signature_params(at, f"wait_until {name!r}")
        )
        return stage
    fixed = at.timestamp() if isinstance(at, datetime) else float(at)
    if not math.isfinite(fixed):  # NaN would not wait, infinity for ever
        raise PipelineDefinitionError(f"wait_until {name!r}: at must be a finite time, not {at!r}")
    return Stage(None, name=name, kind="sleep", expiry=(None, lambda: fixed))
