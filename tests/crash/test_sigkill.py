"""SIGKILL a process in the middle of its stages, recover in another, check what was persisted.

The workload subprocess (tests/crash/workload.py) runs pipelines whose stages record each
execution in a side file (fsynced), so the tests count real executions across processes and
compare them with the journal committed before each kill.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

import waystation as ws

from . import workload
from .harness import (
    committed_stages,
    executions,
    integrity,
    query,
    side_lines,
    spawn,
    wait_until,
)

STAGES = workload.STEP_NAMES
RUNS = 20
CONCURRENCY = 6
"""Fewer than RUNS, so at a kill some runs are mid-stage and some have not started at all."""


@dataclass
class Kill:
    """What was durable right after a workload process was SIGKILLed (and reaped)."""

    pid: int
    side_lines: int
    """Lines in the side file at the kill: later lines were written by later processes."""
    committed: set[tuple[str, int]]
    """(run_id, stage_index) with a committed `succeeded` row."""
    runs: dict[str, tuple[str, int, str | None]]
    """run_id -> (status, stage_index, lease_owner) as committed."""


def snapshot_after_kill(db: Path, side: Path, pid: int) -> Kill:
    assert integrity(db) == [("ok",)]
    runs = {
        r: (status, index, owner)
        for r, status, index, owner in query(
            db, "SELECT run_id, status, stage_index, lease_owner FROM runs"
        )
    }
    # The runs row and the journal are written in one transaction: they must agree.
    for run_id, (status, index, owner) in runs.items():
        ((seq,),) = query(db, "SELECT seq FROM runs WHERE run_id = ?", (run_id,))
        ((last, rows),) = query(
            db, "SELECT max(seq), count(*) FROM journal WHERE run_id = ?", (run_id,)
        )
        assert seq == last == rows, f"{run_id}: runs.seq {seq}, journal max {last} of {rows}"
        ((done,),) = query(
            db,
            "SELECT count(*) FROM journal WHERE run_id = ? AND event = 'succeeded'",
            (run_id,),
        )
        assert done == index, f"{run_id} ({status}) is at stage {index} with {done} results"
        if status == "running":
            assert owner is not None, f"{run_id} is running without a lease owner"
    lines = side_lines(side)
    kill = Kill(pid, len(lines), committed_stages(db), runs)
    # Nothing acknowledged was lost: a stage starts only after the commit of the previous
    # stage's result returned, so every stage followed by a started one must be durable.
    for words in lines:
        if words[1] in STAGES and words[2] == "start":
            i = STAGES.index(words[1])
            if i > 0:
                assert (words[0], i - 1) in kill.committed, (
                    f"{words[0]} started {words[1]} but the result of {STAGES[i - 1]} "
                    f"is not in the database after the kill"
                )
    return kill


async def submit_and_kill(
    tmp_path: Path, db: Path, side: Path, progress: int, durability: str = "full"
) -> Kill:
    """Start the workload, SIGKILL it once `progress` stage starts are in the side file."""
    proc = await spawn(
        tmp_path,
        "submit-many",
        str(db),
        str(side),
        "--count",
        str(RUNS),
        "--concurrency",
        str(CONCURRENCY),
        "--durability",
        durability,
        "--hang",
    )
    try:
        run_ids: list[str] = (await proc.message())["submitted"]
        assert len(run_ids) == RUNS
        await wait_until(
            f"{progress} stage starts in the side file",
            lambda: len(side_lines(side)) >= progress,
            timeout=15,
        )
        await proc.sigkill()
    finally:
        await proc.cleanup()
    kill = snapshot_after_kill(db, side, proc.pid)
    assert sorted(kill.runs) == sorted(run_ids)
    return kill


async def recover_here_and_check(
    db: Path,
    side: Path,
    run_ids: list[str],
    kills: list[Kill],
    on_open: Callable[[ws.Engine], Awaitable[None]] | None = None,
    linger: float = 0.0,
) -> None:
    """Recover in this process, wait for every run, then check the journal and side file.

    `on_open` runs right after the engine opened (and claimed what it recovers); `linger`
    seconds pass after the runs finished before the journal is read.
    """
    workload.configure(side)
    async with ws.Engine.open(db, pipelines=workload.PIPELINES) as engine:
        if on_open is not None:
            await on_open(engine)
        runs = {run_id: await engine.wait(run_id, timeout=20) for run_id in run_ids}
        await asyncio.sleep(linger)
        histories = {run_id: await engine.history(run_id) for run_id in run_ids}
        succeeded = [r.run_id async for r in engine.iter_runs(status="succeeded")]
        assert sorted(succeeded) == sorted(run_ids)
        assert await engine.list(status="running") == []
        assert engine.active_runs == []

    # Every run succeeded with the right output, each stage committed exactly once.
    for run_id, run in runs.items():
        n = run.input["n"]
        expected = workload.expected_steps(n)
        assert run.status == "succeeded", (run_id, run.status, run.error)
        assert run.output == expected["summary"]
        history = histories[run_id]
        assert [t.seq for t in history] == list(range(1, len(history) + 1))
        assert history[0].event == "created"
        assert history[-1].event == "completed"
        assert [t.event for t in history].count("completed") == 1
        results = [(t.stage_index, t.payload) for t in history if t.event == "succeeded"]
        assert results == [(i, expected[name]) for i, name in enumerate(STAGES)], run_id
        assert not [t for t in history if t.event in ("failed", "cancelled", "retrying")]

    # A run still running at a kill and owned by the killed process was recovered from it
    # once, where it stood. (A recovering engine claims a run only when it has a slot for it,
    # so a run may still belong to the first dead process at the second kill.)
    for run_id in run_ids:
        recovered = [t for t in histories[run_id] if t.event == "recovered"]
        interrupted = [
            k
            for k in kills
            if k.runs[run_id][0] == "running" and f":{k.pid}:" in (k.runs[run_id][2] or "")
        ]
        assert len(recovered) == len(interrupted), (run_id, recovered, interrupted)
        for event, kill in zip(recovered, interrupted, strict=True):
            _, index, owner = kill.runs[run_id]
            assert event.stage_index == index, (run_id, event, index)
            assert event.payload == {"previous_owner": owner}
    assert any(k.runs[r][0] == "running" for k in kills for r in run_ids), "nothing to recover"

    # Real executions, from the side file.
    lines = side_lines(side)
    count = executions(lines)
    starts: dict[tuple[str, int], list[int]] = collections.defaultdict(list)
    for position, words in enumerate(lines):
        if words[2] == "start":
            starts[(words[0], STAGES.index(words[1]))].append(position)
    reran = 0
    for run_id in run_ids:
        extra = 0
        for i, name in enumerate(STAGES):
            seen = starts[(run_id, i)]
            assert seen, f"{run_id} stage {name} never executed"
            for kill in kills:
                if (run_id, i) in kill.committed:
                    after = [p for p in seen if p >= kill.side_lines]
                    assert not after, (
                        f"{run_id} stage {name} committed before kill of {kill.pid} "
                        f"but executed again afterwards ({count[(run_id, name)]} executions)"
                    )
            if len(seen) > 1:
                # Only the stage in flight at a kill may run again, once per kill.
                in_flight = [
                    k
                    for k in kills
                    if k.runs[run_id][:2] == ("running", i) and any(p < k.side_lines for p in seen)
                ]
                assert len(seen) <= 1 + len(in_flight), (
                    f"{run_id} stage {name} executed {len(seen)} times; in flight at "
                    f"{len(in_flight)} kill(s)"
                )
                extra += len(seen) - 1
        assert extra <= len(kills), f"{run_id}: {extra} re-executions for {len(kills)} kill(s)"
        reran += extra
    assert reran >= 1, "no stage was in flight at the kill: the test did not kill mid-stage"

    assert integrity(db) == [("ok",)]


@pytest.mark.parametrize("durability", ["full", "normal"])
async def test_sigkill_mid_stage_recovers(tmp_path: Path, durability: str) -> None:
    """`durability="normal"` too is documented to lose nothing on a process crash."""
    db, side = tmp_path / "runs.db", tmp_path / "side.log"
    kill = await submit_and_kill(tmp_path, db, side, progress=35, durability=durability)
    statuses = collections.Counter(status for status, _, _ in kill.runs.values())
    assert statuses["running"] >= 3, statuses
    await recover_here_and_check(db, side, sorted(kill.runs), [kill])


async def test_sigkill_twice_recovering_process_killed_too(tmp_path: Path) -> None:
    """The process that recovers is itself killed mid-stage; a third process finishes."""
    db, side = tmp_path / "runs.db", tmp_path / "side.log"
    kills = [await submit_and_kill(tmp_path, db, side, progress=25)]
    run_ids = sorted(kills[0].runs)

    second = await spawn(tmp_path, "recover", str(db), str(side), "--concurrency", "4", "--hang")
    try:
        recovering = (await second.message())["recovering"]
        assert sorted(recovering) == sorted(
            r for r, (status, _, _) in kills[0].runs.items() if status == "running"
        )
        target = kills[0].side_lines + 15
        await wait_until(
            "15 more stage starts by the recovering process",
            lambda: len(side_lines(side)) >= target,
            timeout=15,
        )
        await second.sigkill()
    finally:
        await second.cleanup()
    kills.append(snapshot_after_kill(db, side, second.pid))
    assert any(status == "running" for status, _, _ in kills[1].runs.values())

    await recover_here_and_check(db, side, run_ids, kills)


def sigstop_outside_a_transaction(pid: int, db: Path) -> None:
    """SIGSTOP `pid`, but not while it holds SQLite's write lock (a frozen writer would block
    every other process: SQLite's nature, not what this test is about)."""
    for _ in range(100):
        os.kill(pid, signal.SIGSTOP)
        conn = sqlite3.connect(db, timeout=0)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
            return
        except sqlite3.OperationalError:
            os.kill(pid, signal.SIGCONT)
        finally:
            conn.close()
    raise AssertionError("could not stop the workload outside a write transaction")


