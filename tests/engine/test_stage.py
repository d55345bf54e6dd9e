"""Defining stages and gates: what `@ws.stage`, `ws.gate` and `ws.Retry` accept and refuse."""

from __future__ import annotations

import math
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import msgspec
import pytest

import waystation as ws


class Order(msgspec.Struct):
    item: str
    qty: int


class Decision(msgspec.Struct):
    approved: bool
    by: str


def events(db: Path, run_id: str) -> list[tuple[int | None, str]]:
    with closing(sqlite3.connect(db)) as conn:
        return conn.execute(
            "SELECT stage_index, event FROM journal WHERE run_id = ? ORDER BY seq", (run_id,)
        ).fetchall()


def test_decorator_makes_a_stage_that_still_calls_the_function() -> None:
    @ws.stage
    def double(n: int) -> int:
        return n * 2

    assert isinstance(double, ws.Stage)
    assert double.name == "double"
    assert double(21) == 42


def test_decorator_with_options_and_a_custom_name() -> None:
    @ws.stage(name="renamed", retry=ws.Retry(attempts=2), timeout=5)
    async def original(n: int) -> int:
        return n

    assert isinstance(original, ws.Stage)
    assert original.name == "renamed"


async def test_custom_name_is_what_later_stages_bind_to(db: Path) -> None:
    @ws.stage(name="total")
    async def compute_total(order: Order) -> int:
        return order.qty * 3

    @ws.stage
    async def report(total: int) -> str:
        return f"total={total}"

    p = ws.Pipeline("custom-name", [compute_total, report])
    assert set(p.inputs) == {"order"}
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        run = await engine.start(p, {"order": Order("pen", 2)})
    assert run.status == "succeeded"
    assert run.output == "total=6"
    assert events(db, run.run_id)[1:3] == [(0, "started"), (0, "succeeded")]


@pytest.mark.parametrize("name", ["has space", "1st", "a-b"])
def test_stage_name_must_be_an_identifier(name: str) -> None:
    with pytest.raises(ws.PipelineDefinitionError, match="identifier"):

        @ws.stage(name=name)
        async def s() -> None:
            return None


@pytest.mark.parametrize("timeout", [0, -1, math.nan, math.inf])
def test_timeout_must_be_positive(timeout: float) -> None:
    with pytest.raises(ws.PipelineDefinitionError, match="timeout"):

        @ws.stage(timeout=timeout)
        async def s() -> None:
            return None


def test_retry_refuses_nonsense() -> None:
    with pytest.raises(ws.PipelineDefinitionError, match="attempts"):
        ws.Retry(attempts=0)
    with pytest.raises(ws.PipelineDefinitionError):
        ws.Retry(backoff=-1)


@pytest.mark.parametrize(
    "default", [math.nan, {"approved": True, "score": math.inf}], ids=["nan", "inf-in-dict"]
)
def test_gate_default_answer_holding_nan_or_infinity_is_refused(default: Any) -> None:
    """The default is committed, when the pause expires, as `resume` commits an answer; JSON
    would store its NaN or infinity as null (and resume now refuses such an answer)."""
    with pytest.raises(ws.PipelineDefinitionError, match="NaN or infinity"):
        ws.gate("score", schema=Any, expires_after=60, on_expire=default)


@pytest.mark.parametrize("field", ["attempts", "backoff", "multiplier", "max_backoff", "jitter"])
@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
def test_retry_refuses_numbers_that_are_not_finite(field: str, value: float) -> None:
    """NaN passed `attempts < 1` and `backoff < 0` (every comparison with NaN is false):
    attempts=nan retried a failing stage for ever."""
    with pytest.raises(ws.PipelineDefinitionError, match=f"{field}="):
        ws.Retry(**{field: value})


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_gate_expiry_and_sleeps_must_be_finite(value: float) -> None:
    """NaN passed `expires_after <= 0` and `seconds < 0`: a gate with expires_after=nan
    never expired, a sleep stage of nan seconds did not sleep."""
    with pytest.raises(ws.PipelineDefinitionError, match="expires_after"):
        ws.gate("approval", schema=Decision, expires_after=value)
    with pytest.raises(ws.PipelineDefinitionError, match="seconds"):
        ws.sleep_stage("pause", value)
    with pytest.raises(ws.PipelineDefinitionError, match="finite time"):
        ws.wait_until("later", value)


