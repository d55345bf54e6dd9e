"""Running pipelines through the public API, checking what was committed to the SQLite file."""

from __future__ import annotations

import asyncio
import json
import math
import sqlite3
import threading
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypedDict

import anyio
import anyio.lowlevel
import msgspec
import pytest

import waystation as ws

from .files import journal, run_row

SAFETY = 30  # seconds; a safety net against hangs, never a timing assertion


class Order(msgspec.Struct):
    item: str
    qty: int


class Quote(msgspec.Struct):
    item: str
    total: float


@dataclass
class Label:
    text: str
    copies: int


class Decision(msgspec.Struct):
    approved: bool
    by: str


class Totals(TypedDict):
    item: str
    total: float


def nested(depth: int) -> list[Any]:
    """A list holding a list ... `depth` deep."""
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


class Node(msgspec.Struct):
    kids: list[Node] = []


def tree(depth: int) -> Node:
    """A Node with one kid, `depth` deep."""
    node = Node()
    for _ in range(depth):
        node = Node([node])
    return node


def succeeded_rows(db: Path, run_id: str, stage_index: int) -> list[tuple[Any, ...]]:
    return [r for r in journal(db, run_id) if r[2] == "succeeded" and r[1] == stage_index]


# -- the pipeline most tests use --------------------------------------------------------------


@ws.stage
async def price(order: Order) -> float:
    return order.qty * 2.5


@ws.stage
async def quote(order: Order, price: float) -> Quote:
    return Quote(order.item, price)


quoting = ws.Pipeline("quoting", [price, quote], version="1")


# -- start ------------------------------------------------------------------------------------


async def test_start_returns_the_finished_run_with_the_typed_output(db: Path) -> None:
    async with ws.Engine.open(db, pipelines=[quoting]) as engine:
        run = await engine.start(quoting, {"order": Order("pen", 4)})
        assert run.status == "succeeded"
        assert run.done
        assert isinstance(run.output, Quote)
        assert run.output == Quote("pen", 10.0)
        assert run.pipeline == "quoting"
        assert run.pipeline_version == "1"
        assert run.error is None and run.pause is None
        assert run.stage_index == 2
        got = await engine.get(run.run_id)
        assert got.status == "succeeded"
        assert got.output == Quote("pen", 10.0)
        assert got.input == {"order": Order("pen", 4)}
    row = run_row(db, run.run_id)
    assert row["status"] == "succeeded"
    assert json.loads(row["output"]) == {"item": "pen", "total": 10.0}
    assert json.loads(row["input"]) == {"order": {"item": "pen", "qty": 4}}
    assert row["lease_owner"] is None


async def test_output_is_decoded_by_a_new_engine_on_the_same_file(db: Path) -> None:
    async with ws.Engine.open(db, pipelines=[quoting]) as engine:
        run = await engine.start(quoting, {"order": Order("ink", 2)})
    async with ws.Engine.open(db, pipelines=[quoting]) as engine:
        again = await engine.get(run.run_id)
    assert isinstance(again.output, Quote)
    assert again.output == Quote("ink", 5.0)


async def test_dataclass_output_is_decoded(db: Path) -> None:
    @ws.stage
    async def label(order: Order) -> Label:
        return Label(order.item.upper(), order.qty)

    p = ws.Pipeline("labels", [label])
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        run = await engine.start(p, {"order": Order("pen", 3)})
    assert run.output == Label("PEN", 3)
    assert isinstance(run.output, Label)


async def test_typed_dict_output(db: Path) -> None:
    # msgspec supports TypedDict, and so do annotations elsewhere (inputs, parameters).
    @ws.stage
    async def totals(order: Order) -> Totals:
        return {"item": order.item, "total": order.qty * 1.5}

    @ws.stage
    async def describe(totals: Totals) -> str:
        return f"{totals['item']}={totals['total']}"

    p = ws.Pipeline("typed-dict", [totals, describe])
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        run = await engine.start(p, {"order": Order("pen", 2)})
    assert run.error is None, run.error.message
    assert run.status == "succeeded"
    assert run.output == "pen=3.0"
    assert len(succeeded_rows(db, run.run_id, 0)) == 1


async def test_parameters_bind_to_input_fields_and_earlier_outputs(db: Path) -> None:
    seen: dict[str, Any] = {}

    @ws.stage
    async def summary(order: Order, price: float, quote: Quote, note: str) -> str:
        seen.update(order=order, price=price, quote=quote, note=note)
        return f"{note}: {quote.item} {price}"

    p = ws.Pipeline("binding", [price, quote, summary])
    assert set(p.inputs) == {"order", "note"}
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        run = await engine.start(p, {"order": Order("pen", 2), "note": "rush"})
    assert run.output == "rush: pen 5.0"
    assert seen == {
        "order": Order("pen", 2),
        "price": 5.0,
        "quote": Quote("pen", 5.0),
        "note": "rush",
    }
    assert isinstance(seen["order"], Order)
    assert isinstance(seen["quote"], Quote)


async def test_a_parameter_may_take_an_earlier_output_as_another_type(db: Path) -> None:
    seen: list[Any] = []

    @ws.stage
    async def raw(quote: dict[str, Any]) -> int:
        seen.append(quote)
        return len(quote)

    p = ws.Pipeline("convert", [price, quote, raw])
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        run = await engine.start(p, {"order": Order("pen", 2)})
    assert run.output == 2
    assert seen == [{"item": "pen", "total": 5.0}]


async def test_stage_context(db: Path) -> None:
    seen: list[dict[str, Any]] = []

    @ws.stage
    async def first(order: Order, ctx: ws.StageContext) -> int:
        seen.append({"key": ctx.idempotency_key, "index": ctx.stage_index})
        return order.qty

    @ws.stage
    async def second(first: int, context: ws.StageContext) -> str:
        seen.append(
            {
                "run_id": context.run_id,
                "index": context.stage_index,
                "attempt": context.attempt,
                "key": context.idempotency_key,
                "input": context.input,
                "results": dict(context.results),
            }
        )
        return "ok"

    p = ws.Pipeline("context", [first, second])
    assert set(p.inputs) == {"order"}
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        run = await engine.start(p, {"order": Order("pen", 3)}, run_id="ctx-run-1")
    assert run.status == "succeeded"
    ctx = seen[1]
    assert ctx["run_id"] == "ctx-run-1"
    assert ctx["index"] == 1
    assert seen[0]["index"] == 0
    assert ctx["attempt"] == 1
    assert isinstance(ctx["key"], str) and ctx["key"]
    assert ctx["key"] != seen[0]["key"]  # one key per stage
    assert ctx["input"] == {"order": Order("pen", 3)}
    assert ctx["results"] == {"first": 3}


async def test_sync_stage_runs_in_a_worker_thread(db: Path) -> None:
    threads: list[int] = []

    @ws.stage
    def blocking(order: Order) -> int:
        threads.append(threading.get_ident())
        return order.qty * 10

    @ws.stage
    async def after(blocking: int) -> int:
        threads.append(threading.get_ident())
        return blocking + 1

    p = ws.Pipeline("sync", [blocking, after])
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        run = await engine.start(p, {"order": Order("pen", 3)})
    assert run.output == 31
    loop_thread = threading.get_ident()
    assert threads[0] != loop_thread
    assert threads[1] == loop_thread


# -- retries, failures, timeouts --------------------------------------------------------------


async def test_retries_journal_each_failed_attempt(db: Path) -> None:
    calls: list[tuple[int, str]] = []

    @ws.stage(retry=ws.Retry(attempts=4, backoff=0))
    async def flaky(ctx: ws.StageContext) -> str:
        calls.append((ctx.attempt, ctx.idempotency_key))
        if ctx.attempt < 3:
            raise ConnectionError(f"down on attempt {ctx.attempt}")
        return "up"

    p = ws.Pipeline("flaky", [flaky])
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        run = await engine.start(p)
        history = await engine.history(run.run_id)
    assert run.status == "succeeded"
    assert run.output == "up"
    assert [a for a, _ in calls] == [1, 2, 3]
    assert len({k for _, k in calls}) == 1  # idempotency key stable across attempts

    retrying = [t for t in history if t.event == "retrying"]
    assert [t.attempt for t in retrying] == [1, 2]
    for t in retrying:
        assert t.error is not None
        assert t.error.type == "ConnectionError"
        assert t.error.message == f"down on attempt {t.attempt}"
        assert t.stage_index == 0
    done = [t for t in history if t.event == "succeeded"]
    assert len(done) == 1 and done[0].attempt == 3
    # and on disk
    rows = [r for r in journal(db, run.run_id) if r[2] == "retrying"]
    assert [r[3] for r in rows] == [1, 2]
    assert all(json.loads(r[5])["type"] == "ConnectionError" for r in rows)