async def test_sigstop_lease_expires_stale_owner_is_fenced(tmp_path: Path) -> None:
    """A process that hangs (SIGSTOP) keeps its pid but its leases expire, so another
    process takes its runs over. When the hung process continues, its stages in flight
    cannot commit (the guard says the run is no longer its) and it starts nothing new."""
    db, side = tmp_path / "runs.db", tmp_path / "side.log"
    runs = 6
    a = await spawn(
        tmp_path,
        "submit-many",
        str(db),
        str(side),
        "--count",
        str(runs),
        "--lease-ttl",
        "1.0",
        "--hang",
    )
    try:
        run_ids: list[str] = (await a.message())["submitted"]
        await wait_until(
            "8 stage starts in the side file", lambda: len(side_lines(side)) >= 8, timeout=15
        )
        sigstop_outside_a_transaction(a.pid, db)
        stop = snapshot_after_kill(db, side, a.pid)
        running = sorted(r for r, (status, _, _) in stop.runs.items() if status == "running")
        assert running, "every run finished before the stop"

        def expired() -> bool:
            ((latest,),) = query(db, "SELECT max(lease_expires) FROM runs WHERE status = 'running'")
            return latest is None or latest < time.time()

        await wait_until("the hung process's leases to expire", expired, timeout=10)

        async def take_over_then_wake_a(engine: ws.Engine) -> None:
            assert sorted(engine.active_runs) == running  # being claimed from a live owner

            def claimed() -> bool:
                owners = query(
                    db,
                    "SELECT lease_owner FROM runs WHERE run_id IN "
                    f"({', '.join('?' * len(running))}) AND status = 'running'",
                    tuple(running),
                )
                return all(owner == engine.owner for (owner,) in owners)

            # Wake A only once the claims are committed: until then its expired leases are
            # still its own, and it may rightly go on (nobody took the runs yet).
            await wait_until("the claims to be committed", claimed, timeout=10)
            os.kill(a.pid, signal.SIGCONT)

        # Linger so that A's stale stages finish their sleep and try to commit.
        await recover_here_and_check(
            db, side, run_ids, [stop], on_open=take_over_then_wake_a, linger=0.6
        )
        assert a.proc.returncode is None, f"the woken process died:\n{a.stderr()}"
    finally:
        await a.cleanup()
    woken = [w for w in side_lines(side)[stop.side_lines :] if w[3] == str(a.pid)]
    assert woken == [], "the stale owner started stages after it lost its leases"
    assert "Traceback" not in a.stderr(), a.stderr()


