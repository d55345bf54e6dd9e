"""`parallel`: a group of stages that run concurrently and occupy one stage index.

Each branch's start and result are committed on their own, so after a crash only the
branches without a committed result run again. The group's output is {branch: output}, and
later stages may also bind each branch's output by the branch's own name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from ..errors import PipelineDefinitionError
from .stage import Stage

if TYPE_CHECKING:
    from .pipeline import Pipeline

OnError = Literal["fail_fast", "wait_for_all"]


@dataclass(frozen=True)
class ParallelSpec:
    """The branches of a parallel group and how they run."""

    branches: tuple[Stage, ...]
    max_concurrency: int | None
    on_error: OnError


def parallel(
    *branches: Stage | Pipeline,
    name: str | None = None,
    max_concurrency: int | None = None,
    on_error: OnError = "fail_fast",
) -> Stage:
    """Run `branches` concurrently as one stage.

    Branches are stages (a gate too) or pipelines (which run as child runs). At most
    `max_concurrency` run at once (and never more than the engine's global limit allows).
    `on_error="fail_fast"` cancels the other branches at the first failure (their
    cancellation is journaled) and fails the group; `"wait_for_all"` lets every branch
    finish and fails the group with all errors. A branch may pause: the group pauses once
    every other branch has finished or paused, and each paused branch is resumed by its
    own answer (`engine.resume(run_id, value, pause_id=...)`). Retries and timeouts are
    per branch.
    """
    from .pipeline import Pipeline

    stages = tuple(b.as_stage() if isinstance(b, Pipeline) else b for b in branches)
    if not stages:
        raise PipelineDefinitionError("parallel() needs at least one branch")
    seen: set[str] = set()
    for s in stages:
        if not isinstance(s, Stage):
            raise PipelineDefinitionError(f"parallel(): {s!r} is not a stage or pipeline")
        if s.kind == "parallel":
            raise PipelineDefinitionError("parallel(): groups cannot be nested; flatten them")
        if s.kind == "sleep":
            raise PipelineDefinitionError(
                f"parallel(): branch {s.name!r} is a sleep stage, which a group cannot run; "
                "put it before or after the group"
            )
        if s.name in seen:
            raise PipelineDefinitionError(f"parallel(): two branches are named {s.name!r}")
        seen.add(s.name)
    if max_concurrency is not None and max_concurrency < 1:
        raise PipelineDefinitionError("parallel(): max_concurrency must be >= 1")
    if on_error not in ("fail_fast", "wait_for_all"):
        raise PipelineDefinitionError("parallel(): on_error must be fail_fast or wait_for_all")
    group = Stage(
        None,
        name=name or "_".join(s.name for s in stages),
        kind="parallel",
        group=ParallelSpec(stages, max_concurrency, on_error),
    )
    group.returns = dict[str, Any]
    return group
