"""Building pipelines: inferred and pinned inputs, the checks made when built, fingerprints."""

from __future__ import annotations

import math
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest

import waystation as ws


class Order(msgspec.Struct):
    item: str
    qty: int


class CheckoutInput(msgspec.Struct):
    order: Order
    coupon: str = ""


@dataclass
class DataInput:
    order: Order
    note: str = "none"


class ShadowInput(msgspec.Struct):
    order: Order
    price: float


class Receipt(msgspec.Struct):
    item: str
    total: float


@ws.stage
async def price(order: Order) -> float:
    return order.qty * 2.5


@ws.stage
async def charge(order: Order, price: float) -> Receipt:
    return Receipt(order.item, price)


def run_rows(db: Path) -> int:
    with closing(sqlite3.connect(db)) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0])


# -- inputs ---------------------------------------------------------------------------------


def test_inputs_are_inferred_from_parameters_no_earlier_stage_provides() -> None:
    @ws.stage
    async def ship(order: Order, charge: Receipt, address: str, express: bool = False) -> str:
        return address

    p = ws.Pipeline("inferred", [price, charge, ship])
    assert list(p.inputs) == ["order", "address", "express"]
    assert p.inputs["order"].type is Order
    assert p.inputs["order"].required
    assert p.inputs["address"].type is str
    assert p.inputs["address"].required
    assert p.inputs["express"].type is bool
    assert not p.inputs["express"].required
    # stage outputs are never inputs
    assert "price" not in p.inputs
    assert "charge" not in p.inputs


def test_inferred_input_used_with_two_types_is_refused() -> None:
    @ws.stage
    async def a(count: int) -> int:
        return count

    @ws.stage
    async def b(count: str) -> str:
        return count

    with pytest.raises(ws.PipelineDefinitionError) as err:
        ws.Pipeline("conflict", [a, b])
    assert "count" in str(err.value)
    assert "'b'" in str(err.value)


class Point(msgspec.Struct):
    x: float


@pytest.mark.parametrize(
    "value",
    [{"x": [math.inf, 1.0]}, {"x": math.nan}, {"x": {"a": [[-math.inf]]}}, Point(math.nan)],
    ids=["list-inf", "nan", "nested-minus-inf", "pinned-struct-nan"],
)
async def test_an_input_holding_nan_or_infinity_is_refused(db: Path, value: Any) -> None:
    """JSON has no NaN or infinity and msgspec writes them as null: such an input used to
    start a run that saw None where the caller had given a number."""

    @ws.stage
    async def echo(x: Any) -> Any:
        return x

    p = ws.Pipeline("nan-input", [echo], input=Point if isinstance(value, Point) else None)
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        with pytest.raises(ws.InvalidInput, match="NaN or infinity"):
            await engine.start(p, value)
        with pytest.raises(ws.InvalidInput, match="NaN or infinity"):
            await engine.submit(p, value)
        assert await engine.list() == []
        ok = await engine.start(p, {"x": 1.5}, timeout=30)
    assert ok.status == "succeeded" and ok.output == 1.5
    assert run_rows(db) == 1


@pytest.mark.parametrize("depth", [1000, 100_000])
async def test_an_input_nested_too_deeply_is_refused(db: Path, depth: int) -> None:
    """Such an input used to raise a bare RecursionError, not a WaystationError."""
    value: list[Any] = []
    for _ in range(depth):
        value = [value]

    @ws.stage
    async def echo(x: Any) -> int:
        return 1

    p = ws.Pipeline("deep-input", [echo])
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        with pytest.raises(ws.InvalidInput, match="nested too deeply"):
            await engine.start(p, {"x": value})
        with pytest.raises(ws.InvalidInput, match="nested too deeply"):
            await engine.submit(p, {"x": value})
        assert await engine.list() == []
    assert run_rows(db) == 0


def test_pinned_struct_input() -> None:
    p = ws.Pipeline("pinned", [price, charge], input=CheckoutInput)
    assert list(p.inputs) == ["order", "coupon"]
    assert p.inputs["order"].type is Order
    assert p.inputs["order"].required
    assert not p.inputs["coupon"].required


def test_pinned_dataclass_input() -> None:
    p = ws.Pipeline("pinned-dc", [price, charge], input=DataInput)
    assert list(p.inputs) == ["order", "note"]
    assert p.inputs["order"].type is Order
    assert not p.inputs["note"].required


async def test_pinned_struct_input_runs_and_stages_see_its_fields(db: Path) -> None:
    seen: list[Any] = []

    @ws.stage
    async def apply_coupon(charge: Receipt, coupon: str, ctx: ws.StageContext) -> float:
        seen.append((coupon, ctx.input))
        return charge.total - (1 if coupon else 0)

    p = ws.Pipeline("pinned-run", [price, charge, apply_coupon], input=CheckoutInput)
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        run = await engine.start(p, CheckoutInput(Order("pen", 4), coupon="SAVE"))
        plain = await engine.start(p, {"order": {"item": "ink", "qty": 2}})
    assert run.status == "succeeded"
    assert run.output == 9.0
    assert plain.output == 5.0
    assert seen[0] == ("SAVE", CheckoutInput(Order("pen", 4), "SAVE"))
    assert isinstance(seen[1][1], CheckoutInput)
    assert seen[1][0] == ""


async def test_pinned_dataclass_input_runs(db: Path) -> None:
    @ws.stage
    async def annotate(charge: Receipt, note: str) -> str:
        return f"{charge.item}:{note}"

    p = ws.Pipeline("pinned-dc-run", [price, charge, annotate], input=DataInput)
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        run = await engine.start(p, DataInput(Order("pen", 1)))
    assert run.status == "succeeded"
    assert run.output == "pen:none"