async def test_exhausted_retries_fail_the_run_with_the_error_persisted(db: Path) -> None:
    calls = 0

    @ws.stage
    async def fine() -> int:
        return 1

    @ws.stage(retry=ws.Retry(attempts=3, backoff=0))
    async def doomed(fine: int) -> int:
        nonlocal calls
        calls += 1
        raise ValueError(f"bad value {calls}")

    @ws.stage
    async def never(doomed: int) -> int:
        raise AssertionError("must not run")

    p = ws.Pipeline("doomed", [fine, doomed, never])
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        run = await engine.start(p)
    assert calls == 3
    assert run.status == "failed"
    assert run.done
    assert run.output is None
    err = run.error
    assert err is not None
    assert err.type == "ValueError"
    assert err.message == "bad value 3"
    assert err.traceback is not None
    assert "ValueError: bad value 3" in err.traceback
    assert "doomed" in err.traceback
    assert err.stage_name == "doomed"
    assert err.stage_index == 1

    rows = journal(db, run.run_id)
    stage1 = [(r[2], r[3]) for r in rows if r[1] == 1]
    assert stage1 == [("started", 1), ("retrying", 1), ("retrying", 2), ("failed", 3)]
    failed = [r for r in rows if r[2] == "failed"]
    assert json.loads(failed[0][5])["message"] == "bad value 3"
    assert not any(r[1] == 2 for r in rows)
    row = run_row(db, run.run_id)
    assert row["status"] == "failed"
    stored = json.loads(row["error"])
    assert stored["type"] == "ValueError"
    assert stored["message"] == "bad value 3"
    assert "Traceback" in stored["traceback"]
    assert row["lease_owner"] is None


async def test_only_listed_exceptions_are_retried(db: Path) -> None:
    calls = 0

    @ws.stage(retry=ws.Retry(attempts=5, retry_on=(ConnectionError,)))
    async def picky() -> int:
        nonlocal calls
        calls += 1
        raise KeyError("missing")

    p = ws.Pipeline("picky", [picky])
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        run = await engine.start(p)
    assert calls == 1
    assert run.status == "failed"
    assert run.error is not None and run.error.type == "KeyError"
    assert not [r for r in journal(db, run.run_id) if r[2] == "retrying"]


async def test_a_stage_raising_cancelled_error_settles_the_run(db: Path) -> None:
    # User code can raise CancelledError without anyone cancelling the run, e.g. by awaiting
    # a task that was cancelled. The run must settle (fail), not stay `running` forever.
    @ws.stage
    async def awaits_a_cancelled_task() -> int:
        task = asyncio.create_task(asyncio.sleep(3600))
        await asyncio.sleep(0)
        task.cancel()
        await task
        return 1

    p = ws.Pipeline("inner-cancel", [awaits_a_cancelled_task])
    async with ws.Engine.open(db, pipelines=[p, quoting]) as engine:
        run = await engine.submit(p)
        try:
            settled = await engine.wait(run.run_id, timeout=10)
        except TimeoutError:
            stuck = await engine.get(run.run_id)
            pytest.fail(f"run never settled: still {stuck.status!r} after the stage raised")
        assert settled.status == "failed"
        assert settled.error is not None
        assert "CancelledError" in settled.error.type
        # and the engine keeps serving
        other = await engine.start(quoting, {"order": Order("pen", 1)}, timeout=SAFETY)
        assert other.status == "succeeded"


async def test_timeout_fails_the_stage_with_stage_timeout(db: Path) -> None:
    @ws.stage(timeout=0.05)
    async def hang() -> int:
        await anyio.Event().wait()
        return 1

    p = ws.Pipeline("hang", [hang])
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        run = await engine.start(p, timeout=SAFETY)
    assert run.status == "failed"
    assert run.error is not None
    assert run.error.type.endswith("StageTimeout")
    assert "hang" in run.error.message
    failed = [r for r in journal(db, run.run_id) if r[2] == "failed"]
    assert len(failed) == 1
    assert json.loads(failed[0][5])["type"].endswith("StageTimeout")


async def test_timed_out_attempt_is_retried(db: Path) -> None:
    attempts: list[int] = []

    @ws.stage(timeout=0.05, retry=ws.Retry(attempts=2))
    async def slow_then_fast(ctx: ws.StageContext) -> str:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            await anyio.Event().wait()
        return "fast"

    p = ws.Pipeline("slow-then-fast", [slow_then_fast])
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        run = await engine.start(p, timeout=SAFETY)
    assert run.status == "succeeded"
    assert run.output == "fast"
    assert attempts == [1, 2]
    retrying = [r for r in journal(db, run.run_id) if r[2] == "retrying"]
    assert len(retrying) == 1
    assert json.loads(retrying[0][5])["type"].endswith("StageTimeout")


async def test_sync_stage_timeout(db: Path) -> None:
    release = threading.Event()

    @ws.stage(timeout=0.05)
    def stuck() -> int:
        release.wait(SAFETY)
        return 1

    p = ws.Pipeline("stuck", [stuck])
    try:
        async with ws.Engine.open(db, pipelines=[p]) as engine:
            run = await engine.start(p, timeout=SAFETY)
    finally:
        release.set()
    assert run.status == "failed"
    assert run.error is not None and run.error.type.endswith("StageTimeout")


# -- when= ------------------------------------------------------------------------------------


async def test_when_false_skips_the_stage(db: Path) -> None:
    calls = 0

    @ws.stage(when=lambda order: order.qty >= 10)
    async def discount(order: Order, price: float) -> float:
        nonlocal calls
        calls += 1
        return price * 0.9

    @ws.stage
    async def total(price: float, discount: float | None) -> float:
        return discount if discount is not None else price

    p = ws.Pipeline("discounts", [price, discount, total])
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        small = await engine.start(p, {"order": Order("pen", 2)})
        big = await engine.start(p, {"order": Order("pen", 10)})
        history = await engine.history(small.run_id)
    assert calls == 1
    assert small.output == 5.0
    assert big.output == 22.5
    skipped = [t for t in history if t.stage_index == 1]
    assert [t.event for t in skipped] == ["started", "skipped"]
    assert skipped[1].payload is None
    assert not succeeded_rows(db, small.run_id, 1)
    assert len(succeeded_rows(db, big.run_id, 1)) == 1


async def test_skipped_last_stage_outputs_none(db: Path) -> None:
    @ws.stage(when=lambda price: price > 100)
    async def audit(price: float) -> str:
        return "audited"

    p = ws.Pipeline("skip-last", [price, audit])
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        run = await engine.start(p, {"order": Order("pen", 1)})
    assert run.status == "succeeded"
    assert run.output is None
    assert run_row(db, run.run_id)["output"] is None


# -- outputs ----------------------------------------------------------------------------------


async def test_return_annotation_is_enforced(db: Path) -> None:
    @ws.stage
    async def count(order: Order) -> int:
        return "three"  # type: ignore[return-value]

    p = ws.Pipeline("wrong-type", [count])
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        run = await engine.start(p, {"order": Order("pen", 3)})
    assert run.status == "failed"
    assert run.error is not None
    assert run.error.type.endswith("StageOutputError")
    message = run.error.message
    assert "count" in message
    assert "int" in message
    assert "str" in message
    assert not succeeded_rows(db, run.run_id, 0)
    assert run_row(db, run.run_id)["output"] is None


@pytest.mark.parametrize(
    ("returned", "expected", "actual"),
    [
        ({"item": "pen", "total": 1.0}, "Quote", "dict"),
        (Label("x", 1), "Quote", "Label"),
        (None, "Quote", "NoneType"),
    ],
    ids=["dict", "other-class", "none"],
)
async def test_struct_annotation_is_enforced(
    db: Path, returned: Any, expected: str, actual: str
) -> None:
    @ws.stage
    async def make_quote() -> Quote:
        return returned  # type: ignore[no-any-return]

    p = ws.Pipeline("wrong-struct", [make_quote])
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        run = await engine.start(p)
    assert run.status == "failed"
    assert run.error is not None
    assert "make_quote" in run.error.message
    assert expected in run.error.message
    assert actual in run.error.message
    assert not succeeded_rows(db, run.run_id, 0)


