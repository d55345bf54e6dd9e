"""Pausing: gates, `ctx.pause` (once and twice in one stage), resuming in a reopened engine."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

import waystation as ws

from . import files
from .files import run_row


class Expense(msgspec.Struct):
    employee: str
    amount: float


class Decision(msgspec.Struct):
    approved: bool
    by: str


class Draft(msgspec.Struct):
    text: str
    confidence: float


def journal(db: Path, run_id: str) -> list[tuple[Any, ...]]:
    """(seq, stage_index, event, attempt, payload) rows of one run, in order."""
    return files.journal(db, run_id, "seq, stage_index, event, attempt, payload")


def resolve(schema: dict[str, Any]) -> dict[str, Any]:
    """Follow a top-level $ref into $defs."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return dict(schema["$defs"][name])
    return schema


def expense_pipeline(calls: Counter[str], *, gate_last: bool = False) -> ws.Pipeline:
    @ws.stage
    async def check(expense: Expense) -> float:
        calls["check"] += 1
        return round(expense.amount * 1.2, 2)

    approval = ws.gate("approval", schema=Decision, reason="approve this expense?")

    @ws.stage
    async def pay(expense: Expense, check: float, approval: Decision) -> str:
        calls["pay"] += 1
        assert isinstance(approval, Decision)
        if not approval.approved:
            return "rejected"
        return f"paid {check} to {expense.employee} (ok by {approval.by})"

    stages = [check, approval] if gate_last else [check, approval, pay]
    return ws.Pipeline("expenses", stages, version="1")


# -- gates ------------------------------------------------------------------------------------


async def test_gate_pauses_with_a_snapshot(db: Path) -> None:
    calls: Counter[str] = Counter()
    p = expense_pipeline(calls)
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        run = await engine.start(p, {"expense": Expense("ann", 100.0)})
        got = await engine.get(run.run_id)
        paused = await engine.list(status="paused")
    assert run.status == "paused"
    assert not run.done
    assert run.stage_index == 1
    assert run.stage_name == "approval"
    pause = run.pause
    assert pause is not None
    assert pause.kind == "approval"
    assert pause.reason == "approve this expense?"
    assert pause.stage_index == 1
    assert pause.stage_name == "approval"
    assert pause.gate is True
    schema = resolve(pause.schema)
    assert schema["type"] == "object"
    assert schema["properties"]["approved"] == {"type": "boolean"}
    assert schema["properties"]["by"] == {"type": "string"}
    assert set(schema["required"]) == {"approved", "by"}
    assert got.pause == pause
    assert [r.run_id for r in paused] == [run.run_id]
    assert calls == {"check": 1}
    # on disk: the pause snapshot, no lease held, the journal ends with `paused`
    row = run_row(db, run.run_id)
    assert row["status"] == "paused"
    assert row["stage_index"] == 1
    assert row["lease_owner"] is None
    stored = json.loads(row["pause"])[0]
    assert stored["kind"] == "approval"
    assert stored["stage_name"] == "approval"
    assert resolve(stored["schema"])["properties"]["approved"] == {"type": "boolean"}
    rows = journal(db, run.run_id)
    assert rows[-1][2] == "paused"
    assert rows[-1][1] == 1


async def test_resume_continues_at_the_next_stage(db: Path) -> None:
    calls: Counter[str] = Counter()
    p = expense_pipeline(calls)
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        run = await engine.start(p, {"expense": Expense("ann", 100.0)})
        before = len(await engine.history(run.run_id))
        done = await engine.resume(run.run_id, {"approved": True, "by": "bob"})
        history = await engine.history(run.run_id)
    assert done.status == "succeeded"
    assert done.output == "paid 120.0 to ann (ok by bob)"
    assert done.pause is None
    assert calls == {"check": 1, "pay": 1}
    after = [(t.event, t.stage_index) for t in history[before:]]
    assert after == [
        ("resumed", 1),
        ("succeeded", 1),
        ("started", 2),
        ("succeeded", 2),
        ("completed", 3),
    ]
    assert history[before + 1].payload == {"approved": True, "by": "bob"}
    # each stage has exactly one committed result
    rows = journal(db, run.run_id)
    assert Counter(r[1] for r in rows if r[2] == "succeeded") == {0: 1, 1: 1, 2: 1}
    row = run_row(db, run.run_id)
    assert row["pause"] is None
    assert row["status"] == "succeeded"


