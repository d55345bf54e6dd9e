"""Generated bad input (hypothesis): resume answers against the pause's JSON Schema, awkward
stage outputs, malformed run ids and malformed pipeline definitions.

The properties: a resume answer is either accepted (the run then goes on with it, decoded as
the schema's type) or refused with `ws.InvalidResumeInput`, leaving the run paused and its
journal unchanged; a stage output is either stored and read back equal, or fails the run
with `ws.StageOutputError`; a malformed run id or pipeline gets a `ws.WaystationError`
subclass. Never a raw exception, an engine crash or a corrupt row.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import pytest
from hypothesis import HealthCheck, assume, example, given, note, settings
from hypothesis import strategies as st

import waystation as ws

from .support import SAFETY, check_journal, integrity, journal, run_row, tables

EXAMPLES = collections.Counter[str]()
"""Examples tried per test (printed at the end, for RELIABILITY.md)."""


@pytest.fixture(scope="module", autouse=True)
def _report_examples() -> Any:
    yield
    print("\ninputs tried:", dict(EXAMPLES), "total", sum(EXAMPLES.values()))


SETTINGS = settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# -- JSON values and schemas ---------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


def from_schema(schema: dict[str, Any], defs: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values that satisfy `schema`, for the subset of JSON Schema msgspec emits."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return st.deferred(lambda: from_schema(defs[name], defs))
    if "anyOf" in schema:
        return st.one_of([from_schema(s, defs) for s in schema["anyOf"]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "const" in schema:
        return st.just(schema["const"])
    kind = schema.get("type")
    if isinstance(kind, list):
        return st.one_of([from_schema({**schema, "type": k}, defs) for k in kind])
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind in ("integer", "number"):
        lo = schema.get("minimum")
        hi = schema.get("maximum")
        if "exclusiveMinimum" in schema:
            lo = schema["exclusiveMinimum"] + (1 if kind == "integer" else 1e-9)
        if "exclusiveMaximum" in schema:
            hi = schema["exclusiveMaximum"] - (1 if kind == "integer" else 1e-9)
        ints = st.integers(
            min_value=None if lo is None else math.ceil(lo),
            max_value=None if hi is None else math.floor(hi),
        )
        if kind == "integer":
            return ints
        floats = st.floats(min_value=lo, max_value=hi, allow_nan=False, allow_infinity=False)
        return ints | floats
    if kind == "string":
        if "pattern" in schema:
            return st.from_regex(schema["pattern"])
        return st.text(min_size=schema.get("minLength", 0), max_size=schema.get("maxLength", 12))
    if kind == "array":
        prefix = schema.get("prefixItems")
        if prefix is not None:
            return st.tuples(*(from_schema(s, defs) for s in prefix)).map(list)
        items = schema.get("items")
        inner = from_schema(items, defs) if isinstance(items, dict) else json_values
        return st.lists(
            inner, min_size=schema.get("minItems", 0), max_size=schema.get("maxItems", 4)
        )
    if kind == "object":
        props: dict[str, Any] = schema.get("properties", {})
        required = set(schema.get("required", []))
        extra = schema.get("additionalProperties")
        if not props and isinstance(extra, dict):
            return st.dictionaries(st.text(max_size=6), from_schema(extra, defs), max_size=4)
        return st.fixed_dictionaries(
            {k: from_schema(v, defs) for k, v in props.items() if k in required},
            optional={k: from_schema(v, defs) for k, v in props.items() if k not in required},
        )
    return json_values


@st.composite
def near_misses(draw: st.DrawFn, valid: st.SearchStrategy[Any]) -> Any:
    """A valid answer with one part broken: a field dropped, replaced, added, or wrapped."""
    value = draw(valid)
    how = draw(st.sampled_from(["drop", "replace", "add", "wrap", "item", "number", "text"]))
    if isinstance(value, dict) and value:
        key = draw(st.sampled_from(sorted(value)))
        value = dict(value)
        if how == "drop":
            del value[key]
        elif how == "replace":
            value[key] = draw(json_values)
        elif how == "add":
            value[draw(st.text(min_size=1, max_size=5))] = draw(json_values)
        elif how == "number":  # often just outside a minimum or maximum
            value[key] = draw(st.integers(-12, 12) | st.integers() | st.floats(-1, 1e7))
        elif how == "text":  # often too long or too short
            value[key] = draw(st.text(max_size=12))
        else:
            value[key] = [value[key]]
        return value
    if isinstance(value, list) and value and how in ("replace", "item", "number", "text"):
        value = list(value)
        value[draw(st.integers(0, len(value) - 1))] = draw(
            json_values if how in ("replace", "item") else st.integers(-3, 200) | st.text()
        )
        return value
    return draw(json_values) if how != "wrap" else [value]


def answers(schema: dict[str, Any]) -> st.SearchStrategy[tuple[str, Any]]:
    valid = from_schema(schema, schema.get("$defs", {}))
    return st.one_of(
        st.tuples(st.just("valid"), valid),
        st.tuples(st.just("near-miss"), near_misses(valid)),
        st.tuples(st.just("random"), json_values),
    )


# -- resume answers ---------------------------------------------------------------------------


class Place(msgspec.Struct):
    city: Annotated[str, msgspec.Meta(min_length=1)]
    zip: Annotated[str, msgspec.Meta(pattern="^[0-9]{5}$")]


class Review(msgspec.Struct, forbid_unknown_fields=True):
    approved: bool
    amount: Annotated[float, msgspec.Meta(ge=0, lt=1e6)]
    count: Annotated[int, msgspec.Meta(gt=-10, le=10)]
    level: Literal["low", "high"]
    tags: Annotated[list[Annotated[str, msgspec.Meta(max_length=4)]], msgspec.Meta(max_length=3)]
    note: str | None = None
    where: Place | None = None


Scores = dict[str, Annotated[int, msgspec.Meta(ge=0, le=100)]]
"""A generic (builtin) type: a pause with it has no importable `schema_ref`."""


def local_review_type() -> type:
    """A Struct defined in a function: not importable by reference either."""

    class LocalReview(msgspec.Struct, forbid_unknown_fields=True):
        score: Annotated[int, msgspec.Meta(ge=1, le=5)]
        comment: Annotated[str, msgspec.Meta(max_length=10)] = ""

    return LocalReview


LocalReview = local_review_type()

ANSWER_TYPES: dict[str, Any] = {
    "gate-struct": Review,
    "pause-struct": Review,
    "pause-generic": Scores,
    "pause-local-struct": LocalReview,
    "gate-tuple": tuple[Annotated[int, msgspec.Meta(ge=0)], Literal["a", "b"]],
}


BREAKS_A_CONSTRAINT: dict[str, tuple[str, Any]] = {
    "gate-struct": (
        "near-miss",
        {"approved": True, "amount": -1.0, "count": 0, "level": "low", "tags": []},
    ),
    "pause-struct": (
        "near-miss",
        {"approved": True, "amount": 1.0, "count": 11, "level": "low", "tags": []},
    ),
    "pause-generic": ("near-miss", {"a": -1}),
    "pause-local-struct": ("near-miss", {"score": 0}),
    "gate-tuple": ("near-miss", [-1, "a"]),
}
"""An answer that has the schema's shape but breaks one of its bounds, tried first."""