async def test_generic_annotation_is_enforced(db: Path) -> None:
    @ws.stage
    async def numbers() -> list[int]:
        return ["one", "two"]  # type: ignore[list-item]

    p = ws.Pipeline("wrong-generic", [numbers])
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        run = await engine.start(p)
    assert run.status == "failed"
    assert run.error is not None
    assert "numbers" in run.error.message
    assert "list[int]" in run.error.message
    assert not succeeded_rows(db, run.run_id, 0)


async def test_wrong_output_type_is_not_retried(db: Path) -> None:
    calls = 0

    @ws.stage(retry=ws.Retry(attempts=3))
    async def count() -> int:
        nonlocal calls
        calls += 1
        return "three"  # type: ignore[return-value]

    p = ws.Pipeline("wrong-type-retry", [count])
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        run = await engine.start(p)
    assert run.status == "failed"
    assert calls == 1


@pytest.mark.parametrize("returns", [int, Any], ids=["int", "any"])
async def test_an_output_nested_too_deeply_fails_the_stage_once(db: Path, returns: Any) -> None:
    """Annotated `int`, the mismatch's message took the repr of the list, which raised a
    bare RecursionError: it was retried as the stage's own failure, and recorded as such."""
    calls = 0

    async def deep() -> Any:
        nonlocal calls
        calls += 1
        return nested(100_000)

    deep.__annotations__["return"] = returns
    p = ws.Pipeline("deep-output", [ws.stage(retry=ws.Retry(attempts=3))(deep)])
    async with ws.Engine.open(db, pipelines=[p, quoting]) as engine:
        run = await engine.start(p, timeout=SAFETY)
        assert run.status == "failed"
        assert run.error is not None
        assert run.error.type.endswith("StageOutputError")
        assert "'deep'" in run.error.message and "nested too deeply" in run.error.message
        again = await engine.start(quoting, {"order": Order("pen", 2)}, timeout=SAFETY)
    assert calls == 1
    assert [row[2] for row in journal(db, run.run_id)] == ["created", "started", "failed"]
    assert run_row(db, run.run_id)["status"] == "failed"
    assert again.status == "succeeded"


async def test_an_output_too_large_for_a_row_fails_the_stage_once(
    db: Path, short_rows: int
) -> None:
    """SQLite refused the commit of an output past its maximum length (1e9 bytes by default,
    lowered here): the run was stranded and recovery ran the stage again, for ever. Now the
    stage fails with StageOutputError, and what was committed before it stays."""
    calls: list[str] = []

    @ws.stage
    async def small() -> str:
        calls.append("small")
        return "s" * 1000

    @ws.stage
    async def big(small: str) -> str:
        calls.append("big")
        return "x" * short_rows  # with its quotes, past the limit SQLite itself enforces

    @ws.stage
    async def after(big: str) -> int:
        calls.append("after")
        return len(big)

    p = ws.Pipeline("too-large", [small, big, after])
    async with ws.Engine.open(db, pipelines=[p, quoting], poll_interval=0.05) as engine:
        run = await engine.start(p, timeout=SAFETY)
        assert run.status == "failed"
        assert run.error is not None
        assert run.error.type.endswith("StageOutputError")
        assert run.error.stage_name == "big"
        assert f"{short_rows + 2:,} bytes" in run.error.message
        assert f"more than the {engine.store.max_payload:,}" in run.error.message
        assert engine.store.max_payload < short_rows
        again = await engine.start(quoting, {"order": Order("pen", 2)}, timeout=SAFETY)
    assert calls == ["small", "big"]
    assert again.status == "succeeded"
    rows = journal(db, run.run_id)
    assert [(row[1], row[2]) for row in rows] == [
        (None, "created"),
        (0, "started"),
        (0, "succeeded"),
        (1, "started"),
        (1, "failed"),
    ]
    assert json.loads(rows[2][4]) == "s" * 1000
    assert run_row(db, run.run_id)["status"] == "failed"


@pytest.mark.parametrize(
    ("make", "type_name"),
    [
        (lambda: object(), "object"),
        (lambda: {object(), object()}, "set"),
        (lambda: {"handle": object()}, "dict"),
        (lambda: float("nan"), "nan"),
    ],
    ids=["object", "set-of-objects", "dict-with-object", "nan"],
)
async def test_unserializable_output_fails_the_run_and_the_engine_keeps_serving(
    db: Path, make: Any, type_name: str
) -> None:
    release = anyio.Event()

    @ws.stage
    async def make_handle():  # type: ignore[no-untyped-def]
        return make()

    @ws.stage
    async def waiting(order: Order) -> int:
        await release.wait()
        return order.qty

    bad = ws.Pipeline("unserializable", [make_handle])
    good = ws.Pipeline("good", [waiting, price])
    async with ws.Engine.open(db, pipelines=[bad, good]) as engine:
        other = await engine.submit(good, {"order": Order("pen", 2)})
        run = await engine.start(bad, timeout=SAFETY)
        assert run.status == "failed"
        assert run.error is not None
        assert run.error.type.endswith("StageOutputError")
        assert "make_handle" in run.error.message
        assert type_name in run.error.message
        assert not succeeded_rows(db, run.run_id, 0)
        # the engine still serves: a run in flight finishes, a new one runs
        release.set()
        finished = await engine.wait(other.run_id, timeout=SAFETY)
        assert finished.status == "succeeded" and finished.output == 5.0
        again = await engine.start(good, {"order": Order("ink", 4)}, timeout=SAFETY)
        assert again.status == "succeeded" and again.output == 10.0
        failed = await engine.list(status="failed")
        assert [r.run_id for r in failed] == [run.run_id]


# -- resume values ----------------------------------------------------------------------------


class Reading(msgspec.Struct):
    value: float | None = None


@pytest.mark.parametrize(
    ("kind", "value"),
    [
        ("gate", Reading(value=math.nan)),
        ("gate", {"value": math.inf}),
        ("pause", {"v": -math.inf}),
        ("pause", [1.0, math.nan]),
    ],
    ids=["gate-struct-nan", "gate-dict-inf", "pause-minus-inf", "pause-list-nan"],
)
async def test_a_resume_value_holding_nan_or_infinity_is_refused(
    db: Path, kind: str, value: Any
) -> None:
    """JSON has no NaN or infinity and msgspec writes them as null: such an answer used to be
    committed as None (a gate's Reading(value=nan) went on as Reading(value=None))."""

    @ws.stage
    async def use(reading: Reading) -> float | None:
        return reading.value

    @ws.stage
    async def ask(ctx: ws.StageContext) -> Any:
        return await ctx.pause("num")

    pipelines = {
        "gate": (
            ws.Pipeline("nan-gate", [ws.gate("reading", schema=Reading), use]),
            {"value": 1.5},
        ),
        "pause": (ws.Pipeline("nan-pause", [ask]), 1.5),
    }
    p, good = pipelines[kind]
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        run = await engine.start(p)
        assert run.status == "paused"
        before = (run_row(db, run.run_id), journal(db, run.run_id))
        with pytest.raises(ws.InvalidResumeInput, match="NaN or infinity"):
            await engine.resume(run.run_id, value)
        assert (await engine.get(run.run_id)).status == "paused"
        assert (run_row(db, run.run_id), journal(db, run.run_id)) == before
        done = await engine.resume(run.run_id, good, timeout=SAFETY)
    assert done.status == "succeeded" and done.output == 1.5


@pytest.mark.parametrize(
    ("kind", "schema", "make", "good"),
    [
        ("gate", Any, lambda: nested(100_000), [1]),
        ("pause", Any, lambda: nested(1000), [1]),
        # encodes, but checking it against its JSON Schema (a generic type: no class to
        # decode into) recursed too deep
        ("pause", list[Node], lambda: [tree(400)], [Node()]),
    ],
    ids=["gate-100000", "pause-1000", "pause-schema-check"],
)
async def test_a_resume_value_nested_too_deeply_is_refused(
    db: Path, kind: str, schema: Any, make: Any, good: Any
) -> None:
    """Such an answer used to raise a bare RecursionError, not a WaystationError."""

    @ws.stage
    async def size(deep: list[Any]) -> int:
        return len(deep)

    @ws.stage
    async def ask(ctx: ws.StageContext) -> int:
        return len(await ctx.pause("deep", schema=schema))

    if kind == "gate":
        p = ws.Pipeline("deep-gate", [ws.gate("deep", schema=schema), size])
    else:
        p = ws.Pipeline("deep-pause", [ask])
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        run = await engine.start(p)
        assert run.status == "paused"
        before = (run_row(db, run.run_id), journal(db, run.run_id))
        with pytest.raises(ws.InvalidResumeInput, match="nested too deeply"):
            await engine.resume(run.run_id, make())
        assert (await engine.get(run.run_id)).status == "paused"
        assert (run_row(db, run.run_id), journal(db, run.run_id)) == before
        done = await engine.resume(run.run_id, good, timeout=SAFETY)
    assert done.status == "succeeded" and done.output == 1