async def test_resume_with_a_struct_value(db: Path) -> None:
    calls: Counter[str] = Counter()
    p = expense_pipeline(calls)
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        run = await engine.start(p, {"expense": Expense("ann", 10.0)})
        done = await engine.resume(run.run_id, Decision(approved=False, by="carl"))
    assert done.output == "rejected"
    assert calls == {"check": 1, "pay": 1}


async def test_gate_as_last_stage(db: Path) -> None:
    calls: Counter[str] = Counter()
    p = expense_pipeline(calls, gate_last=True)
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        run = await engine.start(p, {"expense": Expense("ann", 100.0)})
        assert run.status == "paused"
        done = await engine.resume(run.run_id, {"approved": True, "by": "bob"})
        got = await engine.get(run.run_id)
        history = await engine.history(run.run_id)
    assert done.status == "succeeded"
    assert isinstance(done.output, Decision)
    assert done.output == Decision(True, "bob")
    assert got.output == Decision(True, "bob")
    assert history[-1].event == "completed"
    assert calls == {"check": 1}
    assert json.loads(run_row(db, run.run_id)["output"]) == {"approved": True, "by": "bob"}


async def test_gate_as_first_stage(db: Path) -> None:
    @ws.stage
    async def act(go: bool) -> str:
        return "went" if go else "stayed"

    p = ws.Pipeline("gate-first", [ws.gate("go", schema=bool), act])
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        run = await engine.start(p)
        assert run.status == "paused"
        assert run.pause is not None and run.pause.stage_index == 0
        done = await engine.resume(run.run_id, True)
    assert done.output == "went"


async def test_gate_with_when_false_does_not_pause(db: Path) -> None:
    calls: Counter[str] = Counter()

    @ws.stage
    async def amount(expense: Expense) -> float:
        return expense.amount

    approval = ws.gate("approval", schema=Decision, when=lambda amount: amount > 50)

    @ws.stage
    async def pay(approval: Decision | None) -> str:
        calls["pay"] += 1
        return "auto" if approval is None else f"approved by {approval.by}"

    p = ws.Pipeline("maybe-gate", [amount, approval, pay])
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        small = await engine.start(p, {"expense": Expense("ann", 10.0)})
        big = await engine.start(p, {"expense": Expense("ann", 100.0)})
        assert big.status == "paused"
        big = await engine.resume(big.run_id, {"approved": True, "by": "bob"})
    assert small.status == "succeeded" and small.output == "auto"
    assert big.output == "approved by bob"
    assert [r[2] for r in journal(db, small.run_id) if r[1] == 1] == ["started", "skipped"]


# -- ctx.pause --------------------------------------------------------------------------------