def test_gate_default_answer_nested_too_deeply_is_refused() -> None:
    """It raised a bare RecursionError when the gate was defined."""
    default: list[Any] = []
    for _ in range(100_000):
        default = [default]
    with pytest.raises(ws.PipelineDefinitionError, match="nested too deeply"):
        ws.gate("deep", schema=Any, expires_after=60, on_expire=default)


def test_var_args_are_refused() -> None:
    with pytest.raises(ws.PipelineDefinitionError, match="args"):

        @ws.stage
        async def s(*args: Any) -> None:
            return None

    with pytest.raises(ws.PipelineDefinitionError, match="kwargs"):

        @ws.stage
        async def t(**kwargs: Any) -> None:
            return None


def test_positional_only_parameters_are_refused() -> None:
    with pytest.raises(ws.PipelineDefinitionError, match="positional-only"):

        @ws.stage
        async def s(n: int, /) -> None:
            return None


def test_a_stage_cannot_be_wrapped_twice() -> None:
    @ws.stage
    async def s() -> None:
        return None

    with pytest.raises(ws.PipelineDefinitionError, match="already a stage"):
        ws.stage(s)  # type: ignore[call-overload]


def test_unresolvable_annotation_is_a_definition_error() -> None:
    with pytest.raises(ws.PipelineDefinitionError, match="annotations"):

        @ws.stage
        async def s(x: NoSuchType) -> None:  # type: ignore[name-defined]  # noqa: F821
            return None


def test_gate_is_a_stage_that_is_not_callable() -> None:
    g = ws.gate("approval", schema=Decision, reason="ok?")
    assert isinstance(g, ws.Stage)
    assert g.name == "approval"
    with pytest.raises(TypeError):
        g()


def test_gate_name_must_be_an_identifier() -> None:
    with pytest.raises(ws.PipelineDefinitionError):
        ws.gate("needs approval", schema=Decision)


def test_context_parameter_is_not_an_input() -> None:
    @ws.stage
    async def s(order: Order, ctx: ws.StageContext) -> int:
        return order.qty

    p = ws.Pipeline("ctx-not-input", [s])
    assert set(p.inputs) == {"order"}


async def test_parameter_default_makes_an_optional_input(db: Path) -> None:
    @ws.stage
    async def greet(name: str, punctuation: str = "!") -> str:
        return f"hello {name}{punctuation}"

    p = ws.Pipeline("defaults", [greet])
    assert p.inputs["name"].required
    assert not p.inputs["punctuation"].required
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        a = await engine.start(p, {"name": "ann"})
        b = await engine.start(p, {"name": "bob", "punctuation": "?"})
    assert (a.output, b.output) == ("hello ann!", "hello bob?")


async def test_when_condition_binds_like_a_stage(db: Path) -> None:
    seen: list[Any] = []

    def big(order: Order, size: int) -> bool:
        seen.append((order, size))
        return order.qty >= size

    @ws.stage
    async def size() -> int:
        return 10

    @ws.stage(when=big)
    async def bulk(order: Order) -> str:
        return "bulk"

    p = ws.Pipeline("when-binds", [size, bulk])
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        small = await engine.start(p, {"order": Order("pen", 3)})
        large = await engine.start(p, {"order": Order("pen", 30)})
    assert seen == [(Order("pen", 3), 10), (Order("pen", 30), 10)]
    assert small.status == large.status == "succeeded"
    assert small.output is None
    assert large.output == "bulk"
    assert (1, "skipped") in events(db, small.run_id)
    assert (1, "succeeded") in events(db, large.run_id)