# -- identity: idempotency keys and run ids ---------------------------------------------------


async def test_idempotency_key_returns_the_existing_run(db: Path) -> None:
    calls = 0

    @ws.stage
    async def once(order: Order) -> int:
        nonlocal calls
        calls += 1
        return order.qty

    p = ws.Pipeline("once", [once])
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        first = await engine.start(p, {"order": Order("pen", 1)}, idempotency_key="order-1")
        second = await engine.start(p, {"order": Order("pen", 1)}, idempotency_key="order-1")
        third = await engine.start(p, {"order": Order("ink", 9)}, idempotency_key="order-1")
        other = await engine.start(p, {"order": Order("pen", 1)}, idempotency_key="order-2")
        runs = await engine.list()
    assert first.run_id == second.run_id == third.run_id
    assert third.output == 1
    assert first.idempotency_key == "order-1"
    assert other.run_id != first.run_id
    assert calls == 2
    assert len(runs) == 2
    assert len([r for r in journal(db, first.run_id) if r[2] == "created"]) == 1


async def test_concurrent_starts_with_one_idempotency_key_create_one_run(db: Path) -> None:
    calls = 0

    @ws.stage
    async def once(order: Order) -> int:
        nonlocal calls
        calls += 1
        return order.qty

    p = ws.Pipeline("once-concurrent", [once])
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        runs = await asyncio.gather(
            *(engine.start(p, {"order": Order("pen", 1)}, idempotency_key="k") for _ in range(10))
        )
        listed = await engine.list()
    assert len({r.run_id for r in runs}) == 1
    assert all(r.status == "succeeded" for r in runs)
    assert calls == 1
    assert len(listed) == 1


async def test_idempotency_key_used_by_another_pipeline_is_refused(db: Path) -> None:
    other = ws.Pipeline("other-key", [price])
    async with ws.Engine.open(db, pipelines=[quoting, other]) as engine:
        await engine.start(quoting, {"order": Order("pen", 1)}, idempotency_key="k1")
        with pytest.raises(ws.RunAlreadyExists):
            await engine.start(other, {"order": Order("pen", 1)}, idempotency_key="k1")
        assert len(await engine.list()) == 1


async def test_explicit_run_id(db: Path) -> None:
    async with ws.Engine.open(db, pipelines=[quoting]) as engine:
        run = await engine.start(quoting, {"order": Order("pen", 1)}, run_id="order-42")
        assert run.run_id == "order-42"
        again = await engine.start(quoting, {"order": Order("pen", 1)}, run_id="order-42")
        assert again.run_id == "order-42"
        got = await engine.get("order-42")
        assert got.status == "succeeded"
        assert len(await engine.list()) == 1
        with pytest.raises(ws.InvalidInput):
            await engine.start(quoting, {"order": Order("pen", 1)}, run_id="has space")
    assert run_row(db, "order-42")["root_run_id"] == "order-42"
    assert len(succeeded_rows(db, "order-42", 0)) == 1


async def test_explicit_run_id_of_another_pipeline_is_refused(db: Path) -> None:
    other = ws.Pipeline("other", [price])
    async with ws.Engine.open(db, pipelines=[quoting, other]) as engine:
        await engine.start(quoting, {"order": Order("pen", 1)}, run_id="shared-id")
        with pytest.raises(ws.RunAlreadyExists):
            await engine.start(other, {"order": Order("pen", 1)}, run_id="shared-id")
        assert len(await engine.list()) == 1


async def test_generated_run_ids_are_unique(db: Path) -> None:
    async with ws.Engine.open(db, pipelines=[quoting]) as engine:
        runs = [await engine.submit(quoting, {"order": Order("pen", 1)}) for _ in range(50)]
        for r in runs:
            await engine.wait(r.run_id, timeout=SAFETY)
    assert len({r.run_id for r in runs}) == 50


# -- submit, wait, list, history --------------------------------------------------------------


async def test_submit_returns_at_once_and_wait_returns_the_finished_run(db: Path) -> None:
    entered = anyio.Event()
    release = anyio.Event()

    @ws.stage
    async def blocked(order: Order) -> int:
        entered.set()
        await release.wait()
        return order.qty

    p = ws.Pipeline("blocked", [blocked])
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        run = await engine.submit(p, {"order": Order("pen", 7)})
        assert run.status in ("pending", "running")
        assert not run.done
        with anyio.fail_after(SAFETY):
            await entered.wait()
        assert (await engine.get(run.run_id)).status == "running"
        assert run_row(db, run.run_id)["status"] == "running"
        release.set()
        done = await engine.wait(run.run_id, timeout=SAFETY)
    assert done.status == "succeeded"
    assert done.output == 7


async def test_list_filters_and_pages(db: Path) -> None:
    approval = ws.gate("approval", schema=Decision)
    gated = ws.Pipeline("gated", [price, approval])
    async with ws.Engine.open(db, pipelines=[quoting, gated]) as engine:
        done = [await engine.start(quoting, {"order": Order("pen", i)}) for i in range(3)]
        paused = [await engine.start(gated, {"order": Order("ink", i)}) for i in range(2)]
        assert {r.status for r in done} == {"succeeded"}
        assert {r.status for r in paused} == {"paused"}
        everything = await engine.list()
        by_status = await engine.list(status="paused")
        by_pipeline = await engine.list(pipeline="quoting")
        both = await engine.list(status="succeeded", pipeline="gated")
        page1 = await engine.list(limit=2)
        page2 = await engine.list(after=page1[-1].run_id, limit=2)
        page3 = await engine.list(after=page2[-1].run_id, limit=2)
        page4 = await engine.list(after=page3[-1].run_id, limit=2)
        iterated = [r.run_id async for r in engine.iter_runs(page=2)]
        iterated_paused = [r.run_id async for r in engine.iter_runs(status="paused", page=1)]
    all_ids = {r.run_id for r in done + paused}
    assert {r.run_id for r in everything} == all_ids
    assert [r.run_id for r in everything] == sorted(r.run_id for r in everything)
    assert {r.run_id for r in by_status} == {r.run_id for r in paused}
    assert {r.run_id for r in by_pipeline} == {r.run_id for r in done}
    assert both == []
    assert [len(page1), len(page2), len(page3), len(page4)] == [2, 2, 1, 0]
    paged = [r.run_id for r in page1 + page2 + page3]
    assert paged == [r.run_id for r in everything]
    assert iterated == paged
    assert sorted(iterated_paused) == sorted(r.run_id for r in paused)


async def test_list_is_in_creation_order(db: Path) -> None:
    # Engine.list documents "runs in creation order" and pages by run id, so generated run
    # ids must sort in the order runs were created, also for runs created in one millisecond.
    async with ws.Engine.open(db, pipelines=[quoting]) as engine:
        created = [
            (await engine.submit(quoting, {"order": Order("pen", i)})).run_id for i in range(300)
        ]
        for run_id in created:
            await engine.wait(run_id, timeout=SAFETY)
        listed = [r.run_id for r in await engine.list(limit=1000)]
    assert listed == created


async def test_history_is_the_ordered_journal(db: Path) -> None:
    async with ws.Engine.open(db, pipelines=[quoting]) as engine:
        run = await engine.start(quoting, {"order": Order("pen", 2)})
        history = await engine.history(run.run_id)
    assert [(t.event, t.stage_index) for t in history] == [
        ("created", None),
        ("started", 0),
        ("succeeded", 0),
        ("started", 1),
        ("succeeded", 1),
        ("completed", 2),
    ]
    assert [t.seq for t in history] == list(range(1, len(history) + 1))
    assert all(t.run_id == run.run_id for t in history)
    assert [t.at for t in history] == sorted(t.at for t in history)
    assert history[2].payload == 5.0
    assert history[4].payload == {"item": "pen", "total": 5.0}
    assert history[2].stage_path == "price"
    assert history[4].stage_path == "quote"
    # the same rows on disk; the run row's seq is the journal's tail
    assert [r[2] for r in journal(db, run.run_id)] == [t.event for t in history]
    assert run_row(db, run.run_id)["seq"] == len(history)


