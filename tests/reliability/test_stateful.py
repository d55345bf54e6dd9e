"""A stateful hypothesis test: start, resume (good and bad answers), cancel, retry, close and
reopen (a clean crash stand-in), and crash mid-run (close while a run is being driven),
against a simple model of what each run must look like. After every step the store must
agree with the model: statuses, stage indexes, committed outputs, one `succeeded` row per
committed stage, and the journal invariants of `support.check_journal`.

One event loop per machine (`asyncio.Runner`), so the engine stays open across steps.
"""

from __future__ import annotations

import asyncio
import collections
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import waystation as ws

from .support import SAFETY, check_journal, integrity, journal

EXEC: collections.Counter[tuple[str, str]] = collections.Counter()
"""Executions of stages b and c per run, kept outside the database."""

STEPS = collections.Counter[str]()
"""Rules applied (printed at the end, for RELIABILITY.md)."""


class Decision(msgspec.Struct):
    approved: bool
    by: str


class Note(msgspec.Struct):
    text: str


@ws.stage
async def a(n: int) -> int:
    return n + 1


approval = ws.gate("approval", schema=Decision)


@ws.stage
async def b(a: int, approval: Decision, fails: int, ctx: ws.StageContext) -> int:
    EXEC[(ctx.run_id, "b")] += 1
    if EXEC[(ctx.run_id, "b")] <= fails:
        raise RuntimeError(f"b fails (execution {EXEC[(ctx.run_id, 'b')]} of {fails})")
    return a * 10 + (1 if approval.approved else 0)


@ws.stage
async def c(b: int, ask: bool, ctx: ws.StageContext) -> str:
    EXEC[(ctx.run_id, "c")] += 1
    if not ask:
        return str(b)
    note = await ctx.pause("note", schema=Note, reason="add a note")
    return f"{b}:{note.text}"


PIPELINE = ws.Pipeline("stateful", [a, approval, b, c])
STAGES = ["a", "approval", "b", "c"]


@dataclass
class Expected:
    """What the model says a run looks like."""

    n: int
    fails: int
    ask: bool
    status: str = "paused"
    stage: int = 1
    outputs: dict[int, Any] = field(default_factory=dict)

    @property
    def pause_kind(self) -> str | None:
        if self.status != "paused":
            return None
        return "approval" if self.stage == 1 else "note"


class EngineMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="ws-stateful-"))
        self.db = self.dir / "runs.db"
        self.loop = asyncio.Runner()
        self.engine: ws.Engine | None = None
        self.model: dict[str, Expected] = {}

    # -- plumbing --------------------------------------------------------------------------

    def run(self, coro: Any) -> Any:
        return self.loop.run(asyncio.wait_for(coro, SAFETY))

    async def _open(self) -> ws.Engine:
        return await ws.Engine.open(self.db, pipelines=[PIPELINE], poll_interval=0.05)

    @property
    def e(self) -> ws.Engine:
        assert self.engine is not None
        return self.engine

    def teardown(self) -> None:
        try:
            if self.engine is not None:
                self.run(self.engine.close())
            if self.db.exists():
                assert integrity(self.db) == [("ok",)]
        finally:
            self.loop.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    def has(self, status: str, stage: int | None = None) -> bool:
        return any(
            m.status == status and (stage is None or m.stage == stage) for m in self.model.values()
        )

    def pick(self, data: st.DataObject, *statuses: str) -> str | None:
        ids = sorted(r for r, m in self.model.items() if not statuses or m.status in statuses)
        return data.draw(st.sampled_from(ids)) if ids else None

    # -- the model's transitions ------------------------------------------------------------

    def after_gate(self, m: Expected, rid: str, answer: Decision) -> None:
        """The model of what happens when the gate is answered (or stage b retried)."""
        m.outputs[1] = msgspec.to_builtins(answer)
        self.run_b(m, rid)

    def run_b(self, m: Expected, rid: str) -> None:
        if EXEC[(rid, "b")] + 1 <= m.fails:
            m.status, m.stage = "failed", 2
            return
        m.outputs[2] = m.outputs[0] * 10 + (1 if m.outputs[1]["approved"] else 0)
        self.run_c(m)

    def run_c(self, m: Expected) -> None:
        if m.ask:
            m.status, m.stage = "paused", 3
        else:
            m.outputs[3] = str(m.outputs[2])
            m.status, m.stage = "succeeded", 4

    # -- rules ------------------------------------------------------------------------------

    @initialize()
    def open_engine(self) -> None:
        self.engine = self.run(self._open())

    @rule(n=st.integers(0, 1000), fails=st.sampled_from([0, 0, 0, 1, 2]), ask=st.booleans())
    def start(self, n: int, fails: int, ask: bool) -> None:
        STEPS["start"] += 1
        run = self.run(self.e.start(PIPELINE, {"n": n, "fails": fails, "ask": ask}))
        self.model[run.run_id] = Expected(n, fails, ask, outputs={0: n + 1})

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data(), approved=st.booleans(), by=st.text(max_size=5))
    def resume_gate(self, data: st.DataObject, approved: bool, by: str) -> None:
        rid = self.pick(data)
        if rid is None:
            return
        m = self.model[rid]
        if m.status == "paused" and m.stage == 1:
            STEPS["resume gate"] += 1
            expected_b = EXEC[(rid, "b")]
            self.after_gate(m, rid, Decision(approved, by))
            run = self.run(self.e.resume(rid, {"approved": approved, "by": by}))
            assert EXEC[(rid, "b")] == expected_b + 1
            assert run.status == m.status
        else:
            STEPS["resume refused (not at the gate)"] += 1
            exc: type[Exception] = ws.NotPaused if m.status != "paused" else ws.InvalidResumeInput
            with pytest.raises(exc):
                self.run(self.e.resume(rid, {"approved": approved, "by": by}))

    @precondition(lambda self: self.has("paused", 3))
    @rule(data=st.data(), text=st.text(max_size=5))
    def resume_note(self, data: st.DataObject, text: str) -> None:
        rid = self.pick(data, "paused")
        if rid is None or self.model[rid].stage != 3:
            return
        STEPS["resume note"] += 1
        m = self.model[rid]
        run = self.run(self.e.resume(rid, {"text": text}))
        m.outputs[3] = f"{m.outputs[2]}:{text}"
        m.status, m.stage = "succeeded", 4
        assert run.status == "succeeded"

    @precondition(lambda self: self.has("paused"))
    @rule(
        data=st.data(),
        value=st.one_of(
            st.none(),
            st.integers(),
            st.text(max_size=3),
            st.just({"approved": "yes", "by": "x"}),
            st.just({"text": 5}),
            st.just({"approved": True}),
        ),
    )
    def resume_with_a_bad_answer(self, data: st.DataObject, value: Any) -> None:
        rid = self.pick(data, "paused")
        if rid is None:
            return
        STEPS["resume with a bad answer"] += 1
        before = journal(self.db, rid)
        with pytest.raises(ws.InvalidResumeInput):
            self.run(self.e.resume(rid, value))
        assert journal(self.db, rid) == before

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        rid = self.pick(data)
        if rid is None:
            return
        m = self.model[rid]
        if m.status == "paused":
            STEPS["cancel"] += 1
            run = self.run(self.e.cancel(rid))
            m.status = "cancelled"
            assert run.status == "cancelled"
        else:
            STEPS["cancel refused"] += 1
            with pytest.raises(ws.InvalidRunState):
                self.run(self.e.cancel(rid))

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def retry(self, data: st.DataObject) -> None:
        rid = self.pick(data)
        if rid is None:
            return
        m = self.model[rid]
        if m.status not in ("failed", "cancelled"):
            STEPS["retry refused"] += 1
            with pytest.raises(ws.InvalidRunState):
                self.run(self.e.retry(rid))
            return
        STEPS[f"retry {m.status} at {STAGES[m.stage]}"] += 1
        if m.stage == 1:
            m.status = "paused"  # the gate asks again
        elif m.stage == 2:
            self.run_b(m, rid)
        else:
            self.run_c(m)
        run = self.run(self.e.retry(rid))
        assert run.status == m.status, (run.status, run.error)

    @rule()
    def close_and_reopen(self) -> None:
        """A clean stop and a new engine on the same file (every run is settled)."""
        STEPS["close and reopen"] += 1
        self.run(self.e.close())
        self.engine = self.run(self._open())

    @precondition(lambda self: self.has("paused", 1))
    @rule(data=st.data(), approved=st.booleans())
    def crash_while_driving(self, data: st.DataObject, approved: bool) -> None:
        """Resume without waiting and close the engine at once, interrupting the run
        wherever it is; a new engine recovers it and must end where the model says."""
        ids = sorted(
            r
            for r, m in self.model.items()
            if m.status == "paused" and m.stage == 1 and EXEC[(r, "b")] >= m.fails
        )
        if not ids:
            return
        rid = data.draw(st.sampled_from(ids))
        STEPS["crash while driving"] += 1
        m = self.model[rid]
        self.after_gate(m, rid, Decision(approved, "crash"))
        self.run(self.e.resume(rid, {"approved": approved, "by": "crash"}, wait=False))
        self.run(self.e.close())
        self.engine = self.run(self._open())
        run = self.run(self.e.wait(rid))
        assert run.status == m.status, (run.status, run.error)

    @rule(n=st.integers(0, 100))
    def crash_right_after_submit(self, n: int) -> None:
        STEPS["crash right after submit"] += 1
        run = self.run(self.e.submit(PIPELINE, {"n": n, "fails": 0, "ask": False}))
        self.run(self.e.close())
        self.engine = self.run(self._open())
        self.model[run.run_id] = Expected(n, 0, False, outputs={0: n + 1})
        assert self.run(self.e.wait(run.run_id)).status == "paused"

    # -- the store agrees with the model ----------------------------------------------------

    @invariant()
    def store_agrees_with_model(self) -> None:
        if self.engine is None:
            return

        async def look() -> tuple[list[ws.Run], dict[str, int]]:
            runs = [await self.e.get(rid) for rid in sorted(self.model)]
            counts = {s: len(await self.e.list(status=s, limit=10_000)) for s in STATUSES}
            return runs, counts

        runs, counts = self.run(look())
        expected_counts = collections.Counter(m.status for m in self.model.values())
        assert counts == {s: expected_counts.get(s, 0) for s in STATUSES}
        for run in runs:
            m = self.model[run.run_id]
            assert run.status == m.status, (run.run_id, run.status, m)
            assert run.stage_index == m.stage, (run.run_id, run.stage_index, m)
            assert (run.pause.kind if run.pause else None) == m.pause_kind
            if m.status == "succeeded":
                assert run.output == m.outputs[3]
            rows = check_journal(self.db, run.run_id)
            committed = {r[1]: msgspec.json.decode(r[4]) for r in rows if r[2] == "succeeded"}
            assert committed == m.outputs, (run.run_id, committed, m.outputs)


STATUSES = ("pending", "running", "paused", "succeeded", "failed", "cancelled")

EngineMachine.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestEngineMachine = EngineMachine.TestCase


@pytest.fixture(scope="module", autouse=True)
def _report_steps() -> Any:
    yield
    print("\nstateful steps:", dict(STEPS), "total", sum(STEPS.values()))