def answer_pipeline(case: str) -> ws.Pipeline:
    tp = ANSWER_TYPES[case]

    @ws.stage
    async def before(n: int) -> int:
        return n

    if case.startswith("gate"):
        ask = ws.gate("ask", schema=tp, reason="generated")
    else:

        @ws.stage
        async def ask(before: int, ctx: ws.StageContext) -> Any:
            answer = await ctx.pause("ask", schema=tp, reason="generated")
            if isinstance(tp, type):
                assert isinstance(answer, tp), answer
            return msgspec.to_builtins(answer)

    @ws.stage
    async def echo(ask: Any) -> Any:
        return msgspec.to_builtins(ask)

    return ws.Pipeline(f"answers-{case}", [before, ask, echo])


@pytest.mark.parametrize("case", sorted(ANSWER_TYPES))
def test_generated_resume_answers(tmp_path: Path, case: str) -> None:
    """Answers generated from the pause's own JSON Schema (valid ones, near misses, random
    JSON): each is accepted, and the run succeeds with the answer decoded as the schema's
    type, or refused with InvalidResumeInput, and the run is paused and untouched."""
    tp = ANSWER_TYPES[case]
    p = answer_pipeline(case)
    db = tmp_path / "answers.db"
    schema = msgspec.json.schema(tp)
    label = f"resume answers ({case})"
    seen: collections.Counter[str] = collections.Counter()

    async def body(origin: str, value: Any) -> None:
        async with ws.Engine.open(db, pipelines=[p]) as engine:
            run = await engine.start(p, {"n": 1}, timeout=SAFETY)
            assert run.status == "paused" and run.pause is not None
            assert run.pause.schema == schema
            before_rows, before_row = journal(db, run.run_id), run_row(db, run.run_id)
            try:
                done = await engine.resume(run.run_id, value, timeout=SAFETY)
            except ws.InvalidResumeInput:
                seen[f"{origin}: refused"] += 1
                note(f"refused {value!r}")
                assert origin != "valid", f"a value valid by the schema was refused: {value!r}"
                assert journal(db, run.run_id) == before_rows
                assert run_row(db, run.run_id) == before_row
                assert (await engine.get(run.run_id)).status == "paused"
                return
            seen[f"{origin}: accepted"] += 1
            note(f"accepted {value!r} -> {done.status} {done.error}")
            assert done.status == "succeeded", (
                f"accepted answer {value!r} then failed the run: {done.error}"
            )
            rows = check_journal(db, run.run_id)
            committed = [r for r in rows if r[1] == 1 and r[2] in ("succeeded", "resumed")]
            payloads = [r[4] for r in committed if r[4] is not None]
            assert payloads, rows
            typed = msgspec.json.decode(payloads[0], type=tp)  # decodes to the schema type
            assert done.output == msgspec.json.decode(msgspec.json.encode(typed))

    @SETTINGS
    @given(answers(schema))
    @example(BREAKS_A_CONSTRAINT[case])
    def check(tagged: tuple[str, Any]) -> None:
        EXAMPLES[label] += 1
        asyncio.run(body(*tagged))

    check()
    print(f"\n{case}: {dict(seen)}")
    assert integrity(db) == [("ok",)]