async def test_each_stage_output_is_stored_once(db: Path) -> None:
    async with ws.Engine.open(db, pipelines=[quoting]) as engine:
        run = await engine.start(quoting, {"order": Order("pen", 2)})
    # The `created` row carries the pipeline's shape (for PipelineChanged messages), not data.
    payloads = [r[4] for r in journal(db, run.run_id) if r[4] is not None and r[2] != "created"]
    assert len(payloads) == 2


# -- cancel -----------------------------------------------------------------------------------


async def test_cancel_a_paused_run(db: Path) -> None:
    after_gate = 0

    @ws.stage
    async def pay(approval: Decision) -> str:
        nonlocal after_gate
        after_gate += 1
        return "paid"

    p = ws.Pipeline("cancel-paused", [price, ws.gate("approval", schema=Decision), pay])
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        run = await engine.start(p, {"order": Order("pen", 1)})
        assert run.status == "paused"
        cancelled = await engine.cancel(run.run_id)
        assert cancelled.status == "cancelled"
        assert cancelled.done
        assert cancelled.pause is None
        assert (await engine.get(run.run_id)).status == "cancelled"
        history = await engine.history(run.run_id)
        with pytest.raises(ws.NotPaused):
            await engine.resume(run.run_id, {"approved": True, "by": "ann"})
        with pytest.raises(ws.InvalidRunState):
            await engine.cancel(run.run_id)
    assert history[-1].event == "cancelled"
    assert after_gate == 0
    row = run_row(db, run.run_id)
    assert row["status"] == "cancelled"
    assert row["pause"] is None
    assert journal(db, run.run_id)[-1][2] == "cancelled"


async def test_cancel_a_running_run(db: Path) -> None:
    entered = anyio.Event()
    interrupted = anyio.Event()
    later = 0

    @ws.stage
    async def forever(order: Order) -> int:
        entered.set()
        try:
            await anyio.Event().wait()
        finally:
            interrupted.set()
        return 0

    @ws.stage
    async def after(forever: int) -> int:
        nonlocal later
        later += 1
        return 1

    p = ws.Pipeline("cancel-running", [price, forever, after])
    async with ws.Engine.open(db, pipelines=[p, quoting]) as engine:
        run = await engine.submit(p, {"order": Order("pen", 1)})
        waiter = asyncio.create_task(engine.wait(run.run_id, timeout=SAFETY))
        with anyio.fail_after(SAFETY):
            await entered.wait()
        with anyio.fail_after(SAFETY):
            cancelled = await engine.cancel(run.run_id)
        waited = await waiter
        assert interrupted.is_set()
        assert cancelled.status == "cancelled"
        assert waited.status == "cancelled"
        assert (await engine.get(run.run_id)).status == "cancelled"
        # the engine keeps serving
        other = await engine.start(quoting, {"order": Order("pen", 1)}, timeout=SAFETY)
        assert other.status == "succeeded"
    assert later == 0
    rows = journal(db, run.run_id)
    assert rows[-1][2] == "cancelled"
    assert rows[-1][1] == 1
    assert not succeeded_rows(db, run.run_id, 1)
    row = run_row(db, run.run_id)
    assert row["status"] == "cancelled"
    assert row["lease_owner"] is None


async def test_cancel_a_running_sync_stage(db: Path) -> None:
    entered = anyio.Event()
    release = threading.Event()

    @ws.stage
    def blocking() -> int:
        anyio.from_thread.run_sync(entered.set)
        release.wait(SAFETY)
        return 1

    p = ws.Pipeline("cancel-sync", [blocking])
    try:
        async with ws.Engine.open(db, pipelines=[p]) as engine:
            run = await engine.submit(p)
            with anyio.fail_after(SAFETY):
                await entered.wait()
            with anyio.fail_after(SAFETY):
                cancelled = await engine.cancel(run.run_id)
    finally:
        release.set()
    assert cancelled.status == "cancelled"
    assert journal(db, run.run_id)[-1][2] == "cancelled"
    assert not succeeded_rows(db, run.run_id, 0)


async def test_closing_mid_stage_then_reopening_continues_the_run(db: Path) -> None:
    entered = anyio.Event()
    calls: dict[str, int] = {"first": 0, "second": 0, "third": 0}

    @ws.stage
    async def first(n: int) -> int:
        calls["first"] += 1
        return n + 1

    @ws.stage
    async def second(first: int) -> int:
        calls["second"] += 1
        if calls["second"] == 1:
            entered.set()
            await anyio.Event().wait()  # interrupted by close()
        return first + 1

    @ws.stage
    async def third(second: int) -> int:
        calls["third"] += 1
        return second + 1

    p = ws.Pipeline("close-reopen", [first, second, third])
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        run = await engine.submit(p, {"n": 1})
        with anyio.fail_after(SAFETY):
            await entered.wait()
    assert run_row(db, run.run_id)["status"] == "running"
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        done = await engine.wait(run.run_id, timeout=SAFETY)
    assert done.status == "succeeded"
    assert done.output == 4
    assert calls == {"first": 1, "second": 2, "third": 1}
    for i in range(3):
        assert len(succeeded_rows(db, run.run_id, i)) == 1


async def test_cancel_unknown_run(db: Path) -> None:
    async with ws.Engine.open(db, pipelines=[quoting]) as engine:
        with pytest.raises(ws.RunNotFound):
            await engine.cancel("no-such-run")


# -- a cancel that arrives while a stage's commit is in flight ------------------------------


def cancel_soon(engine: ws.Engine, run_id: str, cancels: list[asyncio.Task[ws.Run]]) -> None:
    """Ask to cancel `run_id` in the event loop's next pass: called by a stage as its last
    act, the cancel lands while the driver awaits the commit of that stage."""
    cancels.append(asyncio.get_running_loop().create_task(engine.cancel(run_id)))


@pytest.mark.parametrize("how", ["started", "resumed"])
async def test_a_cancel_during_a_stage_commit_is_journaled_where_the_commit_left_the_run(
    db: Path, how: str
) -> None:
    """The commit was already with the writer: it applies, and the `cancelled` row follows it
    at the next stage (not at the stage whose `succeeded` row precedes it), so that a retry
    continues after the committed stage instead of repeating it."""
    calls: list[str] = []
    cancels: list[asyncio.Task[ws.Run]] = []
    engine_box: list[ws.Engine] = []

    @ws.stage
    async def a(n: int) -> int:
        calls.append("a")
        return n + 1

    @ws.stage
    async def b(a: int, ctx: ws.StageContext) -> int:
        calls.append("b")
        if len(calls) == 2:  # the first time only
            cancel_soon(engine_box[0], ctx.run_id, cancels)
        return a + 1

    @ws.stage
    async def c(b: int) -> int:
        calls.append("c")
        return b + 1

    stages: list[Any] = [a, b, c]
    if how == "resumed":
        stages.insert(1, ws.gate("ok", schema=bool))
    p = ws.Pipeline(f"cancel-in-commit-{how}", stages)
    b_at = stages.index(b)
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        engine_box.append(engine)
        with anyio.fail_after(SAFETY):
            run = await engine.start(p, {"n": 1})
            if how == "resumed":
                assert run.status == "paused"
                run = await engine.resume(run.run_id, True)
            seen = await cancels[0]
        assert run.status == "cancelled" and seen.status == "cancelled"
        assert calls == ["a", "b"]
        rows = journal(db, run.run_id)
        assert (rows[-1][2], rows[-1][1]) == ("cancelled", b_at + 1)
        assert max(r[1] for r in rows if r[2] == "succeeded") == b_at
        assert run_row(db, run.run_id)["stage_index"] == b_at + 1
        with anyio.fail_after(SAFETY):
            retried = await engine.retry(run.run_id)
    assert retried.status == "succeeded" and retried.output == 4
    assert calls == ["a", "b", "c"]
    assert len(succeeded_rows(db, run.run_id, b_at)) == 1