def test_pinned_input_must_be_struct_or_dataclass() -> None:
    with pytest.raises(ws.PipelineDefinitionError, match="Struct or a dataclass"):
        ws.Pipeline("bad-input", [price], input=dict)


# -- checks made when built -----------------------------------------------------------------


def test_duplicate_stage_names() -> None:
    @ws.stage(name="price")
    async def other_price(order: Order) -> float:
        return 1.0

    with pytest.raises(ws.PipelineDefinitionError) as err:
        ws.Pipeline("dupes", [price, other_price])
    assert "price" in str(err.value)
    assert "two stages" in str(err.value)


def test_same_stage_twice_is_a_duplicate() -> None:
    with pytest.raises(ws.PipelineDefinitionError, match="price"):
        ws.Pipeline("twice", [price, price])


def test_unprovided_parameter_names_stage_and_parameter() -> None:
    @ws.stage
    async def deliver(order: Order, address: str) -> str:
        return address

    with pytest.raises(ws.PipelineDefinitionError) as err:
        ws.Pipeline("unprovided", [price, deliver], input=CheckoutInput)
    message = str(err.value)
    assert "deliver" in message
    assert "address" in message


def test_parameter_with_default_need_not_be_provided_by_pinned_input() -> None:
    @ws.stage
    async def deliver(order: Order, address: str = "pickup") -> str:
        return address

    p = ws.Pipeline("default-ok", [price, deliver], input=CheckoutInput)
    assert "address" not in p.inputs


def test_binding_to_a_later_stage() -> None:
    @ws.stage
    async def early(order: Order, late: int) -> int:
        return late

    @ws.stage
    async def late(order: Order) -> int:
        return order.qty

    with pytest.raises(ws.PipelineDefinitionError) as err:
        ws.Pipeline("later", [early, late])
    message = str(err.value)
    assert "early" in message
    assert "late" in message
    assert "earlier" in message


def test_binding_to_itself() -> None:
    @ws.stage
    async def loop(loop: int) -> int:
        return loop

    with pytest.raises(ws.PipelineDefinitionError, match="loop"):
        ws.Pipeline("self", [loop])


def test_input_field_shadowed_by_a_stage_name() -> None:
    with pytest.raises(ws.PipelineDefinitionError) as err:
        ws.Pipeline("shadow", [price, charge], input=ShadowInput)
    assert "price" in str(err.value)
    assert "shadow" in str(err.value)


@pytest.mark.parametrize(
    "thing", [lambda order: order, "price", None, 42], ids=["function", "str", "None", "int"]
)
def test_non_stage_in_the_list(thing: Any) -> None:
    with pytest.raises(ws.PipelineDefinitionError, match="not a stage"):
        ws.Pipeline("junk", [price, thing])


def test_plain_function_in_the_list_is_refused_with_a_hint() -> None:
    async def undecorated(order: Order) -> int:
        return 1

    with pytest.raises(ws.PipelineDefinitionError) as err:
        ws.Pipeline("undecorated", [price, undecorated])  # type: ignore[list-item]
    assert "ws.stage" in str(err.value)


def test_empty_pipeline_is_refused() -> None:
    with pytest.raises(ws.PipelineDefinitionError):
        ws.Pipeline("empty", [])


async def test_definition_errors_write_nothing(db: Path) -> None:
    async with ws.Engine.open(db, pipelines=[]) as engine:
        with pytest.raises(ws.PipelineDefinitionError):
            ws.Pipeline("dupes", [price, price])
        assert await engine.list() == []
    assert run_rows(db) == 0


def test_definition_error_is_a_waystation_error() -> None:
    assert issubclass(ws.PipelineDefinitionError, ws.WaystationError)


# -- fingerprint ----------------------------------------------------------------------------


def _fingerprint_of(fn: Any) -> str:
    return ws.Pipeline("fp", [price, ws.stage(name="step")(fn)]).fingerprint


def test_fingerprint_is_stable_for_the_same_shape() -> None:
    async def step(order: Order, price: float) -> str:
        return ""

    async def step_again(order: Order, price: float) -> str:
        return "different body, same signature"

    assert _fingerprint_of(step) == _fingerprint_of(step_again)


def test_fingerprint_changes_when_a_stage_signature_changes() -> None:
    async def base(order: Order, price: float) -> str:
        return ""

    async def other_param_type(order: Order, price: int) -> str:
        return ""

    async def other_return(order: Order, price: float) -> int:
        return 0

    async def extra_param(order: Order, price: float, note: str) -> str:
        return ""

    async def fewer_params(order: Order) -> str:
        return ""

    prints = [
        _fingerprint_of(f)
        for f in (base, other_param_type, other_return, extra_param, fewer_params)
    ]
    assert len(set(prints)) == len(prints)


def test_fingerprint_changes_when_stages_are_reordered_or_added() -> None:
    @ws.stage
    async def a(order: Order) -> int:
        return 1

    @ws.stage
    async def b(order: Order) -> int:
        return 2

    ab = ws.Pipeline("order", [a, b]).fingerprint
    ba = ws.Pipeline("order", [b, a]).fingerprint
    abp = ws.Pipeline("order", [a, b, price]).fingerprint
    assert len({ab, ba, abp}) == 3


def test_fingerprint_changes_with_the_gate_schema() -> None:
    class_a = ws.Pipeline("g", [price, ws.gate("ok", schema=bool)]).fingerprint
    class_b = ws.Pipeline("g", [price, ws.gate("ok", schema=str)]).fingerprint
    assert class_a != class_b