# -- awkward stage outputs ----------------------------------------------------------------

lone_surrogates = st.text(alphabet=st.characters(categories=["Cs"]), min_size=1, max_size=3)
awkward_text = st.one_of(st.text(max_size=10), lone_surrogates, st.just("\x00nul"))
awkward_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**63 - 2, max_value=2**63 + 2),
    st.integers(min_value=2**64, max_value=2**300) | st.integers(max_value=-(2**64)),
    st.floats(),  # NaN and the infinities included
    awkward_text,
)
awkward_json = st.recursive(
    awkward_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)


def deep_list(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


OUTPUT_TYPES: dict[str, Any] = {
    "any": Any,
    "float": float,
    "int": int,
    "bytes": bytes,
    "str": str,
    "list-float": list[float],
    "list-any": list[Any],
}

STRATEGIES: dict[str, st.SearchStrategy[Any]] = {
    "any": awkward_json,
    "float": st.floats(),
    "int": st.integers() | st.integers(min_value=2**64, max_value=2**400),
    "bytes": st.binary(max_size=64),  # mostly not UTF-8
    "str": awkward_text,
    "list-float": st.lists(st.floats(), max_size=4),
    "list-any": st.lists(awkward_json, max_size=3),
}

FIRST_EXAMPLES: dict[str, Any] = {
    "any": [float("nan")],
    "float": float("inf"),
    "int": 2**64,
    "bytes": b"\xff\xfe\x00",
    "str": "\ud800",
    "list-float": [float("nan")],
    "list-any": [{"x": float("-inf")}],
}
"""One awkward value each generator tries first, whatever else it draws."""

_outputs: dict[str, Any] = {}
"""Values the `emit` stages return, by key (the run input carries only the key)."""


def output_pipeline(name: str, returns: Any) -> ws.Pipeline:
    async def emit(key: str) -> Any:
        return _outputs[key]

    emit.__annotations__ = {"key": str, "return": returns}
    return ws.Pipeline(f"out-{name}", [ws.stage(emit)])


@ws.stage
async def canary_stage(n: int) -> dict[str, int]:
    return {"n": n, "twice": n * 2}


canary = ws.Pipeline("canary", [canary_stage])


def same(a: Any, b: Any) -> bool:
    """Equality that also compares types (True != 1, 1 != 1.0, list != tuple); iterative,
    so that it copes with values nested deeper than the recursion limit."""
    stack = [(a, b)]
    while stack:
        x, y = stack.pop()
        if type(x) is not type(y):
            return False
        if isinstance(x, list):
            if len(x) != len(y):
                return False
            stack.extend(zip(x, y, strict=True))
        elif isinstance(x, dict):
            if x.keys() != y.keys():
                return False
            stack.extend((x[k], y[k]) for k in x)
        elif not x == y:
            return False
    return True


def short(value: Any) -> str:
    """A repr of at most 200 characters, also for values too deep to repr."""
    try:
        return repr(value)[:200]
    except RecursionError:
        return f"<{type(value).__name__} nested too deep to show>"


async def check_output_roundtrip(
    engine: ws.Engine, db: Path, p: ws.Pipeline, returns: Any, value: Any, key: str
) -> str:
    """Run `p` emitting `value`; returns "stored" or "refused" (and asserts which is fair)."""
    _outputs[key] = value
    try:
        run = await engine.start(p, {"key": key}, timeout=SAFETY)
    finally:
        del _outputs[key]
    rows = check_journal(db, run.run_id)
    if run.status == "failed":
        assert run.error is not None
        assert run.error.type.endswith("StageOutputError"), (
            f"output {short(value)} failed the run with {run.error.type}: {run.error.message}"
        )
        assert not [r for r in rows if r[2] == "succeeded"]
        return "refused"
    assert run.status == "succeeded", run
    assert same(run.output, value), f"stored {short(value)}, read back {short(run.output)}"
    again = await engine.get(run.run_id)
    assert same(again.output, value)
    history = await engine.history(run.run_id)
    (stored,) = [t for t in history if t.event == "succeeded"]
    assert same(stored.payload, msgspec.to_builtins(value)), (
        f"history holds {short(stored.payload)} for {short(value)}"
    )
    return "stored"


@pytest.mark.parametrize("case", sorted(OUTPUT_TYPES))
def test_generated_awkward_stage_outputs(tmp_path: Path, case: str) -> None:
    """NaN/inf, ints beyond 64 bits, lone surrogates, NULs, non-UTF-8 bytes, nested mixes:
    each output is stored and read back equal (engine.get and engine.history), or fails
    the run with StageOutputError; the file stays sound and other runs are untouched."""
    returns = OUTPUT_TYPES[case]
    p = output_pipeline(case, returns)
    db = tmp_path / "outputs.db"
    label = f"stage outputs ({case})"
    seen: collections.Counter[str] = collections.Counter()

    async def setup() -> ws.Run:
        async with ws.Engine.open(db, pipelines=[canary]) as engine:
            return await engine.start(canary, {"n": 21}, timeout=SAFETY)

    witness = asyncio.run(setup())

    async def body(value: Any) -> None:
        async with ws.Engine.open(db, pipelines=[p, canary]) as engine:
            outcome = await check_output_roundtrip(
                engine, db, p, returns, value, f"k{EXAMPLES[label]}"
            )
            seen[outcome] += 1
            assert (await engine.get(witness.run_id)).output == {"n": 21, "twice": 42}

    @SETTINGS
    @given(STRATEGIES[case])
    @example(FIRST_EXAMPLES[case])
    def check(value: Any) -> None:
        EXAMPLES[label] += 1
        asyncio.run(body(value))

    check()
    print(f"\n{case}: {dict(seen)}")
    assert integrity(db) == [("ok",)]
    assert run_row(db, witness.run_id) is not None


@pytest.mark.parametrize("depth", [10, 500, 900, 5000])
async def test_deeply_nested_output(db: Path, depth: int) -> None:
    """A list nested `depth` deep: stored and read back equal, or StageOutputError."""
    EXAMPLES["stage outputs (deep nesting)"] += 1
    p = output_pipeline("deep", Any)
    async with ws.Engine.open(db, pipelines=[p, canary]) as engine:
        await check_output_roundtrip(engine, db, p, Any, deep_list(depth), "deep")
        after = await engine.start(canary, {"n": 1}, timeout=SAFETY)
        assert after.status == "succeeded"
    assert integrity(db) == [("ok",)]


@pytest.mark.parametrize("kind", ["bytes", "str"])
async def test_ten_megabyte_output(db: Path, kind: str) -> None:
    """One 10 MB blob: stored, read back equal, by a fresh engine too; the file stays sound."""
    EXAMPLES["stage outputs (10 MB blob)"] += 1
    blob: Any = os.urandom(10 * 1024 * 1024)
    returns: Any = bytes
    if kind == "str":
        blob, returns = blob.hex()[: 10 * 1024 * 1024], str
    p = output_pipeline(f"blob-{kind}", returns)
    async with ws.Engine.open(db, pipelines=[p, canary]) as engine:
        assert await check_output_roundtrip(engine, db, p, returns, blob, "blob") == "stored"
        (run,) = await engine.list(pipeline=p.name)
    async with ws.Engine.open(db, pipelines=[p, canary]) as engine:
        again = await engine.get(run.run_id)
        assert again.output == blob
        assert (await engine.start(canary, {"n": 2}, timeout=SAFETY)).status == "succeeded"
    assert integrity(db) == [("ok",)]


# -- malformed run ids ----------------------------------------------------------------------

malformed_ids = st.one_of(
    st.text(max_size=20),
    st.text(alphabet=st.characters(categories=["Cs", "Cc", "Zs"]), max_size=5),
    st.text(min_size=129, max_size=300),
    st.just("'; DROP TABLE runs; --"),
    st.binary(max_size=10),
    st.integers(),
    st.floats(),
    st.none(),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
)


def test_malformed_run_ids(tmp_path: Path) -> None:
    """get/resume/cancel/history/wait/retry/replay/tree with ids that are not run ids (or
    ids of no run): a WaystationError subclass each time, never a raw exception."""
    p = answer_pipeline("gate-struct")
    db = tmp_path / "ids.db"

    async def setup() -> ws.Run:
        async with ws.Engine.open(db, pipelines=[p]) as engine:
            return await engine.start(p, {"n": 1}, timeout=SAFETY)

    paused = asyncio.run(setup())
    before = journal(db, paused.run_id)
    bad: dict[str, list[str]] = collections.defaultdict(list)

    async def body(run_id: Any) -> None:
        async with ws.Engine.open(db, pipelines=[p]) as engine:
            calls = {
                "get": lambda: engine.get(run_id),
                "history": lambda: engine.history(run_id),
                "resume": lambda: engine.resume(run_id, {"approved": True}, timeout=SAFETY),
                "cancel": lambda: engine.cancel(run_id),
                "wait": lambda: engine.wait(run_id, timeout=SAFETY),
                "retry": lambda: engine.retry(run_id, timeout=SAFETY),
                "replay": lambda: engine.replay(run_id, from_stage=0, timeout=SAFETY),
                "tree": lambda: engine.tree(run_id),
                "start(run_id=)": lambda: engine.start(p, {"n": 1}, run_id=run_id),
            }
            for name, call in calls.items():
                try:
                    result = await call()
                except ws.WaystationError:
                    continue
                except Exception as exc:
                    bad[name].append(f"{run_id!r:.40}: {type(exc).__name__}: {exc}"[:160])
                    continue
                # Only start with a well-formed new id may succeed.
                assert name == "start(run_id=)", (name, run_id, result)
                assert run_id is None or re.fullmatch(r"[A-Za-z0-9][\w.:\-]*", run_id)

    @SETTINGS
    @given(malformed_ids)
    def check(run_id: Any) -> None:
        assume(run_id != paused.run_id)
        EXAMPLES["malformed run ids"] += 1
        asyncio.run(body(run_id))

    check()
    assert journal(db, paused.run_id) == before
    assert tables(db) >= {"runs", "transitions"}
    assert integrity(db) == [("ok",)]
    assert not bad, "raw exceptions:\n" + "\n".join(
        f"{name}: {len(v)}x, e.g. {v[:3]}" for name, v in bad.items()
    )


# -- malformed pipeline definitions ----------------------------------------------------------

DEFECTS = [
    "bad-name",
    "duplicate-name",
    "binds-a-later-stage",
    "binds-itself",
    "var-positional",
    "var-keyword",
    "positional-only",
    "unresolvable-annotation",
    "not-a-stage",
    "zero-attempts",
    "negative-timeout",
    "nan-timeout",
    "input-type-conflict",
]

stage_specs = st.fixed_dictionaries(
    {
        "defect": st.sampled_from([None] * len(DEFECTS) + DEFECTS),
        "sync": st.booleans(),
        "uses": st.lists(st.integers(0, 5), max_size=3, unique=True),
        "gate": st.integers(0, 9).map(lambda k: k == 0),
        "bad_name": st.text(max_size=4).filter(lambda t: not t.isidentifier())
        | st.sampled_from(["1a", "a-b", "'; DROP TABLE runs; --", ""]),
    }
)


def make_stage(i: int, spec: dict[str, Any], names: list[str]) -> Any:
    """Stage number `i` of a generated pipeline: sound, unless `spec["defect"]` says how not."""
    defect = spec["defect"]
    name = f"s{i}"
    if defect == "bad-name":
        name = spec["bad_name"]
    elif defect == "duplicate-name" and names:
        name = names[-1]
    if spec["gate"] and defect is None:
        return ws.gate(name, schema=int)
    params = [
        inspect.Parameter(names[k], inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Any)
        for k in spec["uses"]
        if k < len(names)
    ]
    params.append(inspect.Parameter("n", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=int))
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    if defect == "binds-a-later-stage":
        params.append(inspect.Parameter(f"s{i + 1}", kind, annotation=int))
    elif defect == "binds-itself":
        params.append(inspect.Parameter(name if name.isidentifier() else "s0", kind))
    elif defect == "positional-only":
        params.insert(0, inspect.Parameter("p", inspect.Parameter.POSITIONAL_ONLY))
    elif defect == "var-positional":
        params.append(inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL))
    elif defect == "var-keyword":
        params.append(inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD))
    elif defect == "input-type-conflict":
        params[-1] = params[-1].replace(annotation=str)
    params = list({p.name: p for p in params}.values())

    async def afn(**kwargs: Any) -> Any:
        return 1

    def sfn(**kwargs: Any) -> Any:
        return 1

    fn: Any = sfn if spec["sync"] else afn
    fn.__signature__ = inspect.Signature(sorted(params, key=lambda p: p.kind))
    fn.__annotations__ = {p.name: p.annotation for p in params if p.annotation is not p.empty}
    fn.__annotations__["return"] = "Undefined" if defect == "unresolvable-annotation" else int
    fn.__name__ = "fn"
    if defect == "not-a-stage":
        return fn
    timeout = {"negative-timeout": -1.0, "nan-timeout": float("nan")}.get(defect or "")
    attempts = 0 if defect == "zero-attempts" else 1
    return ws.stage(name=name, timeout=timeout, retry=ws.Retry(attempts=attempts))(fn)