async def test_a_cancel_during_the_last_commit_finds_the_run_succeeded(db: Path) -> None:
    cancels: list[asyncio.Task[ws.Run]] = []
    engine_box: list[ws.Engine] = []

    workspaces: list[Path] = []

    @ws.stage
    async def only(ctx: ws.StageContext) -> int:
        workspaces.append(ctx.workspace)
        (ctx.workspace / "scratch.txt").write_text("x")
        cancel_soon(engine_box[0], ctx.run_id, cancels)
        return 1

    p = ws.Pipeline("cancel-in-last-commit", [only])
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        engine_box.append(engine)
        with anyio.fail_after(SAFETY):
            run = await engine.start(p)
            seen = await cancels[0]
    assert run.status == "succeeded" and seen.status == "succeeded"
    assert [r[2] for r in journal(db, run.run_id)][-2:] == ["succeeded", "completed"]
    assert not workspaces[0].exists()  # removed on success, as without the cancel


async def test_a_cancel_during_a_pause_commit_cancels_the_paused_run(db: Path) -> None:
    """The pause was committed first: the run is paused, and the cancel asked for still
    applies to it (a paused run can be cancelled) instead of being dropped."""
    cancels: list[asyncio.Task[ws.Run]] = []
    engine_box: list[ws.Engine] = []

    @ws.stage
    async def ask(ctx: ws.StageContext) -> str:
        cancel_soon(engine_box[0], ctx.run_id, cancels)
        return await ctx.pause("name", schema=str)

    p = ws.Pipeline("cancel-in-pause-commit", [ask])
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        engine_box.append(engine)
        with anyio.fail_after(SAFETY):
            run = await engine.start(p)
            seen = await cancels[0]
            final = await engine.get(run.run_id)
    assert seen.status == "cancelled" and final.status == "cancelled"
    row = run_row(db, run.run_id)
    assert row["status"] == "cancelled" and row["pause"] is None
    assert journal(db, run.run_id)[-1][2] == "cancelled"


async def test_a_cancel_reaching_a_recovery_that_has_not_claimed_the_run_is_kept(
    db: Path,
) -> None:
    """The engine is about to recover an abandoned run: its driver waits for a slot and has
    not taken the lease. The cancel must not be lost with that driver: the run is marked,
    and the claim that follows cancels it instead of running its stage again."""
    calls: list[str] = []
    entered = anyio.Event()
    release = anyio.Event()

    @ws.stage
    async def work(n: int) -> int:
        calls.append("work")
        if len(calls) == 1:
            entered.set()
            await anyio.Event().wait()  # interrupted by close: the run is left running
        return n

    @ws.stage
    async def hold() -> int:
        await release.wait()
        return 0

    worker = ws.Pipeline("abandoned", [work])
    holder = ws.Pipeline("holder", [hold])
    first_owner = await ws.Engine.open(db, pipelines=[worker])
    run = await first_owner.submit(worker, {"n": 1})
    with anyio.fail_after(SAFETY):
        await entered.wait()
        await first_owner.close(grace=0.1)
    with closing(sqlite3.connect(db)) as conn, conn:  # as if its owner had died
        conn.execute(
            "UPDATE runs SET lease_owner = 'elsewhere:1:feedface', lease_expires = 1.0 "
            "WHERE run_id = ?",
            (run.run_id,),
        )
    async with ws.Engine.open(
        db, pipelines=[worker, holder], recover=False, max_concurrent_runs=1
    ) as engine:
        busy = await engine.submit(holder)
        assert await engine.recover() == 1  # its driver now waits for the only slot
        with anyio.fail_after(SAFETY):
            marked = await engine.cancel(run.run_id)
        assert marked.status == "cancelled" or marked.cancel_requested
        release.set()
        with anyio.fail_after(SAFETY):
            assert (await engine.wait(busy.run_id)).status == "succeeded"
            await engine.recover()
            final = await engine.wait(run.run_id)
    assert final.status == "cancelled"
    assert calls == ["work"]  # not run again
    assert journal(db, run.run_id)[-1][2] == "cancelled"


async def test_a_cancel_from_another_engine_as_the_run_pauses(db: Path) -> None:
    """Engine B reads the run running on engine A, and marks it for cancel just after A
    has paused it (so the mark, meant for a running run, does not apply): B must then
    cancel the paused run itself, not report the cancel as made and leave it paused."""
    release = anyio.Event()

    @ws.stage
    async def first() -> int:
        await release.wait()
        return 1

    p = ws.Pipeline("pausing-elsewhere", [first, ws.gate("ok", schema=bool)])
    async with (
        ws.Engine.open(db, pipelines=[p]) as a,
        ws.Engine.open(db, pipelines=[p]) as b,
    ):
        run = await a.submit(p)
        update_run = b.store.update_run

        async def mark_late(run_id: str, guard: Any, rows: Any, values: Any = None) -> Any:
            if values == {"cancel_requested": 1}:  # the run, as B read it, was running
                release.set()
                assert (await a.wait(run_id)).status == "paused"
            return await update_run(run_id, guard, rows, values)

        b.store.update_run = mark_late  # type: ignore[method-assign]
        with anyio.fail_after(SAFETY):
            cancelled = await b.cancel(run.run_id)
        assert cancelled.status == "cancelled"
        assert (await a.get(run.run_id)).status == "cancelled"
    assert journal(db, run.run_id)[-1][2] == "cancelled"


async def test_a_long_stage_is_interrupted_by_a_cancel_from_another_process(db: Path) -> None:
    """Engine B (a web handler, the CLI) can only mark a run engine A drives. A long stage
    must not put the cancel off until it ends: A interrupts it within its poll interval,
    and the run ends cancelled at that stage."""
    entered = anyio.Event()
    interrupted = anyio.Event()

    @ws.stage
    async def long_job() -> int:
        entered.set()
        try:
            await anyio.sleep(3600)
        finally:
            interrupted.set()
        return 1

    p = ws.Pipeline("long-job", [long_job])
    async with (
        ws.Engine.open(db, pipelines=[p], poll_interval=0.05) as a,
        ws.Engine.open(db, pipelines=[p]) as b,
    ):
        run = await a.submit(p)
        with anyio.fail_after(SAFETY):
            await entered.wait()
            marked = await b.cancel(run.run_id)
            assert marked.status == "running" and marked.cancel_requested
            await interrupted.wait()
            final = await a.wait(run.run_id)
    assert final.status == "cancelled"
    assert [(r[2], r[1]) for r in journal(db, run.run_id)][-1] == ("cancelled", 0)


# -- many runs --------------------------------------------------------------------------------


@ws.stage
async def step1(n: int) -> int:
    await anyio.lowlevel.checkpoint()
    return n + 1


@ws.stage
async def step2(step1: int) -> int:
    await anyio.lowlevel.checkpoint()
    return step1 + 1


@ws.stage
def step3(step2: int) -> int:
    return step2 + 1


@ws.stage
async def step4(step3: int, ctx: ws.StageContext) -> int:
    assert ctx.results["step1"] + 2 == step3
    return step3 + 1


@ws.stage
async def step5(step4: int, n: int) -> int:
    assert step4 == n + 4
    return step4 + 1


async def test_many_concurrent_runs(db: Path) -> None:
    p = ws.Pipeline("many", [step1, step2, step3, step4, step5])
    n_runs = 200
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        with anyio.fail_after(120):
            runs = await asyncio.gather(*(engine.start(p, {"n": i}) for i in range(n_runs)))
        assert len(await engine.list(status="succeeded", limit=1000)) == n_runs
    assert [r.status for r in runs] == ["succeeded"] * n_runs
    assert [r.output for r in runs] == [i + 5 for i in range(n_runs)]
    assert len({r.run_id for r in runs}) == n_runs
    with closing(sqlite3.connect(db)) as conn:
        counts = conn.execute(
            "SELECT run_id, stage_index, COUNT(*) FROM journal WHERE event = 'succeeded' "
            "GROUP BY run_id, stage_index"
        ).fetchall()
        bad = conn.execute(
            "SELECT COUNT(*) FROM journal WHERE event IN ('failed', 'retrying', 'recovered')"
        ).fetchone()[0]
        statuses = conn.execute("SELECT status, COUNT(*) FROM runs GROUP BY status").fetchall()
    assert len(counts) == n_runs * 5
    assert {c for _, _, c in counts} == {1}
    assert {i for _, i, _ in counts} == {0, 1, 2, 3, 4}
    assert bad == 0
    assert statuses == [("succeeded", n_runs)]