async def test_ctx_pause_reenters_the_stage_and_returns_the_answer(db: Path) -> None:
    calls: Counter[str] = Counter()

    @ws.stage
    async def extract(text: str) -> Draft:
        calls["extract"] += 1
        return Draft(text, 0.5)

    @ws.stage
    async def review(extract: Draft, ctx: ws.StageContext) -> Draft:
        calls["review:entered"] += 1
        if extract.confidence < 0.8:
            fixed = await ctx.pause("correction", schema=Draft, reason="check the extraction")
            calls["review:answered"] += 1
            assert isinstance(fixed, Draft)
            return fixed
        return extract

    @ws.stage
    async def publish(review: Draft) -> str:
        calls["publish"] += 1
        return f"published {review.text!r} ({review.confidence})"

    p = ws.Pipeline("review", [extract, review, publish])
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        run = await engine.start(p, {"text": "helo"})
        assert run.status == "paused"
        pause = run.pause
        assert pause is not None
        assert pause.kind == "correction"
        assert pause.reason == "check the extraction"
        assert pause.stage_index == 1
        assert pause.stage_name == "review"
        assert pause.gate is False
        assert set(resolve(pause.schema)["properties"]) == {"text", "confidence"}
        assert calls == {"extract": 1, "review:entered": 1}
        done = await engine.resume(run.run_id, {"text": "hello", "confidence": 1.0})
        history = await engine.history(run.run_id)
    assert done.status == "succeeded"
    assert done.output == "published 'hello' (1.0)"
    assert calls == {"extract": 1, "review:entered": 2, "review:answered": 1, "publish": 1}
    review_rows = [(t.event, t.payload) for t in history if t.stage_index == 1]
    assert [e for e, _ in review_rows] == ["started", "paused", "resumed", "succeeded"]
    assert review_rows[2][1] == {"text": "hello", "confidence": 1.0}
    assert review_rows[3][1] == {"text": "hello", "confidence": 1.0}
    rows = journal(db, run.run_id)
    assert Counter(r[1] for r in rows if r[2] == "succeeded") == {0: 1, 1: 1, 2: 1}


async def test_a_stage_that_pauses_twice_gets_each_answer_once_in_order(db: Path) -> None:
    trace: list[str] = []
    effects: Counter[str] = Counter()

    @ws.stage
    async def interview(ctx: ws.StageContext) -> str:
        trace.append("enter")
        name = await ctx.pause("name", schema=str, reason="who?")
        trace.append(f"after-1:{name}")
        age = await ctx.pause("age", schema=int, reason="how old?")
        trace.append(f"after-2:{age}")
        effects[f"{name}/{age}"] += 1  # the side effect after the last answer
        return f"{name} is {age}"

    @ws.stage
    async def file_it(interview: str) -> str:
        effects["filed"] += 1
        return interview.upper()

    p = ws.Pipeline("interview", [interview, file_it])
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        run = await engine.start(p)
        assert run.status == "paused"
        assert run.pause is not None
        first = run.pause
        assert (first.kind, first.reason, first.number) == ("name", "who?", 0)
        assert resolve(first.schema) == {"type": "string"}

        run = await engine.resume(run.run_id, "ann")
        assert run.status == "paused"
        assert run.pause is not None
        second = run.pause
        assert (second.kind, second.reason, second.number) == ("age", "how old?", 1)
        assert second.pause_id != first.pause_id
        assert resolve(second.schema) == {"type": "integer"}
        assert not effects

        done = await engine.resume(run.run_id, 42)
        history = await engine.history(run.run_id)
    assert done.status == "succeeded"
    assert done.output == "ANN IS 42"
    assert trace == [
        "enter",
        "enter",
        "after-1:ann",
        "enter",
        "after-1:ann",
        "after-2:42",
    ]
    assert effects == {"ann/42": 1, "filed": 1}
    events = [(t.event, t.payload) for t in history if t.stage_index == 0]
    assert [e for e, _ in events] == [
        "started",
        "paused",
        "resumed",
        "paused",
        "resumed",
        "succeeded",
    ]
    assert [pl for e, pl in events if e == "resumed"] == ["ann", 42]


async def test_ctx_pause_answer_of_the_wrong_type_is_refused(db: Path) -> None:
    @ws.stage
    async def ask(ctx: ws.StageContext) -> int:
        return await ctx.pause("number", schema=int)

    p = ws.Pipeline("ask", [ask])
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        run = await engine.start(p)
        with pytest.raises(ws.InvalidResumeInput):
            await engine.resume(run.run_id, "seven")
        assert (await engine.get(run.run_id)).status == "paused"
        done = await engine.resume(run.run_id, 7)
    assert done.output == 7


# -- across engines ---------------------------------------------------------------------------