def test_malformed_pipeline_definitions(tmp_path: Path) -> None:
    """Generated stage lists with defects (bad or duplicate names, bindings to later stages
    or to itself, *args/**kwargs, positional-only parameters, unresolvable annotations,
    non-stages, zero attempts, negative or NaN timeouts, conflicting input types) and bad
    pipeline names: building raises PipelineDefinitionError, or the pipeline runs."""
    outcomes: collections.Counter[str] = collections.Counter()
    reasons: collections.Counter[str] = collections.Counter()
    bad: list[str] = []
    db = tmp_path / "defs.db"

    async def run_it(pipeline: ws.Pipeline) -> None:
        async with ws.Engine.open(db, pipelines=[pipeline]) as engine:
            sample = {int: 1, str: "x"}
            inputs = {k: sample.get(f.type, 1) for k, f in pipeline.inputs.items() if f.required}
            run = await engine.start(pipeline, inputs, timeout=SAFETY)
            while run.status == "paused":
                run = await engine.resume(run.run_id, 5, timeout=SAFETY)
            assert run.status == "succeeded", run.error
            check_journal(db, run.run_id)

    @SETTINGS
    @given(
        st.lists(stage_specs, max_size=5),
        st.sampled_from(["defs"] * 6 + ["", "'; DROP TABLE runs; --", "a\x00b", "x" * 201, 7]),
    )
    @example(
        [{"defect": "nan-timeout", "sync": False, "uses": [], "gate": False, "bad_name": ""}],
        "defs",
    )
    def check(specs: list[dict[str, Any]], name: Any) -> None:
        EXAMPLES["malformed pipeline definitions"] += 1
        try:
            names: list[str] = []
            stages = []
            for i, spec in enumerate(specs):
                stages.append(make_stage(i, spec, names))
                names.append(getattr(stages[-1], "name", f"s{i}"))
            pipeline = ws.Pipeline(
                name, stages, version=str(EXAMPLES["malformed pipeline definitions"])
            )
        except ws.PipelineDefinitionError as exc:
            outcomes["refused"] += 1
            reasons[next((s["defect"] for s in specs if s["defect"]), "pipeline")] += 1
            assert str(exc)
            return
        except Exception as exc:
            bad.append(f"{[s['defect'] for s in specs]} {name!r:.20}: {type(exc).__name__}: {exc}")
            return
        outcomes["built"] += 1
        defects = [s["defect"] for s in specs if s["defect"]]
        note(f"built despite {defects}")
        try:
            asyncio.run(run_it(pipeline))
        except ws.WaystationError as exc:
            bad.append(f"built with {defects}, then {type(exc).__name__}: {exc}")
        outcomes["ran"] += 1

    check()
    print(f"\npipeline definitions: {dict(outcomes)}; refused: {dict(reasons)}")
    assert outcomes["refused"] > 0 and outcomes["built"] > 0
    assert not bad, "\n".join(bad[:10])
    if db.exists():
        assert integrity(db) == [("ok",)]