async def test_wait_returns_the_row_as_committed(db: Path) -> None:
    """`start` and `wait` hand back the settled run without reading it again; what they
    return must be exactly what `get` reads from the file afterwards, on every way a run
    settles (finished fresh, failed, paused, finished after a resume)."""

    @ws.stage
    async def price(order: Order) -> Quote:
        return Quote(item=order.item, total=2.5 * order.qty)

    @ws.stage
    async def check(price: Quote) -> float:
        if price.total > 100:
            raise ValueError("too expensive")
        return price.total

    approve = ws.gate("approve", schema=Decision)
    plain = ws.Pipeline("priced", [price, check])
    gated = ws.Pipeline("gated", [price, approve, check])
    async with ws.Engine.open(db, pipelines=[plain, gated]) as engine:
        with anyio.fail_after(SAFETY):
            done = await engine.start(plain, {"order": Order("tea", 2)})
            assert done.status == "succeeded" and done.output == 5.0
            assert done == await engine.get(done.run_id)
            failed = await engine.start(plain, {"order": Order("tea", 99)})
            assert failed.status == "failed" and failed.error is not None
            assert failed == await engine.get(failed.run_id)
            paused = await engine.start(gated, {"order": Order("tea", 1)})
            assert paused.status == "paused"
            assert paused == await engine.get(paused.run_id)
            resumed = await engine.resume(paused.run_id, Decision(approved=True, by="ann"))
            waited = await engine.wait(resumed.run_id)
            assert waited.status == "succeeded" and waited.output == 2.5
            assert waited == await engine.get(waited.run_id)


async def test_a_run_snapshot_carries_each_column_in_its_own_field(db: Path) -> None:
    """`Run` is built positionally (fast): each field must hold its own column of the row
    as stored, for a child (parent, root, kind, depth set) and a root run (idempotency key)."""

    @ws.stage
    async def leaf(n: int) -> int:
        return n + 1

    inner = ws.Pipeline("inner", [leaf], version="3")

    @ws.stage
    async def outer(n: int, ctx: ws.StageContext) -> int:
        child = await ctx.run_child(inner, {"n": n})
        assert isinstance(child, int)
        return child

    top = ws.Pipeline("top", [outer], version="2")
    async with ws.Engine.open(db, pipelines=[top, inner]) as engine:
        with anyio.fail_after(SAFETY):
            done = await engine.start(top, {"n": 1}, idempotency_key="key-1")
            (child_row,) = [r async for r in engine.iter_runs() if r.run_id != done.run_id]
        for run in (done, child_row):
            rec = await engine.store.get_run(run.run_id)
            assert rec is not None
            assert (run.run_id, run.pipeline, run.pipeline_version, run.status) == (
                rec.run_id,
                rec.pipeline,
                rec.pipeline_version,
                rec.status,
            )
            assert (run.stage_index, run.stage_name, run.fingerprint) == (1, None, rec.fingerprint)
            assert (run.parent_run_id, run.root_run_id, run.run_kind, run.depth) == (
                rec.parent_run_id,
                rec.root_run_id,
                rec.run_kind,
                rec.depth,
            )
            assert (run.idempotency_key, run.replay_of, run.cancel_requested) == (
                rec.idempotency_key,
                None,
                False,
            )
            assert run.created_at.timestamp() == pytest.approx(rec.created_at, abs=1e-5)
            assert run.updated_at.timestamp() == pytest.approx(rec.updated_at, abs=1e-5)
            assert run.error is None and run.pause is None and run.pauses == []
        assert (done.input, done.output, done.idempotency_key) == ({"n": 1}, 2, "key-1")
        assert (child_row.input, child_row.output) == ({"n": 1}, 2)
        assert child_row.parent_run_id == done.run_id and child_row.depth == 1
        assert child_row.root_run_id == done.run_id and child_row.run_kind != "root"
        assert child_row.pipeline_version == "3" and done.pipeline_version == "2"
        assert done.created_at < done.updated_at


async def test_a_failed_commit_of_a_stage_strands_the_run_and_it_is_retried(db: Path) -> None:
    """The database refuses the commit of stage b's success once (a full disk, say): the
    stage did not fail, so the run is left to be retried (b runs again) and succeeds; it is
    never recorded as failed."""
    calls: list[str] = []

    @ws.stage
    async def a() -> int:
        calls.append("a")
        return 1

    @ws.stage
    async def b(a: int) -> int:
        calls.append("b")
        return a + 1

    @ws.stage
    async def c(b: int) -> int:
        calls.append("c")
        return b + 1

    refused: list[str] = []

    def refuse(transitions: Any) -> bool:
        hit = not refused and any(
            t.event == "succeeded" and t.stage_index == 1 for t in transitions
        )
        if hit:
            refused.append("b")
        return hit

    p = ws.Pipeline("refused", [a, b, c])
    async with ws.Engine.open(db, pipelines=[p], poll_interval=0.05) as engine:
        store = engine.store
        step_run, update_run = store.step_run, store.update_run

        def failing_step(run_id: str, owner: str, seq: int, i: int, transitions: Any) -> Any:
            if refuse(transitions):
                raise ws.StoreError("database write failed: OperationalError: disk is full")
            return step_run(run_id, owner, seq, i, transitions)

        async def failing_update(
            run_id: str, guard: Any, transitions: Any, values: Any = None
        ) -> Any:
            if refuse(transitions):
                raise ws.StoreError("database write failed: OperationalError: disk is full")
            return await update_run(run_id, guard, transitions, values)

        store.step_run = failing_step  # type: ignore[method-assign]
        store.update_run = failing_update  # type: ignore[method-assign]
        with anyio.fail_after(SAFETY):
            run = await engine.submit(p)
            final = await engine.wait(run.run_id)
    assert refused == ["b"]
    assert final.status == "succeeded" and final.output == 3
    assert calls == ["a", "b", "b", "c"]
    events = [row[2] for row in journal(db, run.run_id)]
    assert "failed" not in events and events.count("succeeded") == 3


async def test_cancel_right_after_submit_runs_no_stage(db: Path) -> None:
    effects: list[str] = []

    @ws.stage
    async def charge() -> int:
        effects.append("charged")  # before any await: nothing stops it once it is called
        return 1

    @ws.stage
    async def ship(charge: int) -> int:
        effects.append("shipped")
        return 2

    p = ws.Pipeline("cancelled-early", [charge, ship])
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        with anyio.fail_after(SAFETY):
            run = await engine.submit(p)
            cancelled = await engine.cancel(run.run_id)
    assert cancelled.status == "cancelled" and effects == []
    assert [(row[2], row[1]) for row in journal(db, run.run_id)] == [
        ("created", None),
        ("started", 0),
        ("cancelled", 0),
    ]


async def test_close_stops_a_stage_that_swallows_the_first_cancellation(db: Path) -> None:
    """A stage that catches the cancellation and awaits again is cancelled again: close
    returns after its grace period and the run is left running for recovery."""
    effects: list[str] = []
    entered = asyncio.Event()

    @ws.stage
    async def stubborn() -> int:
        entered.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            effects.append("swallowed")  # a library that tidies up and carries on
        await asyncio.sleep(60)
        effects.append("finished")
        return 1

    p = ws.Pipeline("stubborn", [stubborn])
    engine = await ws.Engine.open(db, pipelines=[p])
    with anyio.fail_after(SAFETY):  # before the fix close waited the full 120 s
        run = await engine.submit(p)
        await entered.wait()
        await engine.close(grace=0.1)
    assert effects == ["swallowed"]
    with closing(sqlite3.connect(db)) as conn:
        status, owner = conn.execute(
            "SELECT status, lease_owner FROM runs WHERE run_id = ?", (run.run_id,)
        ).fetchone()
    assert (status, owner) == ("running", None)  # left for the next engine to recover


# -- a caller cancelled while its commit is with the writer ----------------------------------