# -- retries: killed while waiting out a backoff ---------------------------------------------


@dataclass
class RetryOutcome:
    run: ws.Run
    history: list[ws.Transition]
    attempts: list[int]
    """Attempt numbers the flaky stage recorded, in order, across both processes."""
    attempts_before_kill: list[int]
    settle_runs: int


async def kill_during_backoff_then_recover(tmp_path: Path) -> RetryOutcome:
    db, side = tmp_path / "runs.db", tmp_path / "side.log"
    proc = await spawn(
        tmp_path,
        "start",
        str(db),
        str(side),
        "--pipeline",
        workload.flakies.name,
        "--n",
        "5",
        "--run-id",
        "flaky-1",
        "--no-wait",
        "--hang",
    )
    try:
        run_id = (await proc.message())["run_id"]
        await wait_until(
            "the first `retrying` row",
            lambda: bool(
                query(
                    db,
                    "SELECT 1 FROM journal WHERE event = 'retrying' AND run_id = ?",
                    (run_id,),
                )
            ),
            timeout=15,
        )
        await proc.sigkill()
    finally:
        await proc.cleanup()

    assert integrity(db) == [("ok",)]
    before = [int(w[3]) for w in side_lines(side) if w[1] == "flaky"]
    retrying = query(
        db, "SELECT attempt FROM journal WHERE run_id = ? AND event = 'retrying'", (run_id,)
    )
    assert retrying == [(1,)], "the kill was meant to land in the first backoff"

    workload.configure(side)
    async with ws.Engine.open(db, pipelines=workload.PIPELINES) as engine:
        run = await engine.wait(run_id, timeout=20)
        history = await engine.history(run_id)
    lines = side_lines(side)
    return RetryOutcome(
        run=run,
        history=history,
        attempts=[int(w[3]) for w in lines if w[1] == "flaky"],
        attempts_before_kill=before,
        settle_runs=executions(lines)[(run_id, "settle")],
    )


