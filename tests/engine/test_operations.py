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


@ws.stage
async def leaves_a_file(name: str, ctx: ws.StageContext) -> str:
    before = sorted(p.name for p in ctx.workspace.iterdir())
    (ctx.workspace / name).write_text("scratch")
    if name == "first.txt":
        raise ValueError("fails after writing")
    return ",".join(before)


scratch = ws.Pipeline("scratch", [leaves_a_file])


async def test_prune_removes_the_workspaces_of_the_runs_it_deletes(db: Path) -> None:
    """A failed run's workspace is kept for looking into; pruning the run removes it. Before,
    it stayed on disk for ever, and a run given the same id found its files."""
    async with ws.Engine.open(db, pipelines=[scratch]) as engine:
        failed = await engine.start(scratch, {"name": "first.txt"}, run_id="job-7")
        assert failed.status == "failed"
        assert (engine.workspace_root / "job-7" / "first.txt").exists()
        assert await engine.prune(older_than=0, status=("failed",)) == 1
        assert not (engine.workspace_root / "job-7").exists()
        again = await engine.start(scratch, {"name": "second.txt"}, run_id="job-7")
    assert again.status == "succeeded" and again.output == ""  # nothing left from before


class Flaky:
    """A switch the tests flip to 'fix the bug' between a failed run and its retry/replay."""

    broken = True
    executed: list[str] = []


@ws.stage
async def load(n: int) -> int:
    Flaky.executed.append("load")
    return n + 1


@ws.stage
async def compute(load: int) -> int:
    Flaky.executed.append("compute")
    if Flaky.broken:
        raise ValueError("bug in compute")
    return load * 10


@ws.stage
async def publish(compute: int) -> str:
    Flaky.executed.append("publish")
    return f"result {compute}"


buggy = ws.Pipeline("buggy", [load, compute, publish])


async def test_retry_continues_a_failed_run_at_its_failed_stage(db: Path) -> None:
    Flaky.broken, Flaky.executed = True, []
    async with ws.Engine.open(db, pipelines=[buggy]) as engine:
        run = await engine.start(buggy, {"n": 1})
        assert run.status == "failed" and run.error is not None
        assert run.error.stage_name == "compute" and "bug in compute" in run.error.message
        Flaky.broken = False
        retried = await engine.retry(run.run_id)
        assert retried.run_id == run.run_id
        assert retried.status == "succeeded" and retried.output == "result 20"
        assert retried.error is None
        assert Flaky.executed == ["load", "compute", "compute", "publish"]
        events = [t.event for t in await engine.history(run.run_id)]
        assert events.count("retried") == 1 and events.count("failed") == 1
        with pytest.raises(ws.InvalidRunState, match="succeeded"):
            await engine.retry(run.run_id)


async def test_replay_reuses_outputs_before_the_failed_stage(db: Path) -> None:
    Flaky.broken, Flaky.executed = True, []
    async with ws.Engine.open(db, pipelines=[buggy]) as engine:
        failed = await engine.start(buggy, {"n": 4})
        Flaky.broken = False
        replay = await engine.replay(failed.run_id)
        assert replay.run_id != failed.run_id
        assert replay.run_kind == "replay" and replay.replay_of == failed.run_id
        assert replay.status == "succeeded" and replay.output == "result 50"
        assert Flaky.executed == ["load", "compute", "compute", "publish"]  # load reused
        history = await engine.history(replay.run_id)
        assert [(t.event, t.stage_index) for t in history][:3] == [
            ("created", None),
            ("reused", 0),
            ("started", 1),
        ]
        assert (await engine.get(failed.run_id)).status == "failed"  # the original is kept

        # Time travel on a succeeded run: from a named stage, or with a new input.
        Flaky.executed = []
        again = await engine.replay(replay.run_id, from_stage="publish")
        assert again.output == "result 50" and Flaky.executed == ["publish"]
        fresh = await engine.replay(replay.run_id, input={"n": 0})
        assert fresh.output == "result 10"
        with pytest.raises(ws.InvalidRunState, match="from_stage"):
            await engine.replay(replay.run_id)
        with pytest.raises(ws.InvalidInput, match="no stage"):
            await engine.replay(replay.run_id, from_stage="nope")


async def test_list_newest_first_pages_from_the_newest_run(db: Path) -> None:
    async with ws.Engine.open(db, pipelines=[flow]) as engine:
        ids = [(await engine.start(flow, {"amount": n})).run_id for n in range(5)]
        first = await engine.list(newest_first=True, limit=2)
        assert [r.run_id for r in first] == ids[:2:-1]
        more = await engine.list(newest_first=True, limit=10, after=first[-1].run_id)
        assert [r.run_id for r in more] == ids[2::-1]
        assert [r.run_id for r in await engine.list(limit=2)] == ids[:2]


async def test_an_engine_that_only_reads_closes_while_another_process_writes(db: Path) -> None:
    """An engine with no pipeline and no recovery holds no lease, so closing it writes
    nothing. Before, it released leases, a write transaction that waited for the write
    lock of a busy database (the CLI's `runs` took 7 s beside a long write)."""
    async with ws.Engine.open(db, pipelines=[flow]) as engine:
        run = await engine.start(flow, {"amount": 1})
    with sqlite3.connect(db, isolation_level=None) as writer:
        writer.execute("BEGIN IMMEDIATE")  # another process in the middle of a write
        try:
            with anyio.fail_after(10):  # not a timing assertion: busy_timeout is 30 s
                async with ws.Engine.open(db, recover=False) as reader:
                    assert [r.run_id for r in await reader.list()] == [run.run_id]
        finally:
            writer.execute("ROLLBACK")