class HoldAfterCommit(ws.SQLiteStore):
    """A store that, when asked, keeps the caller of a write waiting after the write has
    committed: a caller cancelled there (a dropped web request, `asyncio.wait_for`) has
    its commit applied, and never sees it."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.hold = False
        self.committed = asyncio.Event()

    async def _held(self, result: Any) -> Any:
        if self.hold:
            self.hold = False
            self.committed.set()
            await asyncio.Event().wait()  # until the caller is cancelled
        return result

    async def create_run(self, run: Any) -> Any:
        return await self._held(await super().create_run(run))

    async def update_run(self, *args: Any, **kwargs: Any) -> Any:
        return await self._held(await super().update_run(*args, **kwargs))


@pytest.mark.parametrize("call", ["submit", "resume", "retry"])
async def test_a_run_whose_caller_was_cancelled_mid_commit_is_still_driven(
    db: Path, call: str
) -> None:
    """Before, the run stayed `running` under the engine's lease, which the engine renewed
    for ever, with no driver: stuck until the process ended."""
    tries: list[int] = []

    @ws.stage
    async def once_failing(approve: bool) -> str:
        tries.append(1)
        if call == "retry" and len(tries) == 1:
            raise ValueError("down the first time")
        return f"approved {approve}"

    p = ws.Pipeline("held", [ws.gate("approve", schema=bool), once_failing])
    store = HoldAfterCommit(db)
    async with ws.Engine.open(store, pipelines=[p], poll_interval=0.05) as engine:
        with anyio.fail_after(SAFETY):
            if call != "submit":
                paused = await engine.start(p)
                if call == "retry":
                    failed = await engine.resume(paused.run_id, True)
                    assert failed.status == "failed"
            store.hold = True
            if call == "submit":
                caller = asyncio.ensure_future(engine.submit(p))
            elif call == "resume":
                caller = asyncio.ensure_future(engine.resume(paused.run_id, True))
            else:
                caller = asyncio.ensure_future(engine.retry(paused.run_id))
            await store.committed.wait()
            caller.cancel()
            with pytest.raises(asyncio.CancelledError):
                await caller
            (run,) = await engine.list()
            if call == "submit":  # it runs to its gate
                done = await engine.wait(run.run_id)
                assert done.status == "paused"
            else:
                done = await engine.wait(run.run_id)
                assert done.status == "succeeded" and done.output == "approved True"


async def test_a_stage_error_that_cannot_be_printed_fails_the_run(db: Path) -> None:
    """An exception whose own `__str__` raises: before, its failure could not be recorded,
    the driver stopped, and the run stayed `running` while the stage ran again and again."""
    calls: list[int] = []

    class ApiError(Exception):
        def __init__(self, response: dict[str, Any]) -> None:
            super().__init__()
            self.response = response

        def __str__(self) -> str:
            return f"API said {self.response['error']}"  # no 'error' key: KeyError

    @ws.stage
    async def call_api() -> str:
        calls.append(1)
        raise ApiError({"status": 500})

    p = ws.Pipeline("unprintable", [call_api])
    async with ws.Engine.open(db, pipelines=[p], poll_interval=0.05) as engine:
        with anyio.fail_after(SAFETY):
            run = await engine.start(p)
    assert run.status == "failed" and run.error is not None
    assert run.error.type.endswith("ApiError") and "KeyError" in run.error.message
    assert calls == [1]
    assert run_row(db, run.run_id)["status"] == "failed"


class FailsABranchCommit(ws.SQLiteStore):
    """A store whose commit of one parallel branch's result fails once, as a write fails
    when another process holds the lock past the busy timeout."""

    def __init__(self, path: Path, branch: str) -> None:
        super().__init__(path)
        self.branch = branch
        self.failed = False

    async def update_run(
        self, run_id: str, guard: Any, transitions: Any, values: Any = None
    ) -> Any:
        if not self.failed and any(
            t.event == "succeeded" and t.stage_path == self.branch for t in transitions
        ):
            self.failed = True
            raise ws.StoreError("database write failed: OperationalError: database is locked")
        return await super().update_run(run_id, guard, transitions, values)


async def test_a_failed_branch_commit_leaves_the_run_to_be_retried(db: Path) -> None:
    """Before, a store error on a branch's commit failed the whole run for good (a saga's
    completed work would have been undone), where the same error on a plain stage's commit
    leaves the run running, for recovery to continue."""
    ran: list[str] = []

    @ws.stage
    async def left() -> str:
        ran.append("left")
        return "l"

    @ws.stage
    async def right() -> str:
        ran.append("right")
        return "r"

    p = ws.Pipeline("branch-commit", [ws.parallel(left, right, name="grp")])
    store = FailsABranchCommit(db, "grp.left")
    async with ws.Engine.open(store, pipelines=[p], poll_interval=0.05) as engine:
        with anyio.fail_after(SAFETY):
            run = await engine.submit(p)
            done = await engine.wait(run.run_id)
    assert store.failed
    assert done.status == "succeeded" and done.output == {"left": "l", "right": "r"}
    assert ran.count("left") == 2  # at least once: its result was not committed the first time
    assert "failed" not in [row[2] for row in journal(db, run.run_id)]


# -- replay -----------------------------------------------------------------------------------


def run_count(db: Path) -> int:
    with closing(sqlite3.connect(db)) as conn:
        count: int = conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
    return count


async def test_replay_refuses_to_start_after_a_stage_that_left_no_result(db: Path) -> None:
    """The run failed at `price`: a replay from `charge` had nothing to reuse for it, and
    (before) called `charge` with None for its price and succeeded. Refused, naming the
    stage and where a replay may start, with nothing written; from `price` it runs."""
    down = [True]

    @ws.stage
    async def load() -> int:
        return 10

    @ws.stage
    async def price(load: int) -> float:
        if down[0]:
            raise RuntimeError("pricing service down")
        return load * 1.5

    @ws.stage
    async def charge(price: float) -> str:
        return f"charged {price!r}"

    p = ws.Pipeline("replay-past-failure", [load, price, charge])
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        run = await engine.start(p)
        assert run.status == "failed" and run.stage_name == "price"
        rows = journal(db, run.run_id)
        for from_stage in ("charge", 2):
            with pytest.raises(ws.InvalidInput, match=r"'price'.*'load', 'price'"):
                await engine.replay(run.run_id, from_stage=from_stage)
        assert run_count(db) == 1 and journal(db, run.run_id) == rows
        down[0] = False
        again = await engine.replay(run.run_id, from_stage="price")
    assert again.status == "succeeded" and again.output == "charged 15.0"
    assert [(r[2], r[1]) for r in journal(db, again.run_id)][:3] == [
        ("created", None),
        ("reused", 0),
        ("started", 1),
    ]


async def test_replay_after_a_group_needs_a_result_of_each_branch(db: Path) -> None:
    """A group whose `rate` branch failed after `tax` succeeded has no result: a replay
    from the stage after it is refused (it would have had None for `rate`), one from the
    group itself runs it again."""
    down = [True]

    @ws.stage
    async def load() -> int:
        return 10

    @ws.stage
    async def tax(load: int) -> float:
        return load * 0.5

    @ws.stage
    async def rate(load: int) -> float:
        if down[0]:
            raise RuntimeError("rates service down")
        return load * 1.5

    @ws.stage
    async def charge(tax: float, rate: float) -> str:
        return f"charged {tax!r} + {rate!r}"

    quote = ws.parallel(tax, rate, on_error="wait_for_all", name="quote")
    p = ws.Pipeline("replay-past-group", [load, quote, charge])
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        run = await engine.start(p)
        assert run.status == "failed" and run.stage_name == "quote"
        assert ("succeeded", 1) in [(r[2], r[1]) for r in journal(db, run.run_id)]  # tax's
        with pytest.raises(ws.InvalidInput, match=r"'quote'.*'load', 'quote'"):
            await engine.replay(run.run_id, from_stage="charge")
        assert run_count(db) == 1
        down[0] = False
        again = await engine.replay(run.run_id, from_stage="quote")
    assert again.status == "succeeded" and again.output == "charged 5.0 + 15.0"


# -- a gate as the last stage -----------------------------------------------------------------


@pytest.mark.parametrize("policy", ["remove_on_success", "keep"])
async def test_answering_a_last_stage_gate_removes_the_roots_workspace(
    db: Path, tmp_path: Path, policy: Literal["keep", "remove_on_success"]
) -> None:
    """`resume` finishes such a run in its own commit, with no driver after it: before,
    the clean-up that follows a driven run never came, and the workspace stayed."""
    workspaces: list[Path] = []

    @ws.stage
    async def draft(ctx: ws.StageContext) -> int:
        workspaces.append(ctx.workspace)
        (ctx.workspace / "draft.txt").write_text("x")
        return 1

    p = ws.Pipeline("last-gate", [draft, ws.gate("approve", schema=bool)])
    async with ws.Engine.open(
        db, pipelines=[p], workspace_root=tmp_path / "spaces", workspace_policy=policy
    ) as engine:
        run = await engine.start(p)
        assert run.status == "paused" and (workspaces[0] / "draft.txt").exists()
        done = await engine.resume(run.run_id, True)
        assert done.status == "succeeded" and done.output is True
        assert run_row(db, run.run_id)["status"] == "succeeded"
        assert workspaces[0].exists() == (policy == "keep")