async def test_resume_after_reopening_the_engine(db: Path) -> None:
    calls: Counter[str] = Counter()
    p = expense_pipeline(calls)
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        run = await engine.start(p, {"expense": Expense("ann", 100.0)})
        assert run.status == "paused"
    assert run_row(db, run.run_id)["status"] == "paused"

    p2 = expense_pipeline(calls)  # the same definition, built again as a new process would
    async with ws.Engine.open(db, pipelines=[p2]) as engine:
        reopened = await engine.get(run.run_id)
        assert reopened.status == "paused"
        assert reopened.pause == run.pause
        done = await engine.resume(run.run_id, {"approved": True, "by": "bob"})
    assert done.status == "succeeded"
    assert done.output == "paid 120.0 to ann (ok by bob)"
    assert calls == {"check": 1, "pay": 1}
    rows = journal(db, run.run_id)
    assert Counter(r[1] for r in rows if r[2] == "succeeded") == {0: 1, 1: 1, 2: 1}
    assert "recovered" not in [r[2] for r in rows]


async def test_ctx_pause_resumed_after_reopening_the_engine(db: Path) -> None:
    calls: Counter[str] = Counter()

    def build() -> ws.Pipeline:
        @ws.stage
        async def prepare(topic: str) -> Draft:
            calls["prepare"] += 1
            return Draft(topic, 0.1)

        @ws.stage
        async def review(prepare: Draft, ctx: ws.StageContext) -> Draft:
            calls["review"] += 1
            first = await ctx.pause("first", schema=Draft)
            second = await ctx.pause("second", schema=Decision)
            calls["review:done"] += 1
            return Draft(f"{first.text} by {second.by}", first.confidence)

        return ws.Pipeline("reopen-ctx", [prepare, review])

    p = build()
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        run = await engine.start(p, {"topic": "t"})
        assert run.pause is not None and run.pause.kind == "first"
    async with ws.Engine.open(db, pipelines=[build()]) as engine:
        run = await engine.resume(run.run_id, {"text": "fixed", "confidence": 0.9})
        assert run.pause is not None and run.pause.kind == "second"
    async with ws.Engine.open(db, pipelines=[build()]) as engine:
        done = await engine.resume(run.run_id, {"approved": True, "by": "eve"})
    assert done.status == "succeeded"
    assert done.output == Draft("fixed by eve", 0.9)
    assert calls == {"prepare": 1, "review": 3, "review:done": 1}


class CommitsTogether(ws.SQLiteStore):
    """A store that, when armed, holds each run update until `n` of them are waiting, so
    that they all were made from the same read of the run."""

    def __init__(self, path: Path, n: int) -> None:
        super().__init__(path)
        self.n = n
        self.armed = False
        self.waiting = 0
        self.together = asyncio.Event()

    async def update_run(self, *args: Any, **kwargs: Any) -> Any:
        if self.armed:
            self.waiting += 1
            if self.waiting == self.n:
                self.armed = False
                self.together.set()
            await self.together.wait()
        return await super().update_run(*args, **kwargs)


async def test_concurrent_answers_to_different_pauses_all_apply(db: Path) -> None:
    """Two people answer the two gates of one run at the same moment. Before, the second
    commit missed its guard (the run had moved) and its caller got NotPaused, though its
    pause was never answered and stayed open."""
    p = ws.Pipeline(
        "two-approvals",
        [ws.parallel(ws.gate("legal", schema=bool), ws.gate("finance", schema=bool), name="ok")],
    )
    store = CommitsTogether(db, n=2)
    async with ws.Engine.open(store, pipelines=[p]) as engine:
        with anyio.fail_after(30):
            run = await engine.start(p)
            assert len(run.pauses) == 2
            store.armed = True
            answers = await asyncio.gather(
                *(engine.resume(run.run_id, True, pause_id=q.pause_id) for q in run.pauses)
            )
    assert not store.armed  # both commits were made from one read of the run
    # The first answer leaves the run paused on the other gate; the second finishes it.
    assert sorted(a.status for a in answers) == ["paused", "succeeded"]
    final = run_row(db, run.run_id)
    assert final["status"] == "succeeded"
    assert json.loads(final["output"]) == {"legal": True, "finance": True}
