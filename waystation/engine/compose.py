"""Composition: pipelines as stages, `branch`, `loop` and `map_children`.

Each of these only describes which child runs to launch; launching, linkage, budgets and
recovery all happen in one place, the `ChildRunner` (children.py), so every way of starting
a child behaves the same.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import anyio

from ..errors import ChildFailed, PipelineDefinitionError
from .stage import EMPTY, Param, Retry, Stage, resolve_hints, signature_params

if TYPE_CHECKING:
    from .context import StageContext
    from .models import Pause
    from .pipeline import Pipeline

ComposeKind = Literal["child", "branch", "loop"]


@dataclass(frozen=True)
class ChildSpec:
    """How a `child` stage turns its bound parameters into child runs."""

    kind: ComposeKind
    pipelines: dict[str, Pipeline]
    """The child pipeline(s): {"": p} for a child or loop, {key: p} for a branch."""
    inputs: dict[str, str] = field(default_factory=dict)
    """Child input field -> dotted path into the parent's values (`load.documents.0`)."""
    outputs: dict[str, str] | None = None
    """Output name -> dotted path into the child's stage outputs (`score.metrics.accuracy`)."""
    selector: Callable[..., Any] | None = None
    selector_params: tuple[str, ...] = ()
    until: Callable[[Any], Any] | None = None
    max_iterations: int = 10


def resolve_path(root: Any, path: Sequence[str]) -> Any:
    """Follow `path` into `root`: mapping keys, sequence indexes, attributes."""
    value = root
    for part in path:
        if isinstance(value, Mapping):
            value = value[part]
        elif isinstance(value, list | tuple) and part.lstrip("-").isdigit():
            value = value[int(part)]
        else:
            value = getattr(value, part)
    return value


def _child_params(pipeline: Pipeline, inputs: Mapping[str, str]) -> list[Param]:
    params: dict[str, Param] = {}
    for field_name, path in inputs.items():
        if field_name not in pipeline.inputs:
            raise PipelineDefinitionError(
                f"pipeline {pipeline.name!r} has no input {field_name!r} to map "
                f"(its inputs: {', '.join(pipeline.inputs) or 'none'})"
            )
        root = path.split(".", 1)[0]
        if not root.isidentifier():
            raise PipelineDefinitionError(f"input path {path!r} must start with a name")
        params.setdefault(root, Param(root, Any))
    for f in pipeline.inputs.values():
        if f.name not in inputs:
            params.setdefault(f.name, Param(f.name, f.type, f.default))
    return list(params.values())


def child_stage(
    pipeline: Pipeline,
    name: str | None = None,
    *,
    inputs: Mapping[str, str] | None = None,
    outputs: Mapping[str, str] | None = None,
    retry: Retry | None = None,
    timeout: float | None = None,
    when: Callable[..., Any] | None = None,
    continue_on_error: bool = False,
) -> Stage:
    """A stage that runs `pipeline` as a child run (`Pipeline.as_stage` calls this)."""
    inputs = dict(inputs or {})
    stage = Stage(
        None,
        name=name or _identifier(pipeline.name),
        kind="child",
        retry=retry,
        timeout=timeout,
        when=when,
        continue_on_error=continue_on_error,
        compose=ChildSpec(
            "child",
            {"": pipeline},
            inputs,
            dict(outputs) if outputs is not None else None,
        ),
    )
    stage.params = tuple(_child_params(pipeline, inputs))
    stage.returns = Any if outputs is not None else pipeline.stages[-1].returns
    return stage


def branch(
    name: str,
    selector: Callable[..., Any],
    branches: Mapping[str, Pipeline],
    *,
    retry: Retry | None = None,
    timeout: float | None = None,
    when: Callable[..., Any] | None = None,
    continue_on_error: bool = False,
) -> Stage:
    """A stage that calls `selector` (bound by name like a stage) and runs the pipeline of
    `branches` it names as a child run; the child's output is the stage's output."""
    if not branches:
        raise PipelineDefinitionError(f"branch {name!r} has no branches")
    hints = resolve_hints(selector, f"selector of branch {name!r}")
    selector_params = [
        Param(p.name, hints.get(p.name, Any), p.default)
        for p in signature_params(selector, f"selector of branch {name!r}")
    ]
    params: dict[str, Param] = {p.name: p for p in selector_params}
    for p in branches.values():
        for f in p.inputs.values():
            params.setdefault(f.name, Param(f.name, f.type, f.default))
    stage = Stage(
        None,
        name=name,
        kind="child",
        retry=retry,
        timeout=timeout,
        when=when,
        continue_on_error=continue_on_error,
        compose=ChildSpec(
            "branch",
            dict(branches),
            selector=selector,
            selector_params=tuple(p.name for p in selector_params),
        ),
    )
    stage.params = tuple(params.values())
    return stage


def loop(
    pipeline: Pipeline,
    *,
    until: Callable[[Any], Any],
    max_iterations: int = 10,
    name: str | None = None,
    retry: Retry | None = None,
    timeout: float | None = None,
    when: Callable[..., Any] | None = None,
) -> Stage:
    """A stage that runs `pipeline` again and again, each iteration its own child run,
    until `until(output)` is true or `max_iterations` ran; its output is the last output.

    The first iteration's input binds from the parent like any stage; each later one gets
    the previous output: a mapping of the child's input fields, or, for a child with a
    single input field, the value of that field.
    """
    if max_iterations < 1:
        raise PipelineDefinitionError("loop: max_iterations must be >= 1")
    stage = Stage(
        None,
        name=name or f"{_identifier(pipeline.name)}_loop",
        kind="child",
        retry=retry,
        timeout=timeout,
        when=when,
        compose=ChildSpec("loop", {"": pipeline}, until=until, max_iterations=max_iterations),
    )
    stage.params = tuple(_child_params(pipeline, {}))
    stage.returns = pipeline.stages[-1].returns
    return stage


