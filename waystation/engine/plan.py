"""Dry-run plans: check a pipeline, its input and its child pipelines without running anything.

`make_plan(pipeline, input)` walks the pipeline as the engine would run it (stages in order,
the branches of parallel groups, the pipelines that child stages, branches and loops launch,
recursively) and collects every problem it can prove from the definitions alone:

- the input does not match the pipeline's input fields;
- a binding that decodes an output (or an input field) into a parameter of another type
  whose shape cannot hold it (compared as msgspec JSON Schemas), or into a type msgspec
  cannot decode at all;
- a stage whose return annotation msgspec cannot decode (its output could not be stored);
- a dotted path of `as_stage(inputs=..., outputs=...)` that does not exist in the types it
  walks (Struct, dataclass, TypedDict and NamedTuple fields, list and tuple items), or whose
  end does not fit the child's input field;
- a child pipeline's input that the parent does not provide, or provides in a shape that
  the child's input fields refuse; a loop whose output cannot feed its next iteration; a
  branch selector annotated to return a value that names no branch;
- static nesting of children deeper than `Limits.max_depth`, fewer `max_children` than a
  child stage launches (both the launching pipeline's limits), more stage executions in the
  tree, even at the least, than `max_total_stages` of the pipeline whose stage counts them;
- a pipeline that includes itself.

What the plan cannot see becomes a warning, not a problem: a path into `Any` or
`dict[str, Any]`, a value that may be None (a skipped stage) or a `ws.Failed`
(`continue_on_error`), a type only some of whose values decode where they go (`int | None`
into `int`: the stage fails only if the value is None). Children launched from code
(`ctx.run_child`, `map_children`) and the values stages actually return are beyond it.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import types
import typing
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import msgspec

from ..errors import InvalidInput
from ..store import codec
from .children import Limits
from .compose import ChildSpec
from .models import Failed
from .parallel import ParallelSpec
from .pipeline import Binding, InputField, Pipeline
from .stage import Param, Stage

StepKind = Literal["stage", "gate", "child", "branch", "loop", "parallel"]
ParamSource = Literal["input", "stage", "default", "missing"]


class PlanParam(msgspec.Struct, frozen=True, kw_only=True):
    """One value a step receives, and where it comes from."""

    name: str
    """The parameter (for a child run: the child's input field)."""
    type: str
    """Its annotation (for a child run: the child's input field type)."""
    source: ParamSource
    """`input`: a field of the run input; `stage`: an earlier stage's (or branch's) output;
    `default`: nothing provides it, its default is used; `missing`: nothing provides it and
    it has no default (a problem)."""
    ref: str | None = None
    """The input field, the stage (`group.branch` for a branch of a parallel group), or the
    dotted path into one (`load.documents.0`)."""
    decoded: bool = False
    """True when the value is decoded from its producer's type into `type` on the way."""


class PlanInput(msgspec.Struct, frozen=True, kw_only=True):
    """One field of the pipeline's input."""

    name: str
    type: str
    required: bool


class PlanStep(msgspec.Struct, frozen=True, kw_only=True):
    """One step of the plan: a stage, a gate, a child run (a pipeline as a stage, or one
    option of a branch), a branch, a loop, or a parallel group with its branches."""

    kind: StepKind
    name: str
    path: str
    """Where it is: `root > child stage > ... .stage` (`nightly > report > review.score`)."""
    params: list[PlanParam] = []
    returns: str = "Any"
    """The type of its output, as later stages see it."""
    pipeline: str | None = None
    """For a child run or loop: the pipeline it runs (`name vVERSION`)."""
    key: str | None = None
    """For an option of a branch: the selector's value that picks it."""
    attempts: int = 1
    """Attempts its retry policy allows (1: no retry)."""
    timeout: float | None = None
    when: bool = False
    """True when a `when` condition may skip it (its output is then None)."""
    continue_on_error: bool = False
    thread: bool = False
    """True for a sync function: it runs in a worker thread."""
    reason: str | None = None
    """For a gate: why it pauses."""
    outputs: dict[str, str] | None = None
    """For a child run with `outputs=`: output name -> dotted path into the child's stage
    outputs (the step's output is that mapping)."""
    max_iterations: int | None = None
    """For a loop."""
    max_concurrency: int | None = None
    """For a parallel group."""
    on_error: str | None = None
    """For a parallel group: fail_fast or wait_for_all."""
    steps: list[PlanStep] = []
    """The steps of the child pipeline, of each option of a branch, or the branches of a
    parallel group."""


class Plan(msgspec.Struct, frozen=True, kw_only=True):
    """What running `pipeline` with an input would do, and what would go wrong.

    `ok` is True when no problem was found: then no binding, path or decode between the
    stages and child pipelines seen here fails for the types their annotations declare.
    """

    pipeline: str
    version: str
    fingerprint: str
    ok: bool
    input_checked: bool
    """False when no input was given (then only the definitions were checked)."""
    inputs: list[PlanInput]
    steps: list[PlanStep]
    problems: list[str]
    """Each names where it is (`nightly > report > review.score: ...`)."""
    warnings: list[str] = []
    """What the plan could not check, or what may go wrong depending on the values."""
    depth: int = 0
    """How deep static child runs nest (0: no child pipelines)."""
    min_stage_executions: int = 0
    """Stage executions of the whole tree at the least (no retry, no child a `when` skips,
    one loop iteration, the smallest branch option, no children launched from code), as
    the engine counts them against `max_total_stages`: every stage that starts (a gate, a
    parallel group and each of its branches, a stage its `when` then skips, a child stage;
    launching the child adds none, its own stages count) and every retry: the journals'
    `started` and `retrying` rows."""
    limits: Limits = Limits()
    budgets: dict[str, float] = {}

    def render(self) -> str:
        """The plan as indented text, problems and warnings at the end."""
        verdict = "ok" if self.ok else f"{len(self.problems)} problem(s)"
        out = [f"plan of {self.pipeline} v{self.version} ({self.fingerprint}): {verdict}"]
        if self.inputs:
            fields = ", ".join(
                f"{f.name}: {f.type}" + ("" if f.required else " (optional)") for f in self.inputs
            )
        else:
            fields = "none"
        checked = "the given input checked" if self.input_checked else "no input given"
        out.append(f"input: {fields} ({checked})")
        lim = self.limits
        children = "none" if lim.max_children is None else str(lim.max_children)
        out.append(
            f"limits of {self.pipeline}: max_depth {lim.max_depth}, max_total_stages "
            f"{lim.max_total_stages}, max_children {children}"
        )
        out.append(
            f"tree: child runs nest {self.depth} deep, at least {self.min_stage_executions} "
            "stage executions"
        )
        if self.budgets:
            out.append(
                "budgets: " + ", ".join(f"{k} {v:g}" for k, v in sorted(self.budgets.items()))
            )
        out.append("")
        _render_steps(self.steps, out, "  ", numbered=True)
        out.append("")
        if self.problems:
            out.append(f"problems ({len(self.problems)}):")
            out.extend(f"  - {p}" for p in self.problems)
        else:
            out.append("no problems found")
        if self.warnings:
            out.append(f"warnings ({len(self.warnings)}):")
            out.extend(f"  - {w}" for w in self.warnings)
        return "\n".join(out)


def _render_steps(steps: Sequence[PlanStep], out: list[str], indent: str, numbered: bool) -> None:
    for n, step in enumerate(steps, 1):
        mark = f"{n}." if numbered else "-"
        out.append(f"{indent}{mark} {_describe(step)}")
        inner = indent + " " * (len(mark) + 1)
        if step.kind == "branch":
            for option in step.steps:
                out.append(f"{inner}[{option.key}] {_describe(option)}")
                _render_steps(option.steps, out, inner + "    ", numbered=True)
        elif step.kind == "parallel":
            _render_steps(step.steps, out, inner, numbered=False)
        else:
            _render_steps(step.steps, out, inner, numbered=True)


def _describe(step: PlanStep) -> str:
    args = ", ".join(_arg(p) for p in step.params)
    if step.kind == "gate":
        text = f"{step.name}: gate, pauses for an answer of type {step.returns}"
        if step.reason:
            text += f" ({step.reason!r})"
    elif step.kind == "parallel":
        count = len(step.steps)
        at_once = f", {step.max_concurrency} at once" if step.max_concurrency else ""
        text = (
            f"{step.name}: parallel, {count} branch{'' if count == 1 else 'es'}"
            f"{at_once}, {step.on_error} -> {step.returns}"
        )
    elif step.kind == "branch":
        text = f"{step.name}: branch, selector({args}) picks one of {len(step.steps)}"
    elif step.kind == "loop":
        text = (
            f"{step.name}: loop of {step.pipeline}, up to {step.max_iterations} iterations "
            f"({args}) -> {step.returns}"
        )
    elif step.kind == "child" and step.key is not None:
        text = f"child run of {step.pipeline} ({args}) -> {step.returns}"
    elif step.kind == "child":
        returns = step.returns
        if step.outputs is not None:
            returns = "{" + ", ".join(f"{k}={v}" for k, v in step.outputs.items()) + "}"
        text = f"{step.name}: child run of {step.pipeline} ({args}) -> {returns}"
    else:
        text = f"{step.name}({args}) -> {step.returns}"
    flags = []
    if step.when:
        flags.append("when")
    if step.attempts > 1:
        flags.append(f"{step.attempts} attempts")
    if step.timeout is not None:
        flags.append(f"timeout {step.timeout:g}s")
    if step.continue_on_error:
        flags.append("continue on error")
    if step.thread:
        flags.append("thread")
    return text + (f"  [{', '.join(flags)}]" if flags else "")


def _arg(p: PlanParam) -> str:
    if p.source == "default":
        return f"{p.name}=default"
    if p.source == "missing":
        return f"{p.name}=MISSING"
    ref = f"input.{p.ref}" if p.source == "input" else str(p.ref)
    return f"{p.name}={ref}" + (f" as {p.type}" if p.decoded else "")


# -- planning ----------------------------------------------------------------------------------


def make_plan(pipeline: Pipeline, input: Any = None, *, limits: Limits | None = None) -> Plan:
    """Plan a run of `pipeline` without running anything: its ordered steps, and every
    problem found in the input (when one is given), the bindings, the paths of child stages,
    the child pipelines (recursively), the limits and cycles.

    `limits` are the engine's; the default is `Limits()`. As in the engine, a pipeline's own
    `limits` override them for the children it launches (`max_depth`, `max_children`) and
    for the tree's count as its own stages reach it (`max_total_stages`).
    """
    planner = _Planner(limits or Limits())
    input_checked = input is not None
    if input_checked:
        try:
            pipeline.validate_input(input)
        except InvalidInput as exc:
            message = str(exc).removeprefix(f"pipeline {pipeline.name!r}: ")
            planner.problems.append(f"{pipeline.name}: {message}")
        except (TypeError, ValueError) as exc:
            planner.problems.append(f"{pipeline.name}: input cannot be decoded: {exc}")
    steps, count = planner.pipeline(pipeline, pipeline.name, 0, [])
    # The engine counts stage executions only in trees that launch children.
    if planner.depth:
        for message, maybe in planner.over_total:
            (planner.warnings if maybe else planner.problems).append(message)
    root_limits = pipeline.limits or planner.limits
    return Plan(
        pipeline=pipeline.name,
        version=pipeline.version,
        fingerprint=pipeline.fingerprint,
        ok=not planner.problems,
        input_checked=input_checked,
        inputs=[
            PlanInput(name=f.name, type=type_name(f.type), required=f.required)
            for f in pipeline.inputs.values()
        ],
        steps=steps,
        problems=planner.problems,
        warnings=list(dict.fromkeys(planner.warnings)),
        depth=planner.depth,
        min_stage_executions=count,
        limits=root_limits,
        budgets=dict(pipeline.budgets),
    )


class _Planner:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.problems: list[str] = []
        self.warnings: list[str] = []
        self.over_total: list[tuple[str, bool]] = []
        """Stage executions past `max_total_stages`, and whether on a path that only some
        inputs take: problems (warnings for those) if the tree has children."""
        self.depth = 0

    # -- a pipeline --------------------------------------------------------------------------

    def pipeline(
        self,
        p: Pipeline,
        prefix: str,
        depth: int,
        stack: list[str],
        beyond: bool = False,
        before: int = 0,
        maybe: bool = False,
    ) -> tuple[list[PlanStep], int]:
        """The steps of `p` and the least number of stage executions of its tree.

        `before`: the least number of stage executions in the whole tree when `p` starts.
        """
        self.depth = max(self.depth, depth)
        stack = [*stack, p.name]
        for f in p.inputs.values():
            error = _decode_error(f.type)
            if error is not None:
                self.problems.append(
                    f"{prefix}: input field {f.name!r} is {type_name(f.type)}, which msgspec "
                    f"cannot decode ({error})"
                )
        steps: list[PlanStep] = []
        count = 0
        # Each driver checks the tree's running count against its own pipeline's limits
        # (else the engine's) as it counts one of its stages: so does the plan, once.
        limits = p.limits or self.limits
        over = False
        for i, s in enumerate(p.stages):
            ctx = _Where(p, prefix, depth, stack, beyond, before + count, maybe)
            if s.kind == "parallel":
                step, n, own = self.group(ctx, i, s)
            else:
                step, n = self.stage(ctx, i, s, s.name, p.bindings[i], p.when_bindings[i])
                own = 1  # the stage's start; a child stage's child's stages are not p's
            steps.append(step)
            reached = before + count + own
            if own and not over and reached > limits.max_total_stages:
                over = True
                whose = f"the limits of pipeline {p.name!r}" if p.limits else "the engine's limits"
                self.over_total.append(
                    (
                        f"{prefix}.{s.name}: at least {reached} stage executions in the tree "
                        f"by then, more than max_total_stages {limits.max_total_stages} "
                        f"({whose})" + (", if this path runs" if maybe else ""),
                        maybe,
                    )
                )
            count += n
        return steps, count

    def group(self, ctx: _Where, i: int, s: Stage) -> tuple[PlanStep, int, int]:
        """The group's step, the least stage executions of its tree (its own start, its
        branches' and theirs), and of the group and its branches themselves (what its own
        driver counts)."""
        spec: ParallelSpec = s.group
        slots = ctx.pipeline.branch_slots.get(i, {})
        branches: list[PlanStep] = []
        count = 1
        own = 1 + len(spec.branches)
        # Branches run side by side: each is sure only of the group's start and what ran
        # before it.
        inside = dataclasses.replace(ctx, before=ctx.before + 1)
        for b in spec.branches:
            local = f"{s.name}.{b.name}"
            slot = slots[b.name]
            when = ctx.pipeline.branch_when_bindings.get(local, ())
            step, n = self.stage(inside, i, b, local, slot.bindings, when)
            branches.append(step)
            count += n
        step = PlanStep(
            kind="parallel",
            name=s.name,
            path=f"{ctx.prefix}.{s.name}",
            returns=type_name(s.returns),
            max_concurrency=spec.max_concurrency,
            on_error=spec.on_error,
            steps=branches,
        )
        return step, count, own

    def stage(
        self,
        ctx: _Where,
        i: int,
        s: Stage,
        local: str,
        bindings: tuple[Binding, ...],
        when_bindings: tuple[Binding, ...],
    ) -> tuple[PlanStep, int]:
        path = f"{ctx.prefix}.{local}"
        what = "child input" if s.kind == "child" else "parameter"
        self.check_bindings(ctx, path, s.params, bindings, what)
        self.check_bindings(ctx, path, s.when_params, when_bindings, "`when` parameter")
        common: dict[str, Any] = {
            "name": s.name,
            "path": path,
            "attempts": s.retry.attempts,
            "timeout": s.timeout,
            "when": s.when is not None,
            "continue_on_error": s.continue_on_error,
        }
        # A stage starts (its `started` row) before its `when` is asked: one execution
        # even if skipped, as is a gate's.
        if s.kind == "gate":
            self.check_schema(path, s.schema, "its answer")
            step = PlanStep(kind="gate", returns=type_name(s.schema), reason=s.reason, **common)
            return step, 1
        if s.kind == "child" and isinstance(s.compose, ChildSpec):
            if s.when is not None:  # the child runs only when the condition holds
                ctx = dataclasses.replace(ctx, maybe=True)
            step, n = self.child(ctx, s, s.compose, path, local, bindings, common)
            # The engine counts the child stage's start, then the child's own stages;
            # launching the child only checks the count, it adds nothing to it.
            return step, (1 if s.when is not None else 1 + n)
        error = _decode_error(s.returns)
        if error is not None:
            self.problems.append(
                f"{path}: returns {type_name(s.returns)}, which msgspec cannot decode, so its "
                f"output cannot be stored ({error}); annotate a msgspec-supported type"
            )
        step = PlanStep(
            kind="stage",
            params=self.params(ctx, s.params, bindings),
            returns=type_name(s.returns),
            thread=s.fn is not None and not s.is_async,
            **common,
        )
        return step, 1

    # -- children ----------------------------------------------------------------------------

    def child(
        self,
        ctx: _Where,
        s: Stage,
        spec: ChildSpec,
        path: str,
        local: str,
        bindings: tuple[Binding, ...],
        common: dict[str, Any],
    ) -> tuple[PlanStep, int]:
        by_name = {b.param: b for b in bindings}
        limits = ctx.pipeline.limits or self.limits
        launches = spec.max_iterations if spec.kind == "loop" else 1
        if limits.max_children is not None and limits.max_children < 1:
            self.problems.append(
                f"{path}: launches a child run, but max_children is {limits.max_children}"
            )
        elif limits.max_children is not None and launches > limits.max_children:
            self.warnings.append(
                f"{path}: may launch up to {launches} child runs (max_iterations), more than "
                f"max_children {limits.max_children}"
            )
        if spec.kind == "branch":
            return self.branch(ctx, s, spec, path, local, by_name, common)
        child = spec.pipelines[""]
        params = self.child_inputs(ctx, path, child, spec.inputs, by_name)
        if spec.outputs is not None:
            self.check_outputs(path, child, spec.outputs)
        if spec.kind == "loop":
            self.check_loop(path, child)
        steps, count = self.descend(ctx, path, f"{ctx.prefix} > {local}", child)
        step = PlanStep(
            kind="loop" if spec.kind == "loop" else "child",
            params=params,
            returns=type_name(s.returns),
            pipeline=f"{child.name} v{child.version}",
            outputs=dict(spec.outputs) if spec.outputs is not None else None,
            max_iterations=spec.max_iterations if spec.kind == "loop" else None,
            steps=steps,
            **common,
        )
        return step, count

    def branch(
        self,
        ctx: _Where,
        s: Stage,
        spec: ChildSpec,
        path: str,
        local: str,
        by_name: dict[str, Binding],
        common: dict[str, Any],
    ) -> tuple[PlanStep, int]:
        selector_params = [p for p in s.params if p.name in spec.selector_params]
        self.check_selector(path, spec)
        options: list[PlanStep] = []
        counts: list[int] = []
        if len(spec.pipelines) > 1:  # the selector picks one option per input
            ctx = dataclasses.replace(ctx, maybe=True)
        for key, child in spec.pipelines.items():
            params = self.child_inputs(ctx, path, child, {}, by_name, s.params)
            steps, n = self.descend(ctx, path, f"{ctx.prefix} > {local}[{key}]", child)
            counts.append(n)
            options.append(
                PlanStep(
                    kind="child",
                    name=key,
                    key=key,
                    path=f"{ctx.prefix} > {local}[{key}]",
                    params=params,
                    returns=type_name(child.stages[-1].returns),
                    pipeline=f"{child.name} v{child.version}",
                    steps=steps,
                )
            )
        step = PlanStep(
            kind="branch",
            params=self.params(ctx, selector_params, tuple(by_name.values())),
            returns=type_name(s.returns),
            steps=options,
            **common,
        )
        return step, min(counts, default=0)

    def descend(
        self, ctx: _Where, path: str, prefix: str, child: Pipeline
    ) -> tuple[list[PlanStep], int]:
        if child.name in ctx.stack:
            cycle = " > ".join([*ctx.stack[ctx.stack.index(child.name) :], child.name])
            self.problems.append(f"{path}: pipeline {child.name!r} includes itself: {cycle}")
            return [], 0
        limits = ctx.pipeline.limits or self.limits
        beyond = ctx.beyond
        if not beyond and ctx.depth + 1 > limits.max_depth:
            beyond = True
            self.problems.append(
                f"{path}: runs pipeline {child.name!r} as a child at depth {ctx.depth + 1}, "
                f"beyond max_depth {limits.max_depth}"
            )
        # The child starts after the start of the stage that launches it.
        return self.pipeline(
            child, prefix, ctx.depth + 1, ctx.stack, beyond, ctx.before + 1, ctx.maybe
        )

    def child_inputs(
        self,
        ctx: _Where,
        path: str,
        child: Pipeline,
        mapped: Mapping[str, str],
        by_name: Mapping[str, Binding],
        stage_params: Sequence[Param] = (),
    ) -> list[PlanParam]:
        """What each input field of `child` receives from the parent, checked against it."""
        annotations = {p.name: p.annotation for p in stage_params}
        out: list[PlanParam] = []
        for f in child.inputs.values():
            what = f"input {f.name!r} of pipeline {child.name!r}"
            dotted = mapped.get(f.name)
            if dotted is not None:
                out.append(self.mapped_input(ctx, path, child, f, dotted, by_name))
                continue
            b = by_name.get(f.name)
            if b is None:
                if f.required:
                    self.problems.append(
                        f"{path}: {what} is required, but nothing in pipeline "
                        f"{ctx.pipeline.name!r} provides it"
                    )
                out.append(
                    PlanParam(
                        name=f.name,
                        type=type_name(f.type),
                        source="missing" if f.required else "default",
                    )
                )
                continue
            produced, desc = _source_type(ctx.pipeline, b)
            # The value arrives as the stage parameter's type when the binding decodes it.
            passed = annotations.get(f.name, f.type) if b.convert is not None else produced
            if b.convert is None or passed != f.type:
                self.check_fit(path, passed, f.type, what, desc)
            out.append(_bound_param(ctx, f.name, f.type, b))
        return out

    def mapped_input(
        self,
        ctx: _Where,
        path: str,
        child: Pipeline,
        f: InputField,
        dotted: str,
        by_name: Mapping[str, Binding],
    ) -> PlanParam:
        root, *rest = dotted.split(".")
        b = by_name.get(root)
        what = f"input {f.name!r} of pipeline {child.name!r}"
        if b is None:
            self.problems.append(
                f"{path}: {what} maps to {dotted!r}, but nothing provides {root!r}"
            )
            return PlanParam(name=f.name, type=type_name(f.type), source="missing", ref=dotted)
        produced, desc = _source_type(ctx.pipeline, b)
        if not rest:
            self.warn_optional(ctx.pipeline, path, b, what, f.type)
        elif b.from_stage is not None:
            producer, name = _producer(ctx.pipeline, b), _ref(ctx.pipeline, b)
            if producer.when is not None:
                self.warnings.append(
                    f"{path}: the path {dotted!r} does not resolve when {name!r} is skipped "
                    "(its `when` is false)"
                )
            if producer.continue_on_error:
                self.warnings.append(
                    f"{path}: the path {dotted!r} does not resolve when {name!r} fails "
                    "(continue_on_error)"
                )
        walked = _walk(produced, root, rest)
        if walked.error is not None:
            self.problems.append(
                f"{path}: {what} maps to {dotted!r}, which does not exist: {desc} is "
                f"{type_name(produced)}, and {walked.error}"
            )
        else:
            for note in walked.notes:
                self.warnings.append(f"{path}: input path {dotted!r}: {note}")
            self.check_fit(path, walked.type, f.type, what, f"the path {dotted!r}")
        return PlanParam(
            name=f.name,
            type=type_name(f.type),
            source="input" if b.from_stage is None else "stage",
            ref=dotted,
        )

    def check_outputs(self, path: str, child: Pipeline, outputs: Mapping[str, str]) -> None:
        for name, dotted in outputs.items():
            root, *rest = dotted.split(".")
            where = f"{path}: output {name!r} maps to {dotted!r}"
            index = child.index.get(root)
            if index is None:
                stages = ", ".join(s.name for s in child.stages)
                self.problems.append(
                    f"{where}, but pipeline {child.name!r} has no stage {root!r} "
                    f"(its stages: {stages})"
                )
                continue
            producer = child.stages[index]
            walked = _walk(producer.returns, root, rest)
            if walked.error is not None:
                self.problems.append(
                    f"{where}, which does not exist: stage {root!r} of {child.name!r} returns "
                    f"{type_name(producer.returns)}, and {walked.error}"
                )
                continue
            for note in walked.notes:
                self.warnings.append(f"{where}: {note}")
            if rest and producer.when is not None:
                self.warnings.append(
                    f"{where}: stage {root!r} of {child.name!r} may be skipped (`when`), and "
                    "then the path does not resolve"
                )
            if rest and producer.continue_on_error:
                self.warnings.append(
                    f"{where}: stage {root!r} of {child.name!r} may fail and go on "
                    "(continue_on_error), and then the path does not resolve"
                )

    def check_loop(self, path: str, child: Pipeline) -> None:
        """Each iteration after the first gets the previous output as its input: a mapping
        of the input fields, or for a pipeline of one input field, the value of that field."""
        fields = list(child.inputs.values())
        out = child.stages[-1].returns
        keys = _typeddict_keys(out)
        if keys is not None and fields and all(f.name in keys for f in fields):
            for f in fields:
                what = f"input {f.name!r} of the next iteration"
                self.check_fit(path, keys[f.name], f.type, what, f"key {f.name!r} of the output")
            return
        value = _dict_value(out)
        if value is not None:
            if len(fields) != 1:  # (with one field, the dict may be that field's value)
                for f in fields:
                    what = f"input {f.name!r} of the next iteration"
                    self.check_fit(path, value, f.type, what, "each value of the output")
            return
        if len(fields) == 1:
            what = f"input {fields[0].name!r} of the next iteration"
            self.check_fit(path, out, fields[0].type, what, "the output")
            return
        if _unwrap(out) is not Any:
            names = ", ".join(f.name for f in fields) or "(none)"
            self.problems.append(
                f"{path}: pipeline {child.name!r} returns {type_name(out)}, which cannot feed "
                f"its next iteration: return a mapping with the fields {names}"
            )

    def check_selector(self, path: str, spec: ChildSpec) -> None:
        if spec.selector is None:
            return
        try:
            returns = typing.get_type_hints(spec.selector).get("return", Any)
        except Exception:  # unresolvable annotations: the stage check reported them
            return
        values = _literal_values(returns)
        if values is None:
            return
        keys = list(spec.pipelines)
        for value in values:
            if str(value) not in spec.pipelines:
                self.problems.append(
                    f"{path}: the selector may return {value!r}, which is none of the "
                    f"branches {', '.join(map(repr, keys))}"
                )

    # -- bindings ----------------------------------------------------------------------------

    def params(
        self, ctx: _Where, params: Sequence[Param], bindings: tuple[Binding, ...]
    ) -> list[PlanParam]:
        by_name = {b.param: b for b in bindings}
        out = []
        for p in params:
            b = by_name.get(p.name)
            if b is None:
                source: ParamSource = "missing" if p.required else "default"
                out.append(PlanParam(name=p.name, type=type_name(p.annotation), source=source))
                continue
            out.append(_bound_param(ctx, p.name, p.annotation, b))
        return out

    def check_bindings(
        self,
        ctx: _Where,
        path: str,
        params: Sequence[Param],
        bindings: tuple[Binding, ...],
        what: str,
    ) -> None:
        annotations = {p.name: p.annotation for p in params}
        for b in bindings:
            annotation = annotations.get(b.param, Any)
            label = f"{what} {b.param!r}"
            self.warn_optional(ctx.pipeline, path, b, label, annotation)
            if b.convert is None:
                continue
            produced, desc = _source_type(ctx.pipeline, b)
            error = _decode_error(b.convert)
            if error is not None:
                self.problems.append(
                    f"{path}: {label} is {type_name(b.convert)}, which msgspec cannot decode "
                    f"{desc} into ({error})"
                )
                continue
            self.check_fit(path, produced, b.convert, label, desc)

    def check_fit(self, path: str, produced: Any, wanted: Any, what: str, desc: str) -> None:
        """A problem when no value of type `produced` can be decoded as `wanted`; a warning
        when some cannot (`int | None` as `int`: the run fails only if the value is None)."""
        reason, maybe = _fit(produced, wanted)
        if reason is not None:
            self.problems.append(
                f"{path}: {what} is {type_name(wanted)}, but {desc} is "
                f"{type_name(produced)}: {reason}"
            )
        for note in maybe:
            self.warnings.append(
                f"{path}: {what} is {type_name(wanted)}, but {desc} is "
                f"{type_name(produced)}, which may not decode: {note}"
            )

    def check_schema(self, path: str, tp: Any, what: str) -> None:
        error = _decode_error(tp)
        if error is not None:
            self.problems.append(
                f"{path}: {what} is {type_name(tp)}, which msgspec cannot describe or decode "
                f"({error})"
            )

    def warn_optional(
        self, p: Pipeline, path: str, b: Binding, label: str, annotation: Any
    ) -> None:
        """Warn when the value may be None (a skipped producer) or a `ws.Failed`, and the
        receiving annotation does not allow it."""
        if b.from_stage is None:
            return
        producer = _producer(p, b)
        name = _ref(p, b)
        if producer.when is not None and not _accepts(annotation, type(None)):
            self.warnings.append(
                f"{path}: {label} gets None when {name!r} is skipped (its `when` is false), "
                f"but is {type_name(annotation)}"
            )
        if producer.continue_on_error and not _accepts(annotation, Failed):
            self.warnings.append(
                f"{path}: {label} gets a ws.Failed when {name!r} fails (continue_on_error), "
                f"but is {type_name(annotation)}"
            )


@dataclasses.dataclass(frozen=True, slots=True)
class _Where:
    pipeline: Pipeline
    prefix: str
    depth: int
    stack: list[str]
    beyond: bool
    before: int
    """The least stage executions of the whole tree before this stage starts."""
    maybe: bool = False
    """True on a path that runs only for some inputs: under a `when`, or one of several
    options of a branch."""


def _producer(p: Pipeline, b: Binding) -> Stage:
    assert b.from_stage is not None
    return p.stage_at(b.from_stage, _ref(p, b))


def _bound_param(ctx: _Where, name: str, tp: Any, b: Binding) -> PlanParam:
    """A parameter bound to the input or an earlier stage, as the plan shows it."""
    return PlanParam(
        name=name,
        type=type_name(tp),
        source="input" if b.from_stage is None else "stage",
        ref=_ref(ctx.pipeline, b),
        decoded=b.convert is not None,
    )


def _ref(p: Pipeline, b: Binding) -> str:
    if b.from_stage is not None and b.branch is not None:
        return f"{p.stages[b.from_stage].name}.{b.branch}"
    return b.key


def _source_type(p: Pipeline, b: Binding) -> tuple[Any, str]:
    """The type of what a binding reads, and a description of where it is."""
    if b.from_stage is None:
        field = p.inputs.get(b.key)
        return (field.type if field is not None else Any), f"input field {b.key!r}"
    producer = _producer(p, b)
    if b.branch is not None:
        return producer.returns, f"the output of branch {_ref(p, b)!r}"
    return producer.returns, f"the output of stage {b.key!r}"


# -- types -------------------------------------------------------------------------------------


def type_name(tp: Any) -> str:
    """A short readable name of a type annotation (`list[Doc]`, `int | None`)."""
    if tp is Any:
        return "Any"
    if tp is None or tp is type(None):
        return "None"
    if tp is Ellipsis:
        return "..."
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is typing.Union or origin is types.UnionType:
        return " | ".join(type_name(a) for a in args)
    if origin is Literal:
        return f"Literal[{', '.join(map(repr, args))}]"
    if origin is not None:
        base = getattr(origin, "__qualname__", None) or repr(origin).replace("typing.", "")
        return f"{base}[{', '.join(type_name(a) for a in args)}]" if args else str(base)
    if isinstance(tp, typing.TypeVar):
        return tp.__name__
    if isinstance(tp, type):
        return tp.__qualname__
    return repr(tp).replace("typing.", "")


def _unwrap(tp: Any) -> Any:
    """`Annotated[T, ...]` -> T; `NewType` -> its base; a TypeVar or `object` -> Any."""
    while True:
        if typing.get_origin(tp) is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif isinstance(tp, typing.NewType):
            tp = tp.__supertype__
        elif isinstance(tp, typing.TypeVar) or tp is object:
            return Any
        else:
            return tp


def _decode_error(tp: Any) -> str | None:
    """Why msgspec cannot store a value of type `tp` as JSON and decode it back, or None.

    A decoder accepts a custom class (it would need a `dec_hook`); its JSON Schema does not,
    so both are asked.
    """
    try:
        codec.decoder_for(tp)
        codec.json_schema(tp)
    except (TypeError, ValueError) as exc:
        return str(exc).strip().splitlines()[-1]
    return None


def _accepts(tp: Any, kind: type) -> bool:
    tp = _unwrap(tp)
    if tp is Any or tp is kind or (kind is type(None) and tp is None):
        return True
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        return any(_accepts(a, kind) for a in typing.get_args(tp))
    return False


def _literal_values(tp: Any) -> list[Any] | None:
    """The values a `Literal` (or an Enum, or a union of them) allows, or None."""
    tp = _unwrap(tp)
    origin = typing.get_origin(tp)
    if origin is Literal:
        return list(typing.get_args(tp))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return list(tp)
    if origin is typing.Union or origin is types.UnionType:
        out: list[Any] = []
        for a in typing.get_args(tp):
            values = _literal_values(a)
            if values is None:
                return None
            out.extend(values)
        return out
    return None


def _typeddict_keys(tp: Any) -> dict[str, Any] | None:
    """A TypedDict's keys and their types; None for other types."""
    tp = _unwrap(tp)
    cls = typing.get_origin(tp) or tp
    if not typing.is_typeddict(cls):
        return None
    try:
        return dict(typing.get_type_hints(cls))
    except Exception:
        return {}


def _dict_value(tp: Any) -> Any | None:
    """For a dict or other non-TypedDict mapping: the type of its values; otherwise None."""
    tp = _unwrap(tp)
    cls = typing.get_origin(tp) or tp
    if not isinstance(cls, type) or not issubclass(cls, Mapping) or typing.is_typeddict(cls):
        return None
    args = typing.get_args(tp)
    return args[1] if len(args) == 2 else Any


_SCALARS: tuple[type, ...] = (
    int,
    float,
    str,
    bytes,
    bytearray,
    bool,
    type(None),
    datetime.datetime,
    datetime.date,
    datetime.time,
    datetime.timedelta,
    uuid.UUID,
    decimal.Decimal,
    enum.Enum,
    set,
    frozenset,
)


@dataclasses.dataclass
class _Walked:
    type: Any
    error: str | None = None
    notes: list[str] = dataclasses.field(default_factory=list)


def _walk(tp: Any, root: str, parts: Sequence[str]) -> _Walked:
    """Follow the path `root.parts...` through types, from `tp` (the type of `root`), as
    `compose.resolve_path` follows it through values: fields of Structs, dataclasses,
    NamedTuples and TypedDicts, values of dicts, items of lists and tuples."""
    notes: list[str] = []
    for k, part in enumerate(parts):
        at = ".".join([root, *parts[:k]])
        tp = _unwrap(tp)
        if tp is Any:
            rest = ".".join(parts[k:])
            notes.append(f"cannot check {rest!r} past {at!r} (Any): checked when it runs")
            return _Walked(Any, None, notes)
        tp, error, note = _step(tp, part)
        if error is not None:
            return _Walked(Any, f"at {at!r}, {error}" if k else error, notes)
        if note is not None:
            notes.append(f"{at}.{part!s} {note}")
    return _Walked(tp, None, notes)


def _step(tp: Any, part: str) -> tuple[Any, str | None, str | None]:
    """(the type of `value.part`, an error if it cannot exist, a note if it may not)."""
    name = type_name(tp)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        members = [a for a in args if a is not None and a is not type(None)]
        results = [(m, *_step(_unwrap(m), part)) for m in members]
        good = [r for r in results if r[2] is None]
        if not good:
            return Any, results[0][2] if results else f"{name} has no {part!r}", None
        notes = []
        if len(members) < len(args):
            notes.append("fails when the value is None")
        if len(good) < len(results):
            notes.append(f"exists only in {', '.join(type_name(r[0]) for r in good)}")
        found = {repr(r[1]): r[1] for r in good}
        return (
            next(iter(found.values())) if len(found) == 1 else Any,
            None,
            "; ".join(notes) or None,
        )
    if origin is Literal:
        return Any, f"{name} has no field {part!r}", None
    cls = origin if isinstance(origin, type) else tp
    if not isinstance(cls, type):
        return Any, None, None
    if typing.is_typeddict(cls):
        try:
            hints = typing.get_type_hints(cls)
        except Exception:
            return Any, None, None
        if part in hints:
            return hints[part], None, None
        return Any, f"{name} has no key {part!r} (its keys: {', '.join(hints) or 'none'})", None
    if issubclass(cls, msgspec.Struct):
        try:
            fields = {f.name: f.type for f in msgspec.structs.fields(tp)}
        except (TypeError, ValueError, NameError):
            return Any, None, None
        return _field(name, fields, part, cls)
    if dataclasses.is_dataclass(cls):
        try:
            hints = typing.get_type_hints(cls)
        except Exception:
            return Any, None, None
        fields = {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}
        return _field(name, fields, part, cls)
    if issubclass(cls, tuple) and hasattr(cls, "_fields"):  # a NamedTuple
        try:
            hints = typing.get_type_hints(cls)
        except Exception:
            return Any, None, None
        names: list[str] = list(cls._fields)
        if part.lstrip("-").isdigit():
            index = int(part)
            if not -len(names) <= index < len(names):
                return Any, f"{name} has {len(names)} items; index {index} is out of range", None
            return hints.get(names[index], Any), None, None
        return _field(name, {n: hints.get(n, Any) for n in names}, part, cls)
    if issubclass(cls, Mapping):
        return (args[1] if len(args) == 2 else Any), None, None
    if issubclass(cls, list | tuple) or cls is Sequence:
        if not part.lstrip("-").isdigit():
            return Any, f"{name} is a sequence: {part!r} is not an index", None
        if issubclass(cls, tuple) and args and args[-1] is not Ellipsis:
            index = int(part)
            if not -len(args) <= index < len(args):
                return Any, f"{name} has {len(args)} items; index {index} is out of range", None
            return args[index], None, None
        return (args[0] if args else Any), None, None
    if issubclass(cls, _SCALARS):
        if hasattr(cls, part):
            return Any, None, None
        return Any, f"{name} has no field {part!r}", None
    return Any, None, None


def _field(name: str, fields: dict[str, Any], part: str, cls: type) -> tuple[Any, str | None, None]:
    if part in fields:
        return fields[part], None, None
    if hasattr(cls, part):  # a property or method: its type is not known here
        return Any, None, None
    return Any, f"{name} has no field {part!r} (its fields: {', '.join(fields) or 'none'})", None


# -- shapes: can a value of one type be decoded as another? ------------------------------------


def fits(produced: Any, wanted: Any) -> str | None:
    """Why a value of type `produced`, encoded to JSON, cannot be decoded as `wanted` (None
    when it plausibly can, or when either is `Any` or has no JSON Schema).

    The two types are compared as the JSON Schemas msgspec generates for them: JSON types,
    required fields, literal values, item types, string formats. A union some of whose
    members fit plausibly can (`int | None` as `int`): which values would not, `_fit` says.
    """
    return _fit(produced, wanted)[0]


def _fit(produced: Any, wanted: Any) -> tuple[str | None, list[str]]:
    """(why no value of type `produced` decodes as `wanted`, or None; why some may not)."""
    produced, wanted = _unwrap(produced), _unwrap(wanted)
    if produced is Any or wanted is Any or produced == wanted:
        return None, []
    try:
        src = codec.json_schema(produced)
        dst = codec.json_schema(wanted)
    except (TypeError, ValueError):
        return None, []
    shapes = _Shapes(src.pop("$defs", {}), dst.pop("$defs", {}))
    reason = shapes.fits(src, dst, "$")
    return reason, [] if reason is not None else list(dict.fromkeys(shapes.maybe))


_JSON_TYPE_OF = {bool: "boolean", int: "integer", float: "number", str: "string"}


class _Shapes:
    def __init__(self, src_defs: dict[str, Any], dst_defs: dict[str, Any]) -> None:
        self.src_defs = src_defs
        self.dst_defs = dst_defs
        self.seen: set[tuple[str, str]] = set()
        self.maybe: list[str] = []
        """Why some values of the source may not decode (the engine fails the stage only
        when one of them comes): warnings, not problems."""

    def fits(self, s: Any, d: Any, at: str) -> str | None:
        if d is True or d == {} or s is True or s == {}:
            return None
        if s is False or d is False:
            return None
        assert isinstance(s, dict) and isinstance(d, dict)
        sref, s = self._deref(s, self.src_defs)
        dref, d = self._deref(d, self.dst_defs)
        if sref is not None and dref is not None:
            if (sref, dref) in self.seen:
                return None
            self.seen.add((sref, dref))
        if not d or not s:
            return None
        if "anyOf" in s:
            reasons = [self.fits(option, d, at) for option in s["anyOf"]]
            failing = [r for r in reasons if r is not None]
            return self._some(failing, len(reasons))
        if "anyOf" in d:
            # A value decodes when some member takes it: one member that takes every value
            # is no warning, even if another member would take only some.
            fallback: list[str] | None = None
            for option in d["anyOf"]:
                outer, self.maybe = self.maybe, []
                reason = self.fits(s, option, at)
                notes, self.maybe = self.maybe, outer
                if reason is None and not notes:
                    return None
                if reason is None and fallback is None:
                    fallback = notes
            if fallback is not None:
                self.maybe.extend(fallback)
                return None
            return f"at `{at}`, {_shape(s)} matches none of {_shape(d)}"
        return self._compare(s, d, at)

    def _some(self, failing: list[str], of: int) -> str | None:
        """A problem when all `of` kinds of source values fail; a note when only some do."""
        if not failing:
            return None
        if len(failing) == of:
            return failing[0]
        self.maybe.append(failing[0])
        return None

    def _compare(self, s: dict[str, Any], d: dict[str, Any], at: str) -> str | None:
        dvalues = _values(d)
        svalues = _values(s)
        if dvalues is not None and svalues is not None:
            extra = [
                f"at `{at}`, {v!r} is not one of {dvalues!r}" for v in svalues if v not in dvalues
            ]
            return self._some(extra, len(svalues))
        stypes, dtypes = _types(s), _types(d)
        if stypes is not None and dtypes is not None:
            accepted = _accepted(d, dtypes)
            wrong = sorted(t for t in stypes if t not in accepted)
            if len(wrong) == len(stypes):
                return f"at `{at}`, {_shape(s)} is not {_shape(d)}"
            if wrong:
                self.maybe.append(f"at `{at}`, {' | '.join(wrong)} is not {_shape(d)}")
                stypes -= set(wrong)
        if dvalues is not None or stypes is None or dtypes is None:
            return None
        sfmt, dfmt = s.get("format"), d.get("format")
        if "string" in stypes and sfmt and dfmt and sfmt != dfmt:
            return f"at `{at}`, a string of format {sfmt} is not one of format {dfmt}"
        if "object" in stypes and "object" in dtypes:
            return self._objects(s, d, at)
        if "array" in stypes and "array" in dtypes:
            return self._arrays(s, d, at)
        return None

    def _objects(self, s: dict[str, Any], d: dict[str, Any], at: str) -> str | None:
        sprops: dict[str, Any] | None = s.get("properties")
        dprops: dict[str, Any] = d.get("properties", {})
        dextra = d.get("additionalProperties")
        sextra = s.get("additionalProperties")
        if sprops is not None:
            missing = [r for r in d.get("required", []) if r not in sprops]
            if missing:
                return (
                    f"at `{at}`, {_shape(s)} has no field `{missing[0]}` that {_shape(d)} requires"
                )
            for key, sub in sprops.items():
                if key in dprops:
                    reason = self.fits(sub, dprops[key], f"{at}.{key}")
                elif dextra is False:
                    reason = f"at `{at}`, {_shape(d)} does not allow the field `{key}`"
                elif isinstance(dextra, dict):
                    reason = self.fits(sub, dextra, f"{at}.{key}")
                else:
                    reason = None
                if reason is not None:
                    return reason
            return None
        if isinstance(sextra, dict):
            for key, sub in dprops.items():
                reason = self.fits(sextra, sub, f"{at}.{key}")
                if reason is not None:
                    return reason
            if isinstance(dextra, dict):
                return self.fits(sextra, dextra, f"{at}.*")
        return None

    def _arrays(self, s: dict[str, Any], d: dict[str, Any], at: str) -> str | None:
        sprefix: list[Any] | None = s.get("prefixItems")
        dprefix: list[Any] | None = d.get("prefixItems")
        sitems, ditems = s.get("items"), d.get("items")
        # Which item schema meets which: position by position where either side has
        # positions (tuples), else the one item schema of each side.
        pairs: list[tuple[Any, Any, str]] = []
        if sprefix is not None and dprefix is not None:
            if len(sprefix) != len(dprefix) and ditems is False:
                return f"at `{at}`, {len(sprefix)} items are not the {len(dprefix)} expected"
            pairs = [
                (a, b, f"{at}[{k}]") for k, (a, b) in enumerate(zip(sprefix, dprefix, strict=False))
            ]
        elif sprefix is not None:
            if isinstance(ditems, dict):
                pairs = [(a, ditems, f"{at}[{k}]") for k, a in enumerate(sprefix)]
        elif dprefix is not None:
            if isinstance(sitems, dict):
                pairs = [(sitems, b, f"{at}[{k}]") for k, b in enumerate(dprefix)]
        elif isinstance(sitems, dict) and isinstance(ditems, dict):
            pairs = [(sitems, ditems, f"{at}[]")]
        for a, b, where in pairs:
            reason = self.fits(a, b, where)
            if reason is not None:
                return reason
        return None

    @staticmethod
    def _deref(schema: dict[str, Any], defs: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
        ref = schema.get("$ref")
        if not isinstance(ref, str):
            return None, schema
        name = ref.rsplit("/", 1)[-1]
        target = defs.get(name, {})
        return name, target if isinstance(target, dict) else {}


def _values(schema: dict[str, Any]) -> list[Any] | None:
    if "enum" in schema:
        return list(schema["enum"])
    if "const" in schema:
        return [schema["const"]]
    return None


def _types(schema: dict[str, Any]) -> set[str] | None:
    kinds = schema.get("type")
    if isinstance(kinds, str):
        return {kinds}
    if isinstance(kinds, list):
        return set(kinds)
    values = _values(schema)
    if values is not None:
        return {_JSON_TYPE_OF.get(type(v), "null" if v is None else "object") for v in values}
    return None


def _accepted(schema: dict[str, Any], kinds: set[str]) -> set[str]:
    """The JSON types msgspec decodes into a type of this schema: more than its `type` says
    for a float (an integer too) and a Decimal (a string, or any number)."""
    out = set(kinds)
    if "number" in out:
        out.add("integer")
    if "string" in out and schema.get("format") == "decimal":
        out |= {"integer", "number"}
    return out


def _shape(schema: dict[str, Any]) -> str:
    title = schema.get("title")
    if isinstance(title, str):
        return title
    ref = schema.get("$ref")
    if isinstance(ref, str):
        return ref.rsplit("/", 1)[-1]
    if "anyOf" in schema:
        return " | ".join(_shape(option) for option in schema["anyOf"])
    values = _values(schema)
    if values is not None:
        return " | ".join(map(repr, values))
    kinds = _types(schema)
    if not kinds:
        return "any value"
    return " | ".join(sorted(kinds))


__all__ = ["Plan", "PlanInput", "PlanParam", "PlanStep", "make_plan"]
