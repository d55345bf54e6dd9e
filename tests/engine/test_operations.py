"""Operating runs: answers recorded by a process without the pipeline, workers, pruning."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import anyio
import msgspec
import pytest

import waystation as ws


class Decision(msgspec.Struct):
    approved: bool
    by: str


calls: list[str] = []


@ws.stage
async def prepare(amount: int) -> int:
    calls.append("prepare")
    return amount * 2


approval = ws.gate("approval", schema=Decision, reason="ok?")


@ws.stage
async def finish(prepare: int, approval: Decision) -> str:
    calls.append("finish")
    return f"{prepare} by {approval.by}" if approval.approved else "no"


flow = ws.Pipeline("flow", [prepare, approval, finish])


async def test_resume_without_pipeline_leaves_run_for_a_worker(db: Path) -> None:
    calls.clear()
    async with ws.Engine.open(db, pipelines=[flow]) as engine:
        run = await engine.start(flow, {"amount": 21})
        assert run.status == "paused"
    # A web handler or the CLI: no pipelines registered, not a worker.
    async with ws.Engine.open(db, recover=False) as web:
        with pytest.raises(ws.InvalidResumeInput, match="approved"):
            await web.resume(run.run_id, {"approved": "yes"})
        pending = await web.resume(run.run_id, {"approved": True, "by": "ann"})
        assert pending.status == "pending" and pending.pause is None
        with pytest.raises(ws.NotPaused):
            await web.resume(run.run_id, {"approved": True, "by": "eve"})
    async with ws.Engine.open(db, pipelines=[flow], poll_interval=0.05) as worker:
        done = await worker.wait(run.run_id, timeout=10)
    assert done.status == "succeeded" and done.output == "42 by ann"
    assert calls == ["prepare", "finish"]


async def test_worker_polls_for_runs_answered_elsewhere(db: Path) -> None:
    calls.clear()
    async with ws.Engine.open(db, pipelines=[flow], poll_interval=0.05) as worker:
        run = await worker.start(flow, {"amount": 1})
        async with ws.Engine.open(db, recover=False) as web:
            await web.resume(run.run_id, {"approved": True, "by": "bob"})
        with anyio.fail_after(10):
            done = await worker.wait(run.run_id)
    assert done.status == "succeeded" and done.output == "2 by bob"


async def test_prune_deletes_finished_runs_and_journals(db: Path) -> None:
    async with ws.Engine.open(db, pipelines=[flow]) as engine:
        finished = await engine.start(flow, {"amount": 1})
        finished = await engine.resume(finished.run_id, {"approved": False, "by": "x"})
        paused = await engine.start(flow, {"amount": 2})
        assert await engine.prune(older_than=3600) == 0  # too recent
        assert await engine.prune(older_than=0) == 1
        assert [r.run_id for r in await engine.list()] == [paused.run_id]
        with pytest.raises(ws.RunNotFound):
            await engine.get(finished.run_id)
        # The same id starts afresh and sees no old results.
        again = await engine.start(flow, {"amount": 5}, run_id=finished.run_id)
        assert again.status == "paused"
        events = [t.event for t in await engine.history(again.run_id)]
        assert events == ["created", "started", "succeeded", "started", "paused"]
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
