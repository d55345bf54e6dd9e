"""Pause in one process, resume in another (or several at once), with SIGKILLs in between.

A paused run lives only in the database: the process that paused it may exit or be killed,
and any other process resumes it. Stages record their executions in the side file, so the
tests count what really ran across all processes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import waystation as ws

from . import workload
from .harness import Workload, executions, integrity, query, side_lines, spawn, wait_until


def events(history: list[ws.Transition]) -> list[tuple[str, int | None]]:
    return [(t.event, t.stage_index) for t in history]


async def start_paused(
    tmp_path: Path, db: Path, side: Path, pipeline: ws.Pipeline, run_id: str, *extra: str
) -> tuple[Workload, dict[str, Any]]:
    """Process A: start a run and report once it paused (A stays alive with `--hang`)."""
    proc = await spawn(
        tmp_path,
        "start",
        str(db),
        str(side),
        "--pipeline",
        pipeline.name,
        "--run-id",
        run_id,
        *extra,
    )
    message = await proc.message()
    assert message["run_id"] == run_id
    assert message["status"] == "paused", (message, proc.stderr())
    return proc, message


def raw_run(db: Path, run_id: str) -> tuple[str, str | None, str | None]:
    """(status, lease_owner, pause JSON) as stored."""
    ((status, owner, pause),) = query(
        db, "SELECT status, lease_owner, pause FROM runs WHERE run_id = ?", (run_id,)
    )
    return status, owner, pause


@pytest.mark.parametrize("a_ends_by", ["exit", "sigkill"])
async def test_pause_in_one_process_resume_in_another(tmp_path: Path, a_ends_by: str) -> None:
    db, side = tmp_path / "runs.db", tmp_path / "side.log"
    run_id = "expense-1"
    hang = ["--hang"] if a_ends_by == "sigkill" else []
    a, message = await start_paused(
        tmp_path, db, side, workload.approvals, run_id, "--n", "4", *hang
    )
    try:
        assert message["pause"] == "approval#0"
        if a_ends_by == "sigkill":
            await a.sigkill()
        else:
            assert await a.exited() == 0, a.stderr()
    finally:
        await a.cleanup()

    # Durable as paused, owned by nobody: there is nothing to recover, only to resume.
    status, owner, pause = raw_run(db, run_id)
    assert (status, owner) == ("paused", None)
    assert pause is not None and json.loads(pause)[0]["pause_id"] == "approval#0"
    assert integrity(db) == [("ok",)]
    assert executions(side_lines(side)) == {(run_id, "prepare"): 1}

    workload.configure(side)
    async with ws.Engine.open(db, pipelines=workload.PIPELINES) as engine:
        assert engine.active_runs == []  # a paused run is not "recovered"
        run = await engine.get(run_id)
        assert run.status == "paused"
        assert run.pause is not None and run.pause.gate and run.pause.kind == "approval"
        assert run.pause.reason == "approve the prepared amount?"
        assert set(run.pause.schema["$defs"]["Decision"]["required"]) == {"approved", "by"}
        paused_history = await engine.history(run_id)

        # A wrong answer is refused and changes nothing.
        with pytest.raises(ws.InvalidResumeInput):
            await engine.resume(run_id, {"approved": "yes please"})
        assert (await engine.get(run_id)).status == "paused"
        assert await engine.history(run_id) == paused_history

        run = await engine.resume(run_id, {"approved": True, "by": "bob"}, timeout=10)
        assert run.status == "succeeded", run.error
        assert run.output == "40 approved by bob"
        with pytest.raises(ws.NotPaused):
            await engine.resume(run_id, {"approved": False, "by": "eve"})
        history = await engine.history(run_id)

    assert events(history) == [
        ("created", None),
        ("started", 0),
        ("succeeded", 0),
        ("started", 1),
        ("paused", 1),
        ("resumed", 1),
        ("succeeded", 1),
        ("started", 2),
        ("succeeded", 2),
        ("completed", 3),
    ]
    assert history[6].payload == {"approved": True, "by": "bob"}
    assert history[2].payload == 40
    # The stage before the gate ran once, in A; the stage after it once, here.
    lines = side_lines(side)
    assert executions(lines) == {(run_id, "prepare"): 1, (run_id, "finish"): 1}
    assert [w[3] for w in lines if w[1] == "finish"] == ["bob"]
    assert raw_run(db, run_id)[:2] == ("succeeded", None)
    assert integrity(db) == [("ok",)]


async def test_concurrent_resumes_in_two_processes_one_wins(tmp_path: Path) -> None:
    """Two processes resume the same pause at the same moment: exactly one wins."""
    db, side = tmp_path / "runs.db", tmp_path / "side.log"
    go = tmp_path / "go"
    run_id = "expense-race"
    a, _ = await start_paused(tmp_path, db, side, workload.approvals, run_id, "--n", "2")
    try:
        assert await a.exited() == 0, a.stderr()
    finally:
        await a.cleanup()

    racers = []
    try:
        for name in ("b1", "b2"):
            answer = json.dumps({"approved": True, "by": name})
            racers.append(
                await spawn(
                    tmp_path,
                    "resume",
                    str(db),
                    str(side),
                    "--run-id",
                    run_id,
                    "--value",
                    answer,
                    "--go-file",
                    str(go),
                )
            )
        for racer in racers:  # both engines are open and spinning on the go file
            assert (await racer.message())["ready"] == run_id
        go.touch()
        results = [await racer.message() for racer in racers]
        for racer in racers:
            assert await racer.exited() == 0, racer.stderr()
    finally:
        for racer in racers:
            await racer.cleanup()

    winners = [r for r in results if r.get("status") == "succeeded"]
    losers = [r for r in results if r.get("error") == "NotPaused"]
    assert len(winners) == 1 and len(losers) == 1, results
    winner = winners[0]["output"].rsplit(" ", 1)[1]
    assert winners[0]["output"] == f"20 approved by {winner}"

    workload.configure(side)
    async with ws.Engine.open(db, pipelines=workload.PIPELINES) as engine:
        run = await engine.get(run_id)
        history = await engine.history(run_id)
    assert run.status == "succeeded" and run.output == f"20 approved by {winner}"
    assert [t.event for t in history].count("resumed") == 1
    gate_results = [t.payload for t in history if t.event == "succeeded" and t.stage_index == 1]
    assert gate_results == [{"approved": True, "by": winner}]
    lines = side_lines(side)
    assert executions(lines) == {(run_id, "prepare"): 1, (run_id, "finish"): 1}
    assert [w[3] for w in lines if w[1] == "finish"] == [winner]
    assert integrity(db) == [("ok",)]


async def test_ctx_pause_twice_answered_in_two_processes(tmp_path: Path) -> None:
    """One stage pauses twice; A pauses it, B answers the first question (and is killed after
    the second pause), this process answers the second. Each answer is applied once."""
    db, side = tmp_path / "runs.db", tmp_path / "side.log"
    run_id = "interview-1"
    a, message = await start_paused(tmp_path, db, side, workload.interviews, run_id, "--n", "3")
    try:
        assert message["pause"] == "interview#0"
        assert await a.exited() == 0, a.stderr()
    finally:
        await a.cleanup()

    b = await spawn(
        tmp_path,
        "resume",
        str(db),
        str(side),
        "--run-id",
        run_id,
        "--value",
        json.dumps({"text": "alpha"}),
        "--hang",
    )
    try:
        message = await b.message()
        assert message["status"] == "paused" and message["pause"] == "interview#1", message
        await b.sigkill()
    finally:
        await b.cleanup()
    assert raw_run(db, run_id)[:2] == ("paused", None)

    workload.configure(side)
    async with ws.Engine.open(db, pipelines=workload.PIPELINES) as engine:
        run = await engine.get(run_id)
        assert run.pause is not None
        assert (run.pause.kind, run.pause.number, run.pause.gate) == ("second", 1, False)
        with pytest.raises(ws.NotPaused):
            await engine.resume(run_id, {"text": "stale"}, pause_id="interview#0")
        with pytest.raises(ws.InvalidResumeInput):
            await engine.resume(run_id, {"txt": "typo"})
        run = await engine.resume(run_id, {"text": "beta"}, pause_id="interview#1", timeout=10)
        assert run.status == "succeeded", run.error
        assert run.output == "3:ALPHA/BETA"
        history = await engine.history(run_id)

    resumed = [t.payload for t in history if t.event == "resumed"]
    assert resumed == [{"text": "alpha"}, {"text": "beta"}]
    paused = [t.payload[0]["pause_id"] for t in history if t.event == "paused"]
    assert paused == ["interview#0", "interview#1"]
    assert [(t.stage_index, t.payload) for t in history if t.event == "succeeded"] == [
        (0, "3:alpha/beta"),
        (1, "3:ALPHA/BETA"),
    ]
    assert "recovered" not in [t.event for t in history]

    lines = [w for w in side_lines(side) if w[0] == run_id]
    # The stage re-enters on each resume (documented), but each answer is applied once and
    # the side effect after the last answer happens once.
    assert [w[1:] for w in lines] == [
        ["interview", "enter"],  # A
        ["interview", "enter"],  # B
        ["interview", "after-first", "alpha"],
        ["interview", "enter"],  # here
        ["interview", "after-first", "alpha"],
        ["interview", "effect", "alpha", "beta"],
        ["wrapup", "start"],
    ]
    assert integrity(db) == [("ok",)]


async def test_sigkill_between_resume_and_next_pause(tmp_path: Path) -> None:
    """B commits the first answer and is killed while the stage runs on towards its second
    pause. Recovery here re-enters the stage with the committed answer (not asking again)."""
    db, side = tmp_path / "runs.db", tmp_path / "side.log"
    run_id = "interview-2"
    a, _ = await start_paused(
        tmp_path, db, side, workload.interviews, run_id, "--n", "5", "--linger", "1.0"
    )
    try:
        assert await a.exited() == 0, a.stderr()
    finally:
        await a.cleanup()

    b = await spawn(
        tmp_path,
        "resume",
        str(db),
        str(side),
        "--run-id",
        run_id,
        "--value",
        json.dumps({"text": "alpha"}),
        "--no-wait",
        "--hang",
    )
    try:
        message = await b.message()
        assert message["status"] == "running", message
        await wait_until(
            "B to apply the first answer",
            lambda: (
                ["interview", "after-first", "alpha"]
                in [w[1:] for w in side_lines(side) if w[0] == run_id]
            ),
            timeout=15,
        )
        await b.sigkill()
    finally:
        await b.cleanup()
    status, owner, _ = raw_run(db, run_id)
    assert status == "running" and owner is not None and f":{b.pid}:" in owner
    assert integrity(db) == [("ok",)]

    workload.configure(side)
    async with ws.Engine.open(db, pipelines=workload.PIPELINES) as engine:
        run = await engine.wait(run_id, timeout=15)
        assert run.status == "paused", (run.status, run.error)
        assert run.pause is not None and run.pause.pause_id == "interview#1"
        run = await engine.resume(run_id, {"text": "beta"}, timeout=15)
        assert run.status == "succeeded", run.error
        assert run.output == "5:ALPHA/BETA"
        history = await engine.history(run_id)

    assert [t.payload for t in history if t.event == "resumed"] == [
        {"text": "alpha"},
        {"text": "beta"},
    ]
    recovered = [t for t in history if t.event == "recovered"]
    assert len(recovered) == 1 and recovered[0].stage_index == 0
    assert [t.payload[0]["pause_id"] for t in history if t.event == "paused"] == [
        "interview#0",
        "interview#1",
    ]
    lines = [w[1:] for w in side_lines(side) if w[0] == run_id]
    assert lines == [
        ["interview", "enter"],  # A
        ["interview", "enter"],  # B, killed while lingering
        ["interview", "after-first", "alpha"],
        ["interview", "enter"],  # recovered here: the first answer comes from the journal
        ["interview", "after-first", "alpha"],
        ["interview", "enter"],  # after the second answer
        ["interview", "after-first", "alpha"],
        ["interview", "effect", "alpha", "beta"],
        ["wrapup", "start"],
    ]
    assert integrity(db) == [("ok",)]


async def resume_in_subprocess(
    tmp_path: Path, db: Path, side: Path, run_id: str, value: Any, *extra: str
) -> dict[str, Any]:
    """Resume `run_id` in a fresh process that exits afterwards; what it reported."""
    proc = await spawn(
        tmp_path,
        "resume",
        str(db),
        str(side),
        "--run-id",
        run_id,
        "--value",
        json.dumps(value),
        *extra,
    )
    try:
        message = await proc.message()
        assert await proc.exited() == 0, proc.stderr()
    finally:
        await proc.cleanup()
    return message


async def test_answer_recorded_without_pipeline_then_worker_continues(tmp_path: Path) -> None:
    """A process that lacks the pipeline (a web handler, the CLI) answers a gate: the answer
    is committed and the run left pending; a worker process with the pipeline continues it."""
    db, side = tmp_path / "runs.db", tmp_path / "side.log"
    run_id = "expense-bare"
    a, _ = await start_paused(tmp_path, db, side, workload.approvals, run_id, "--n", "6")
    try:
        assert await a.exited() == 0, a.stderr()
    finally:
        await a.cleanup()

    bad = await resume_in_subprocess(
        tmp_path, db, side, run_id, {"approved": "maybe", "by": "web"}, "--bare"
    )
    assert bad["error"] == "InvalidResumeInput", bad
    assert raw_run(db, run_id)[:2] == ("paused", None)

    answered = await resume_in_subprocess(
        tmp_path, db, side, run_id, {"approved": True, "by": "web"}, "--bare"
    )
    assert answered["status"] == "pending", answered
    assert raw_run(db, run_id)[:2] == ("pending", None)
    late = await resume_in_subprocess(
        tmp_path, db, side, run_id, {"approved": False, "by": "late"}, "--bare"
    )
    assert late["error"] == "NotPaused", late
    rows = query(
        db,
        "SELECT event, payload FROM journal WHERE run_id = ? AND stage_index = 1 ORDER BY seq",
        (run_id,),
    )
    assert [e for e, _ in rows] == ["started", "paused", "resumed"]
    assert json.loads(rows[2][1]) == {"approved": True, "by": "web"}
    assert executions(side_lines(side)) == {(run_id, "prepare"): 1}

    workload.configure(side)
    async with ws.Engine.open(db, pipelines=workload.PIPELINES) as worker:
        run = await worker.wait(run_id, timeout=15)
        history = await worker.history(run_id)
    assert run.status == "succeeded", run.error
    assert run.output == "60 approved by web"
    assert [t.payload for t in history if t.event == "resumed"] == [{"approved": True, "by": "web"}]
    assert [(t.stage_index, t.payload) for t in history if t.event == "succeeded"] == [
        (0, 60),
        (1, {"approved": True, "by": "web"}),
        (2, "60 approved by web"),
    ]
    assert [t.event for t in history].count("paused") == 1  # the gate did not ask again
    lines = side_lines(side)
    assert executions(lines) == {(run_id, "prepare"): 1, (run_id, "finish"): 1}
    assert [w[3] for w in lines if w[1] == "finish"] == ["web"]
    assert integrity(db) == [("ok",)]