async def test_sigkill_during_retry_backoff(tmp_path: Path) -> None:
    out = await kill_during_backoff_then_recover(tmp_path)
    assert out.attempts_before_kill == [1], "killed during the first backoff, before attempt 2"
    assert out.run.status == "succeeded", out.run.error
    assert out.run.output == (5 + 100) * 2
    # The attempt count carried across the crash: attempt 1 is not repeated, 2 failed, 3 won.
    assert out.attempts == [1, 2, 3]
    events = [(t.event, t.stage_path, t.attempt) for t in out.history if t.stage_index == 0]
    assert [e for e in events if e[0] == "retrying"] == [
        ("retrying", "flaky", 1),
        ("retrying", "flaky", 2),
    ]
    assert [e for e in events if e[0] == "succeeded"] == [("succeeded", "flaky", 3)]
    assert [t.event for t in out.history].count("recovered") == 1
    errors = [t.error for t in out.history if t.event == "retrying"]
    assert all(e is not None and e.type == "RuntimeError" for e in errors)
    assert out.settle_runs == 1


async def test_backoff_schedule_continues_after_recovery(tmp_path: Path) -> None:
    """`Retry` documents the wait before attempt n+1 as backoff * multiplier ** (n - 1).
    A crash must not reset that schedule: after attempt 2 fails (in the recovering
    process) the wait is backoff * multiplier, as it would have been without the crash."""
    out = await kill_during_backoff_then_recover(tmp_path)
    waits = {t.attempt: t.payload["wait"] for t in out.history if t.event == "retrying"}
    expected = {
        1: workload.FLAKY_BACKOFF,
        2: workload.FLAKY_BACKOFF * workload.FLAKY_MULTIPLIER,
    }
    assert waits == expected
    assert out.run.status == "succeeded"


