"""Dry-run plans: the ordered steps of a pipeline tree, and every problem found in the input,
the bindings, the paths of child stages, the limits and cycles, without running anything."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any, Literal, TypedDict

import msgspec
import pytest

import waystation as ws
from waystation.engine.plan import Plan, PlanStep, fits, make_plan


class Doc(msgspec.Struct):
    title: str
    words: int


class Batch(msgspec.Struct):
    docs: list[Doc]
    source: str = "disk"


class Metrics(msgspec.Struct):
    accuracy: float
    notes: dict[str, Any] = {}


class Scored(msgspec.Struct):
    doc: str
    metrics: Metrics


class Decision(msgspec.Struct):
    approved: bool
    by: str


class Summary(msgspec.Struct):
    total: int
    label: str


class Counted(TypedDict):
    n: int


class Opaque:
    """A class msgspec cannot encode or decode."""


# -- a clean tree: onboard > (review as a stage, a gate, a parallel group, a branch) ----------


@ws.stage
async def extract(doc: Doc) -> str:
    return doc.title


@ws.stage
def score(extract: str) -> Scored:
    return Scored(extract, Metrics(accuracy=0.9))


review = ws.Pipeline("review", [extract, score])


@ws.stage
async def load(count: int) -> Batch:
    return Batch([Doc(f"d{i}", i) for i in range(count)])


@ws.stage
async def geo(load: Batch) -> str:
    return load.source


@ws.stage(retry=ws.Retry(attempts=3), timeout=10)
async def credit(count: int) -> int:
    return count * 100


@ws.stage
async def note(load: Batch) -> str:
    return f"{len(load.docs)} documents"


trail = ws.Pipeline("trail", [note])  # a pipeline as a branch of a parallel group
approval = ws.gate("approval", schema=Decision, reason="onboard this batch?")


@ws.stage
async def small(count: int) -> str:
    return "small"


@ws.stage
async def large(count: int) -> str:
    return "large"


def size(credit: int) -> Literal["small", "large"]:
    return "small" if credit < 500 else "large"


@ws.stage
def decide(
    first: Scored, approval: Decision, credit: float, route: str, geo: str | None = None
) -> Summary:
    return Summary(total=int(credit), label=f"{route}:{first.doc}:{approval.by}")


onboard = ws.Pipeline(
    "onboard",
    [
        load,
        review.as_stage("first", inputs={"doc": "load.docs.0"}),
        ws.parallel(geo, credit, trail, name="enrich", max_concurrency=2),
        approval,
        ws.branch(
            "route",
            size,
            {"small": ws.Pipeline("small", [small]), "large": ws.Pipeline("large", [large])},
        ),
        decide,
    ],
    version="3",
)


def _find(steps: list[PlanStep], path: str) -> PlanStep:
    for step in steps:
        if step.path == path:
            return step
        try:
            return _find(step.steps, path)
        except LookupError:
            continue
    raise LookupError(path)


def test_a_clean_plan_lists_every_step_in_order() -> None:
    plan = make_plan(onboard, {"count": 3})
    assert plan.ok, plan.problems
    assert plan.problems == []
    assert (plan.pipeline, plan.version, plan.fingerprint) == ("onboard", "3", onboard.fingerprint)
    assert plan.input_checked
    assert [(f.name, f.type, f.required) for f in plan.inputs] == [("count", "int", True)]
    assert [(s.kind, s.name) for s in plan.steps] == [
        ("stage", "load"),
        ("child", "first"),
        ("parallel", "enrich"),
        ("gate", "approval"),
        ("branch", "route"),
        ("stage", "decide"),
    ]
    assert plan.depth == 1

    first = plan.steps[1]
    assert first.pipeline == "review v1" and first.returns == "Scored"
    (doc,) = first.params
    assert (doc.name, doc.type, doc.source, doc.ref) == ("doc", "Doc", "stage", "load.docs.0")
    assert [s.path for s in first.steps] == ["onboard > first.extract", "onboard > first.score"]
    assert first.steps[1].thread  # a sync stage runs in a worker thread

    enrich = plan.steps[2]
    assert enrich.returns == "dict[str, Any]" and enrich.max_concurrency == 2
    assert [(s.kind, s.path) for s in enrich.steps] == [
        ("stage", "onboard.enrich.geo"),
        ("stage", "onboard.enrich.credit"),
        ("child", "onboard.enrich.trail"),
    ]
    assert enrich.steps[1].attempts == 3 and enrich.steps[1].timeout == 10
    assert enrich.steps[2].pipeline == "trail v1"
    assert [s.path for s in enrich.steps[2].steps] == ["onboard > enrich.trail.note"]

    gate = plan.steps[3]
    assert gate.returns == "Decision" and gate.reason == "onboard this batch?"

    route = plan.steps[4]
    assert [(o.kind, o.key, o.pipeline) for o in route.steps] == [
        ("child", "small", "small v1"),
        ("child", "large", "large v1"),
    ]
    assert [(p.name, p.source, p.ref) for p in route.params] == [
        ("credit", "stage", "enrich.credit")
    ]
    assert route.steps[1].steps[0].path == "onboard > route[large].large"

    decide_step = plan.steps[5]
    params = {p.name: p for p in decide_step.params}
    assert params["credit"].decoded and params["credit"].ref == "enrich.credit"  # int -> float
    assert params["geo"].source == "stage" and params["geo"].ref == "enrich.geo"
    assert not params["first"].decoded


def test_the_plan_is_json_and_back() -> None:
    plan = make_plan(onboard, {"count": 3})
    again = msgspec.json.decode(msgspec.json.encode(plan), type=Plan)
    assert again == plan


def test_without_an_input_only_the_definitions_are_checked() -> None:
    plan = make_plan(onboard)
    assert plan.ok and not plan.input_checked


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"count": "three"}, "onboard: invalid input: Expected `int`, got `str` - at `$.count`"),
        ({}, "onboard: invalid input: Object missing required field `count`"),
        ([3], "onboard: the input must be a mapping"),
    ],
)
def test_a_bad_input_is_a_problem(value: Any, message: str) -> None:
    plan = make_plan(onboard, value)
    assert not plan.ok
    assert len(plan.problems) == 1 and plan.problems[0].startswith(message), plan.problems
    assert len(plan.steps) == 6  # the steps are planned all the same


# -- a bad path in a grandchild: nightly > report > review_main ---------------------------------


@ws.stage
async def gather(count: int) -> Batch:
    return Batch([])


@ws.stage
async def total(review_main: Any) -> int:
    return 0


report = ws.Pipeline(
    "report",
    [
        gather,
        review.as_stage(
            "review_main",
            inputs={"doc": "gather.documents.0"},
            outputs={"accuracy": "score.metrics.acuracy"},
        ),
        total,
    ],
)


@ws.stage
async def publish(report: int) -> str:
    return f"total {report}"


@ws.stage
async def archive(publish: Summary) -> str:  # publish returns str: cannot decode
    return "archived"


nightly = ws.Pipeline("nightly", [report, publish, archive])


def test_problems_deep_in_the_tree_are_named_by_their_path() -> None:
    plan = make_plan(nightly, {"count": 2})
    assert not plan.ok
    assert plan.problems == [
        "nightly > report.review_main: input 'doc' of pipeline 'review' maps to "
        "'gather.documents.0', which does not exist: the output of stage 'gather' is Batch, "
        "and Batch has no field 'documents' (its fields: docs, source)",
        "nightly > report.review_main: output 'accuracy' maps to 'score.metrics.acuracy', "
        "which does not exist: stage 'score' of 'review' returns Scored, and at "
        "'score.metrics', Metrics has no field 'acuracy' (its fields: accuracy, notes)",
        "nightly.archive: parameter 'publish' is Summary, but the output of stage 'publish' "
        "is str: at `$`, string is not Summary",
    ]
    step = _find(plan.steps, "nightly > report > review_main.extract")
    assert step.params[0].ref == "doc"
    child = _find(plan.steps, "nightly > report.review_main")
    assert child.outputs == {"accuracy": "score.metrics.acuracy"} and child.returns == "Any"


@ws.stage
async def misread(extract: Summary) -> str:  # extract returns str
    return "never"


checker = ws.Pipeline("checker", [extract, misread])
middle = ws.Pipeline("middle", [gather, checker.as_stage("check", inputs={"doc": "gather.docs.0"})])
outermost = ws.Pipeline("outermost", [middle])


def test_a_bad_binding_inside_a_grandchild_is_named_by_its_path() -> None:
    plan = make_plan(outermost, {"count": 1})
    assert plan.problems == [
        "outermost > middle > check.misread: parameter 'extract' is Summary, but the output "
        "of stage 'extract' is str: at `$`, string is not Summary"
    ]
    assert plan.depth == 2
    step = _find(plan.steps, "outermost > middle > check.misread")
    assert step.params[0].decoded and step.params[0].ref == "extract"


def test_paths_check_the_types_they_end_in() -> None:
    wrong_type = review.as_stage("by_title", inputs={"doc": "gather.docs.0.title"})
    into_any = review.as_stage(
        "via_notes", inputs={"doc": "gather.docs.0"}, outputs={"x": "score.metrics.notes.a.b"}
    )
    p = ws.Pipeline("paths", [gather, wrong_type, into_any])
    plan = make_plan(p)
    assert plan.problems == [
        "paths.by_title: input 'doc' of pipeline 'review' is Doc, but the path "
        "'gather.docs.0.title' is str: at `$`, string is not Doc",
    ]
    # A path into Any (dict[str, Any]) cannot be checked: a warning, not a problem.
    assert plan.warnings == [
        "paths.via_notes: output 'x' maps to 'score.metrics.notes.a.b': cannot check 'b' "
        "past 'score.metrics.notes.a' (Any): checked when it runs",
    ]


# -- bindings between stages ---------------------------------------------------------------------


@ws.stage
async def count_up(count: int) -> int:
    return count


@ws.stage
async def summarize(count: int) -> Summary:
    return Summary(total=count, label="x")


@ws.stage
async def as_doc(summarize: Doc) -> str:  # Summary has no `title`, `words`
    return "x"


@ws.stage
async def as_float(count_up: float, summarize: Any, maybe: Counted | None = None) -> float:
    return 1.0


@ws.stage
async def as_struct(count_up: Summary) -> str:
    return "x"


def test_conversions_are_checked_by_shape() -> None:
    p = ws.Pipeline("conversions", [count_up, summarize, as_doc, as_float, as_struct])
    plan = make_plan(p, {"count": 1})
    assert plan.problems == [
        "conversions.as_doc: parameter 'summarize' is Doc, but the output of stage "
        "'summarize' is Summary: at `$`, Summary has no field `title` that Doc requires",
        "conversions.as_struct: parameter 'count_up' is Summary, but the output of stage "
        "'count_up' is int: at `$`, integer is not Summary",
    ]


def test_fits_compares_json_shapes() -> None:
    assert fits(int, float) is None
    assert fits(float, int) == "at `$`, number is not integer"
    assert fits(Any, Summary) is None and fits(Summary, Any) is None
    assert fits(Doc, Summary) == "at `$`, Doc has no field `total` that Summary requires"
    assert fits(list[int], list[str]) == "at `$[]`, integer is not string"
    assert fits(int | None, int) is None  # it may not: a warning (see below)
    assert fits(None, int) == "at `$`, null is not integer"
    assert fits(int, int | None) is None
    assert fits(int, Decimal) is None and fits(float, Decimal) is None
    assert fits(Decimal, float) == "at `$`, string is not number"
    assert fits(bool, Decimal) == "at `$`, boolean is not string"
    assert fits(Literal["a"], Literal["a", "b"]) is None
    assert fits(Literal["c"], Literal["a", "b"]) == "at `$`, 'c' is not one of ['a', 'b']"
    assert fits(Literal["a", "c"], Literal["a", "b"]) is None
    assert fits(str, Literal["a", "b"]) is None  # plausible: checked when it runs
    assert fits(dict[str, int], Counted) is None
    assert fits(Counted, dict[str, str]) == "at `$.n`, integer is not string"
    assert fits(tuple[int, str], tuple[int, int]) == "at `$[1]`, string is not integer"


@ws.stage
async def whole(count: int) -> int:
    return count


@ws.stage
async def priced(whole: Decimal) -> str:
    return str(whole)


@ws.stage
async def halved(count: int) -> float:
    return count / 2


@ws.stage
async def rounded(halved: int) -> int:
    return halved


async def test_a_plan_accepts_what_the_engine_decodes_and_refuses_what_it_refuses(
    db: Path,
) -> None:
    # The engine decodes an int output (stored as a JSON number) into Decimal, as msgspec
    # does; a float into int it refuses, whatever the value.
    accepted = ws.Pipeline("pricing", [whole, priced])
    refused = ws.Pipeline("rounding", [halved, rounded])
    assert make_plan(accepted, {"count": 3}).problems == []
    assert make_plan(refused, {"count": 4}).problems == [
        "rounding.rounded: parameter 'halved' is int, but the output of stage 'halved' is "
        "float: at `$`, number is not integer"
    ]
    async with ws.Engine.open(db, pipelines=[accepted, refused]) as engine:
        priced_run = await engine.start(accepted, {"count": 3})
        rounded_run = await engine.start(refused, {"count": 4})  # 2.0, a whole number
    assert priced_run.status == "succeeded" and priced_run.output == "3"
    assert rounded_run.status == "failed" and rounded_run.error is not None
    assert "Expected `int`, got `float`" in rounded_run.error.message


@ws.stage
async def maybe_whole(count: int) -> int | None:
    return count if count > 0 else None


@ws.stage
async def doubled(maybe_whole: int) -> int:
    return maybe_whole * 2


async def test_a_value_that_may_not_decode_is_a_warning(db: Path) -> None:
    # `int | None` into `int`: the engine fails the stage only when the value is None, so
    # the plan cannot call it a problem, only warn.
    p = ws.Pipeline("doubling", [maybe_whole, doubled])
    plan = make_plan(p, {"count": 2})
    assert plan.ok, plan.problems
    assert plan.warnings == [
        "doubling.doubled: parameter 'maybe_whole' is int, but the output of stage "
        "'maybe_whole' is int | None, which may not decode: at `$`, null is not integer"
    ]
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        fine = await engine.start(p, {"count": 2})
        broken = await engine.start(p, {"count": 0})
    assert fine.status == "succeeded" and fine.output == 4
    assert broken.status == "failed" and broken.error is not None
    assert "Expected `int`, got `null`" in broken.error.message


# -- children: limits, loops, branches, cycles ---------------------------------------------------


@ws.stage
async def leaf(count: int) -> int:
    return count


level3 = ws.Pipeline("level3", [leaf])
level2 = ws.Pipeline("level2", [level3])
level1 = ws.Pipeline("level1", [level2])
top = ws.Pipeline("top", [level1])


def test_nesting_beyond_max_depth_is_a_problem() -> None:
    assert make_plan(top).ok
    assert make_plan(top).depth == 3
    plan = make_plan(top, {"count": 1}, limits=ws.Limits(max_depth=2))
    assert plan.problems == [
        "top > level1 > level2.level3: runs pipeline 'level3' as a child at depth 3, "
        "beyond max_depth 2"
    ]
    # A pipeline's own limits override the engine's for the children it launches.
    strict = ws.Pipeline("strict", [level1], limits=ws.Limits(max_depth=0))
    assert make_plan(strict).problems == [
        "strict.level1: runs pipeline 'level1' as a child at depth 1, beyond max_depth 0"
    ]


def test_too_few_stage_executions_or_children_allowed() -> None:
    plan = make_plan(top, limits=ws.Limits(max_total_stages=3))
    assert plan.min_stage_executions == 4  # 3 child stages and the leaf
    assert plan.problems == [
        "top > level1 > level2 > level3.leaf: at least 4 stage executions in the tree by "
        "then, more than max_total_stages 3 (the engine's limits)"
    ]
    plan = make_plan(top, limits=ws.Limits(max_children=0))
    assert plan.problems == [
        "top.level1: launches a child run, but max_children is 0",
        "top > level1.level2: launches a child run, but max_children is 0",
        "top > level1 > level2.level3: launches a child run, but max_children is 0",
    ]


async def test_the_least_stage_executions_are_what_the_engine_counts(db: Path) -> None:
    # A child stage is one execution and its child's stages the rest: launching the child
    # is not one more. The engine runs `top` within a limit of 4 and not within 3.
    assert make_plan(top).min_stage_executions == 4
    for limit, status in ((4, "succeeded"), (3, "failed")):
        limits = ws.Limits(max_total_stages=limit)
        async with ws.Engine.open(db, pipelines=[top], limits=limits) as engine:
            plan = engine.plan(top, {"count": 1})
            run = await engine.start(top, {"count": 1})
        assert run.status == status, run.error
        assert plan.ok == (status == "succeeded"), plan.problems


@ws.stage
async def step_a(count: int) -> int:
    return count


@ws.stage
async def step_b(step_a: int) -> int:
    return step_a


@ws.stage
async def step_c(step_b: int) -> int:
    return step_b


async def test_each_pipeline_is_held_to_the_limits_the_engine_applies_to_it(db: Path) -> None:
    # Each driver checks the tree's count against its own pipeline's limits, or else the
    # engine's: a strict root does not bound the stages of a child without limits, and a
    # strict child is held to its own limits under a lenient root.
    strict = ws.Limits(max_total_stages=2)
    lenient_child = ws.Pipeline("lenient_child", [step_a, step_b, step_c])
    strict_root = ws.Pipeline("strict_root", [lenient_child], limits=strict)
    strict_child = ws.Pipeline("strict_child", [step_a, step_b, step_c], limits=strict)
    lenient_root = ws.Pipeline("lenient_root", [strict_child])
    async with ws.Engine.open(db, pipelines=[strict_root, lenient_root]) as engine:
        runs = {p.name: await engine.start(p, {"count": 1}) for p in (strict_root, lenient_root)}
        plans = {p.name: engine.plan(p, {"count": 1}) for p in (strict_root, lenient_root)}
    assert runs["strict_root"].status == "succeeded", runs["strict_root"].error
    assert plans["strict_root"].ok, plans["strict_root"].problems
    failed = runs["lenient_root"]
    assert failed.status == "failed" and failed.error is not None
    assert "max_total_stages 2 exceeded: 3 stage executions" in failed.error.message
    assert plans["lenient_root"].problems == [
        "lenient_root > strict_child.step_b: at least 3 stage executions in the tree by then, "
        "more than max_total_stages 2 (the limits of pipeline 'strict_child')"
    ]


def _pick(count: int) -> str:
    return "light" if count < 100 else "heavy"


def _large(step_a: int) -> bool:
    return step_a >= 100


async def test_a_limit_passed_only_on_a_path_some_inputs_take_is_a_warning(db: Path) -> None:
    """A strict child that only a branch option or a `when` may launch: the engine runs the
    tree for inputs that do not take that path, so the plan warns and does not refuse it
    (the review of the limits change found it reported as a problem)."""
    strict = ws.Limits(max_total_stages=2)
    light = ws.Pipeline("light", [step_a])
    heavy = ws.Pipeline("heavy", [step_a, step_b, step_c], limits=strict)
    by_branch = ws.Pipeline(
        "by_branch", [ws.branch("route", _pick, {"light": light, "heavy": heavy})]
    )
    by_when = ws.Pipeline("by_when", [step_a, heavy.as_stage(when=_large)])
    async with ws.Engine.open(db, pipelines=[by_branch, by_when]) as engine:
        for p in (by_branch, by_when):
            run = await engine.start(p, {"count": 1})
            assert run.status == "succeeded", run.error
            plan = engine.plan(p, {"count": 1})
            assert plan.ok, plan.problems
            (warning,) = [w for w in plan.warnings if "max_total_stages" in w]
            assert warning.endswith(
                "more than max_total_stages 2 (the limits of pipeline 'heavy'), if this path runs"
            )
        heavy_run = await engine.start(by_when, {"count": 100})
    assert heavy_run.status == "failed" and heavy_run.error is not None
    assert "max_total_stages 2 exceeded" in heavy_run.error.message


@ws.stage
async def refine(draft: str, rounds: int) -> Summary:
    return Summary(total=rounds, label=draft)


@ws.stage
async def polish(draft: str) -> str:
    return draft + "!"


@ws.stage
async def polish_count(draft: str) -> Counted:
    return {"n": len(draft)}


def _done(output: Any) -> bool:
    return True


def test_a_loop_whose_output_cannot_feed_the_next_iteration() -> None:
    bad = ws.Pipeline("looping", [ws.loop(ws.Pipeline("refine", [refine]), until=_done)])
    assert make_plan(bad).problems == [
        "looping.refine_loop: pipeline 'refine' returns Summary, which cannot feed its next "
        "iteration: return a mapping with the fields draft, rounds"
    ]
    good = ws.Pipeline("looping", [ws.loop(ws.Pipeline("polish", [polish]), until=_done)])
    assert make_plan(good).ok
    counted = ws.loop(ws.Pipeline("count", [polish_count]), until=_done, max_iterations=5)
    plan = make_plan(ws.Pipeline("looping", [counted]), limits=ws.Limits(max_children=3))
    assert plan.problems == [
        "looping.count_loop: input 'draft' of the next iteration is str, but the output is "
        "Counted: at `$`, Counted is not string"
    ]
    assert plan.warnings == [
        "looping.count_loop: may launch up to 5 child runs (max_iterations), more than "
        "max_children 3"
    ]
    assert plan.steps[0].kind == "loop" and plan.steps[0].max_iterations == 5


@ws.stage
async def needs_limit(count: int, limit: int) -> int:
    return min(count, limit)


@ws.stage
async def takes_limit(count: int, limit: int = 10) -> int:
    return count


def pick(count: int) -> Literal["a", "b", "c"]:
    return "a"


class CountOnly(msgspec.Struct):
    count: int


def test_a_branch_selector_and_option_inputs_are_checked() -> None:
    routes = {"a": ws.Pipeline("opt_a", [takes_limit]), "b": ws.Pipeline("opt_b", [needs_limit])}
    # `limit` is optional in opt_a, so the branch stage does not require it; opt_b does.
    p = ws.Pipeline("branching", [ws.branch("route", pick, routes)], input=CountOnly)
    plan = make_plan(p, {"count": 1})
    assert plan.problems == [
        "branching.route: the selector may return 'c', which is none of the branches 'a', 'b'",
        "branching.route: input 'limit' of pipeline 'opt_b' is required, but nothing in "
        "pipeline 'branching' provides it",
    ]
    option = plan.steps[0].steps[1]
    assert [(p.name, p.source) for p in option.params] == [
        ("count", "input"),
        ("limit", "missing"),
    ]


def test_a_pipeline_that_includes_itself_is_a_cycle() -> None:
    # Refused when built; here the child spec is rewired afterwards, as a plan must survive.
    inner = ws.Pipeline("inner", [leaf])
    outer = ws.Pipeline("outer", [inner])
    outer.stages[0].compose.pipelines[""] = outer
    plan = make_plan(outer)
    assert plan.problems == ["outer.inner: pipeline 'outer' includes itself: outer > outer"]


@ws.stage
async def opaque(count: int) -> Opaque:
    return Opaque()


def test_a_return_type_msgspec_cannot_store() -> None:
    plan = make_plan(ws.Pipeline("opaque", [opaque]))
    assert len(plan.problems) == 1
    assert plan.problems[0].startswith(
        "opaque.opaque: returns Opaque, which msgspec cannot decode, so its output cannot be stored"
    )


@ws.stage(when=lambda count: count > 0)
async def sometimes(count: int) -> int:
    return count


@ws.stage
async def after(sometimes: int) -> int:
    return sometimes


def test_a_skipped_producer_is_a_warning() -> None:
    plan = make_plan(ws.Pipeline("maybe", [sometimes, after]))
    assert plan.ok
    assert plan.warnings == [
        "maybe.after: parameter 'sometimes' gets None when 'sometimes' is skipped (its "
        "`when` is false), but is int"
    ]
    assert plan.steps[0].when


# -- reading it ----------------------------------------------------------------------------------


def test_render_reads_as_an_indented_plan() -> None:
    text = make_plan(onboard, {"count": 3}).render()
    assert text.splitlines() == [
        f"plan of onboard v3 ({onboard.fingerprint}): ok",
        "input: count: int (the given input checked)",
        "limits of onboard: max_depth 8, max_total_stages 10000, max_children none",
        "tree: child runs nest 1 deep, at least 13 stage executions",
        "",
        "  1. load(count=input.count) -> Batch",
        "  2. first: child run of review v1 (doc=load.docs.0) -> Scored",
        "     1. extract(doc=input.doc) -> str",
        "     2. score(extract=extract) -> Scored  [thread]",
        "  3. enrich: parallel, 3 branches, 2 at once, fail_fast -> dict[str, Any]",
        "     - geo(load=load) -> str",
        "     - credit(count=input.count) -> int  [3 attempts, timeout 10s]",
        "     - trail: child run of trail v1 (load=load) -> str",
        "       1. note(load=input.load) -> str",
        "  4. approval: gate, pauses for an answer of type Decision ('onboard this batch?')",
        "  5. route: branch, selector(credit=enrich.credit) picks one of 2",
        "     [small] child run of small v1 (count=input.count) -> str",
        "         1. small(count=input.count) -> str",
        "     [large] child run of large v1 (count=input.count) -> str",
        "         1. large(count=input.count) -> str",
        "  6. decide(first=first, approval=approval, credit=enrich.credit as float, "
        "route=route as str, geo=enrich.geo as str | None) -> Summary  [thread]",
        "",
        "no problems found",
    ]
    bad = make_plan(nightly, {"count": "x"}).render().splitlines()
    assert bad[0] == f"plan of nightly v1 ({nightly.fingerprint}): 4 problem(s)"
    assert bad[bad.index("problems (4):") + 1] == (
        "  - nightly: invalid input: Expected `int`, got `str` - at `$.count`"
    )


@ws.stage
async def explode(count: int) -> int:
    raise AssertionError("a plan must not run a stage")


def test_planning_runs_nothing(db: Path) -> None:
    plan = make_plan(
        ws.Pipeline("explode", [explode, ws.Pipeline("inner", [explode])]), {"count": 1}
    )
    assert plan.ok, plan.problems
    assert not db.exists()