async def map_children(
    ctx: StageContext,
    pipeline: Pipeline,
    items: Sequence[Mapping[str, Any] | Any],
    *,
    max_concurrency: int | None = None,
    on_error: Literal["fail_fast", "wait_for_all"] = "fail_fast",
) -> list[Any]:
    """Run `pipeline` once per item (each item is a child's input), at most
    `max_concurrency` at a time; returns the outputs in item order.

    With `on_error="fail_fast"` the first failure cancels the other children and fails the
    stage; with `"wait_for_all"` every child finishes and the stage fails with all errors.
    If children pause (and none failed), the stage pauses once the others are done; each
    paused child is resumed on its own, and the stage continues when all are done.
    """
    if on_error not in ("fail_fast", "wait_for_all"):
        raise ValueError("on_error must be 'fail_fast' or 'wait_for_all'")
    calls = [ctx._next_call() for _ in items]
    results: list[Any] = [None] * len(items)
    errors: list[tuple[int, BaseException]] = []
    paused: list[Pause] = []
    limit = anyio.Semaphore(max_concurrency or max(1, len(items)))

    async def one(k: int, item: Any) -> None:
        async with limit:
            try:
                results[k] = await ctx._run_child_call(pipeline, item, calls[k], kind="map")
            except Exception as exc:  # ChildFailed, BudgetExceeded, InvalidInput, ...
                errors.append((k, exc))
                if on_error == "fail_fast":
                    tg.cancel_scope.cancel()
            except BaseException as exc:
                from .context import PauseSignal

                if isinstance(exc, PauseSignal):
                    paused.extend(exc.pauses or [])
                    return
                raise

    async with anyio.create_task_group() as tg:
        for k, item in enumerate(items):
            tg.start_soon(one, k, item)
    if errors:
        errors.sort(key=lambda e: e[0])
        # The stage fails: children still open (running after a fail-fast, paused at a
        # gate) can do nothing for it; a new attempt (its Retry) launches its own.
        await ctx._cancel_calls(calls)
        if on_error == "fail_fast":
            raise errors[0][1]
        detail = "; ".join(f"[{k}] {e}" for k, e in errors)
        raise ChildFailed(f"{len(errors)} of {len(items)} children failed: {detail}")
    if paused:
        from .context import PauseSignal

        paused.sort(key=lambda p: p.pause_id)
        first = paused[0]
        raise PauseSignal(first.kind, Any, first.reason, first.number, pauses=paused)
    return results


async def run_composite(stage: Stage, kwargs: dict[str, Any], ctx: StageContext) -> Any:
    """Execute a `child` stage: turn its bound parameters into child runs; its output."""
    spec: ChildSpec = stage.compose
    driver = ctx._require_driver()
    if spec.kind == "branch":
        assert spec.selector is not None
        key = spec.selector(**{n: kwargs[n] for n in spec.selector_params})
        if hasattr(key, "__await__"):
            key = await key
        chosen = spec.pipelines.get(str(key))
        if chosen is None:
            raise ChildFailed(
                f"branch {stage.name!r}: selector returned {key!r}, not one of "
                f"{', '.join(map(repr, spec.pipelines))}"
            )
        return await ctx._run_child_call(
            chosen, _inputs(chosen, kwargs), ctx._next_call(), "branch"
        )
    pipeline = spec.pipelines[""]
    child_input = _inputs(pipeline, kwargs)
    for field_name, path in spec.inputs.items():
        child_input[field_name] = _follow(stage, "input", path, kwargs)
    if spec.kind == "loop":
        output: Any = None
        for iteration in range(spec.max_iterations):
            output = await ctx._run_child_call(pipeline, child_input, ctx._next_call(), "loop")
            assert spec.until is not None
            done = spec.until(output)
            if hasattr(done, "__await__"):
                done = await done
            if done:
                break
            child_input = _next_input(pipeline, output, stage.name, iteration)
        return output
    if spec.outputs is None:
        return await ctx._run_child_call(pipeline, child_input, ctx._next_call(), "child")
    outputs = await driver.children.run(
        driver, ctx, pipeline, child_input, ctx._next_call(), "child", stage_outputs=True
    )
    return {name: _follow(stage, "output", path, outputs) for name, path in spec.outputs.items()}


def _follow(stage: Stage, what: str, path: str, roots: Mapping[str, Any]) -> Any:
    """Resolve a dotted `path` whose first part names one of `roots`."""
    root, *rest = path.split(".")
    try:
        return resolve_path(roots[root], rest)
    except (KeyError, IndexError, AttributeError, TypeError) as exc:
        raise ChildFailed(
            f"stage {stage.name!r}: {what} path {path!r} does not resolve ({exc!r})"
        ) from exc


def _inputs(pipeline: Pipeline, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    return {f: kwargs[f] for f in pipeline.inputs if f in kwargs}


def _next_input(pipeline: Pipeline, output: Any, name: str, iteration: int) -> dict[str, Any]:
    fields = list(pipeline.inputs)
    if isinstance(output, Mapping) and set(fields) <= set(output):
        return {f: output[f] for f in fields}
    if len(fields) == 1:
        return {fields[0]: output}
    raise ChildFailed(
        f"loop {name!r}: iteration {iteration}'s output cannot feed the next iteration: "
        f"return a mapping with the fields {', '.join(fields)}"
    )


def _identifier(name: str) -> str:
    out = "".join(c if c.isalnum() else "_" for c in name)
    return out if out[:1].isalpha() else f"p_{out}"


__all__ = ["EMPTY", "ChildSpec", "branch", "child_stage", "loop", "map_children"]