# -- child runs: the parent's process dies while its children run ----------------------------


async def test_sigkill_during_map_children(tmp_path: Path) -> None:
    """A parent stage fans out to child runs; the process is killed with some children done,
    some mid-stage and some not launched. After recovery the parent's stage runs again and
    finds its children by key: none is launched twice, a finished child does not run again,
    and the parent's output is the same as without the crash."""
    db, side = tmp_path / "runs.db", tmp_path / "side.log"
    count = workload.FLEET_CHILDREN
    proc = await spawn(
        tmp_path,
        "start",
        str(db),
        str(side),
        "--pipeline",
        workload.fleet.name,
        "--n",
        str(count),
        "--run-id",
        "fleet-1",
        "--no-wait",
        "--hang",
    )
    try:
        parent_id = (await proc.message())["run_id"]

        def children_done(n: int) -> Callable[[], bool]:
            return lambda: len([w for w in side_lines(side) if w[1] == "report"]) >= n

        # Three children have reached their last stage: some done, others in flight.
        await wait_until("3 children at their last stage", children_done(3), timeout=15)
        await proc.sigkill()
    finally:
        await proc.cleanup()
    kill = snapshot_after_kill(db, side, proc.pid)
    children_at_kill = {
        run_id: status
        for run_id, status in query(
            db, "SELECT run_id, status FROM runs WHERE parent_run_id = ?", (parent_id,)
        )
    }
    assert "running" in children_at_kill.values(), children_at_kill
    assert len(children_at_kill) < count or "succeeded" in children_at_kill.values()

    workload.configure(side)
    async with ws.Engine.open(db, pipelines=workload.PIPELINES) as engine:
        parent = await engine.wait(parent_id, timeout=20)
        history = await engine.history(parent_id)
        children = await engine.list(parent_run_id=parent_id, limit=100)
        child_histories = {c.run_id: await engine.history(c.run_id) for c in children}

    assert parent.status == "succeeded", parent.error
    assert parent.output == sum(workload.expected_fleet(count))
    results = [(t.stage_index, t.payload) for t in history if t.event == "succeeded"]
    assert results == [(0, workload.expected_fleet(count)), (1, parent.output)]
    assert [t.event for t in history].count("recovered") == 1

    # Exactly one child per item, each succeeded once, the ones alive at the kill recovered.
    assert sorted(c.input["k"] for c in children) == list(range(count)), [
        (c.run_id, c.input) for c in children
    ]
    for child in children:
        k = child.input["k"]
        assert child.status == "succeeded" and child.output == k * k + 1, child
        rows = child_histories[child.run_id]
        assert [(t.stage_index, t.payload) for t in rows if t.event == "succeeded"] == [
            (0, k * k),
            (1, k * k + 1),
        ]
        recovered = [t for t in rows if t.event == "recovered"]
        expected = 1 if children_at_kill.get(child.run_id) == "running" else 0
        assert len(recovered) == expected, (child.run_id, children_at_kill.get(child.run_id))

    # Executions: the parent's stage re-entered once; no committed child stage ran again.
    lines = side_lines(side)
    count_of = executions(lines)
    assert executions(lines, "enter")[(parent_id, "fan_out")] == 2
    assert count_of[(parent_id, "tally")] == 1
    stage_names = [s.name for s in workload.probe.stages]
    for child in children:
        for i, name in enumerate(stage_names):
            seen = [p for p, w in enumerate(lines) if w[0] == child.run_id and w[1] == name]
            assert seen, f"child {child.run_id} stage {name} never ran"
            if (child.run_id, i) in kill.committed:
                assert len(seen) == 1 and seen[0] < kill.side_lines, (child.run_id, name)
            elif len(seen) > 1:
                assert len(seen) == 2 and kill.runs[child.run_id][:2] == ("running", i), (
                    child.run_id,
                    name,
                    seen,
                )
    assert integrity(db) == [("ok",)]
