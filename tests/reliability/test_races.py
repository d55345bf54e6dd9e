"""Races: concurrent resumes (tasks, engines, processes), cancel against resume, two engines
recovering one abandoned run, and a stage that finishes after its lease was taken over.

Each race has exactly one winner, the losers get a clear `ws.WaystationError`, and the
journal keeps its invariants (`support.check_journal`). Orderings are forced with events
and bounded waits; interleavings are varied with a number of event-loop checkpoints.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

import waystation as ws

from . import pipelines
from .pipelines import Decision
from .support import (
    SAFETY,
    check_all,
    check_journal,
    count_events,
    events,
    integrity,
    journal,
    query,
    run_row,
    spawn,
    stage_counts,
    wait_until,
)

RACES = collections.Counter[str]()
"""How many races of each kind ran (printed at the end, for RELIABILITY.md)."""


@pytest.fixture(scope="module", autouse=True)
def _report_races() -> Any:
    yield
    print("\nraces run:", dict(RACES))


async def checkpoints(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


# -- concurrent resume ------------------------------------------------------------------------


def counted_approvals(calls: collections.Counter[str]) -> ws.Pipeline:
    @ws.stage
    async def prep(n: int) -> int:
        return n + 1

    gate = ws.gate("approval", schema=Decision)

    @ws.stage
    async def after(prep: int, approval: Decision, ctx: ws.StageContext) -> str:
        calls[ctx.run_id] += 1
        await asyncio.sleep(0)
        return f"{prep} by {approval.by}"

    return ws.Pipeline("race-resume", [prep, gate, after])


@pytest.mark.parametrize("engines", [1, 2])
async def test_fifty_concurrent_resumes_of_one_pause(db: Path, engines: int) -> None:
    """50 tasks (on one engine, or split over two engines on one file) resume one pause:
    exactly one wins, 49 get NotPaused, one `resumed` row, the next stage runs once."""
    calls: collections.Counter[str] = collections.Counter()
    p = counted_approvals(calls)
    rounds, racers = 5, 50
    async with (
        ws.Engine.open(db, pipelines=[p]) as e1,
        ws.Engine.open(db, pipelines=[p]) as e2,
    ):
        pool = [e1, e2][:engines]
        for k in range(rounds):
            run = await e1.start(p, {"n": k}, timeout=SAFETY)
            assert run.status == "paused"
            before = journal(db, run.run_id)

            async def racer(j: int, run_id: str = run.run_id) -> ws.Run:
                await checkpoints(j % 7)
                engine = pool[j % len(pool)]
                return await engine.resume(
                    run_id, {"approved": True, "by": f"r{j}"}, timeout=SAFETY
                )

            with anyio.fail_after(SAFETY * 2):
                results = await asyncio.gather(
                    *(racer(j) for j in range(racers)), return_exceptions=True
                )
            RACES[f"resume x{racers} ({engines} engine(s))"] += 1
            winners = [r for r in results if isinstance(r, ws.Run)]
            losers = [r for r in results if isinstance(r, ws.NotPaused)]
            others = [r for r in results if not isinstance(r, ws.Run | ws.NotPaused)]
            assert not others, others
            assert len(winners) == 1 and len(losers) == racers - 1
            (won,) = winners
            assert won.status == "succeeded", won.error
            by = won.output.rsplit(" ", 1)[-1]
            assert won.output == f"{(k + 1)} by {by}"
            rows = check_journal(db, run.run_id)
            assert rows[: len(before)] == before
            assert count_events(db, run.run_id, "resumed") == 1
            assert calls[run.run_id] == 1
            # The winner's answer is the one committed as the gate's output.
            gate_rows = [r for r in rows if r[2] == "succeeded" and r[1] == 1]
            assert json.loads(gate_rows[0][4]) == {"approved": True, "by": by}
    assert integrity(db) == [("ok",)]


async def test_resume_while_other_tasks_read_sees_its_own_commit(db: Path) -> None:
    """A service lists runs (say, for a dashboard) while it resumes paused ones: every
    resumed run must continue with the gate's answer it just committed.

    Found by the race above: the driver that continues a resumed run is built from two
    reads (the journal, then the run row). When another task's read is still open on the
    store's shared reader connection, the journal read sees a snapshot from before the
    resume's commit (the gate's answer is missing) while the row read sees after it, and the
    next stage gets None instead of the answer.
    """
    seen: list[Any] = []

    @ws.stage
    async def prep(n: int) -> int:
        return n + 1

    @ws.stage
    async def after(prep: int, approval: Decision) -> str:
        seen.append(approval)
        return f"{prep} by {approval.by}"

    p = ws.Pipeline("race-read", [prep, ws.gate("approval", schema=Decision), after])
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        runs = [await engine.start(p, {"n": k}, timeout=SAFETY) for k in range(100)]
        stop = anyio.Event()

        async def dashboard() -> None:
            while not stop.is_set():
                await engine.list(limit=50)

        readers = [asyncio.create_task(dashboard()) for _ in range(4)]
        try:
            finals = []
            for run in runs:
                finals.append(
                    await engine.resume(run.run_id, {"approved": True, "by": "ann"}, timeout=SAFETY)
                )
        finally:
            stop.set()
            await asyncio.gather(*readers)
    RACES["resume under concurrent reads"] += len(runs)
    failed = [(r.run_id, r.error.message if r.error else None) for r in finals if r.error]
    assert not failed, f"{len(failed)} of {len(runs)} resumed runs failed: {failed[:3]}"
    assert all(isinstance(a, Decision) for a in seen), seen
    assert [r.output for r in finals] == [f"{k + 1} by ann" for k in range(len(runs))]
    check_all(db)


async def test_concurrent_resume_from_two_processes(tmp_path: Path) -> None:
    """Two processes resume one pause at the same moment: exactly one exits with success."""
    db, side, go = tmp_path / "runs.db", tmp_path / "side.log", tmp_path / "go"
    pipelines.configure(side)
    async with ws.Engine.open(db, pipelines=pipelines.PIPELINES) as engine:
        run = await engine.start(pipelines.approvals, {"n": 3}, run_id="race-1")
        assert run.status == "paused"
    children = []
    try:
        for name in ("p1", "p2"):
            value = json.dumps({"approved": True, "by": name})
            child = await spawn(
                "-m",
                "tests.reliability.procs",
                "resume",
                str(db),
                str(side),
                value,
                "race-1",
                "--go",
                str(go),
            )
            children.append(child)
        for child in children:
            assert await child.line() == "ready"
        go.touch()
        finished = [await child.finish() for child in children]
    finally:
        for child in children:
            await child.cleanup()
    RACES["resume from 2 processes"] += 1
    codes = sorted(code for code, _, _ in finished)
    assert codes == [0, 3], finished
    (winner,) = [out for code, out, _ in finished if code == 0]
    result = json.loads(winner.splitlines()[-1])
    assert result["status"] == "succeeded"
    (loser,) = [out for code, out, _ in finished if code == 3]
    assert json.loads(loser.splitlines()[-1])["result"] == "NotPaused"
    assert count_events(db, "race-1", "resumed") == 1
    assert pipelines.side_counts(side) == {("race-1", "finish"): 1}
    check_all(db)


async def test_many_runs_resumed_by_a_worker_and_a_bare_process(tmp_path: Path) -> None:
    """A worker process (with the pipelines) and a bare one (like the CLI: records the answer
    and leaves the run pending) race on 12 pauses; each run gets exactly one answer, and the
    stage after the gate runs exactly once per run once a worker has finished them all."""
    db, side, go = tmp_path / "runs.db", tmp_path / "side.log", tmp_path / "go"
    pipelines.configure(side)
    ids = [f"multi-{k:02d}" for k in range(12)]
    async with ws.Engine.open(db, pipelines=pipelines.PIPELINES) as engine:
        for k, rid in enumerate(ids):
            assert (await engine.start(pipelines.approvals, {"n": k}, run_id=rid)).pause
    children = []
    try:
        for name, extra in (("worker", []), ("bare", ["--bare"])):
            value = json.dumps({"approved": True, "by": name})
            children.append(
                await spawn(
                    "-m",
                    "tests.reliability.procs",
                    "resume",
                    str(db),
                    str(side),
                    value,
                    *ids,
                    "--go",
                    str(go),
                    *extra,
                )
            )
        for child in children:
            assert await child.line() == "ready"
        go.touch()
        finished = [await child.finish() for child in children]
    finally:
        for child in children:
            await child.cleanup()
    RACES["resume from worker vs bare process"] += len(ids)
    results: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
    for (code, out, err), name in zip(finished, ("worker", "bare"), strict=True):
        assert code in (0, 3, 4), err
        for line in out.splitlines():
            r = json.loads(line)
            results[r["run_id"]].append((name, r["result"]))
    for rid in ids:
        outcomes = sorted(results[rid])
        assert [res for _, res in outcomes].count("won") == 1, (rid, outcomes)
        assert [res for _, res in outcomes].count("NotPaused") == 1, (rid, outcomes)
        assert count_events(db, rid, "resumed") == 1
    # Runs answered by the bare process are pending: a worker engine finishes them.
    async with ws.Engine.open(db, pipelines=pipelines.PIPELINES) as engine:
        for rid in ids:
            run = await engine.wait(rid, timeout=SAFETY)
            assert run.status == "succeeded", (rid, run.error)
            winner = next(n for n, res in results[rid] if res == "won")
            assert run.output.endswith(f"by {winner}")
    counts = pipelines.side_counts(side)
    assert counts == {(rid, "finish"): 1 for rid in ids}
    check_all(db)


# -- cancel racing resume ---------------------------------------------------------------------


def cancel_pipeline(after_gate: collections.Counter[tuple[str, str]]) -> ws.Pipeline:
    @ws.stage
    async def prep(n: int) -> int:
        return n

    gate = ws.gate("approval", schema=Decision)

    @ws.stage
    async def first(prep: int, approval: Decision, ctx: ws.StageContext) -> int:
        after_gate[(ctx.run_id, "first")] += 1
        await checkpoints(prep % 3)
        return prep + 1

    @ws.stage
    async def second(first: int, ctx: ws.StageContext) -> int:
        after_gate[(ctx.run_id, "second")] += 1
        await checkpoints(first % 2)
        return first + 1

    return ws.Pipeline("race-cancel", [prep, gate, first, second])


@pytest.mark.parametrize("engines", [1, 2])
async def test_cancel_racing_resume(db: Path, engines: int) -> None:
    """Resume and cancel of one paused run, at once, at varied offsets. Whichever wins:
    cancel first means no stage after the gate ran and resume got NotPaused; resume first
    means one `resumed` row and the run then ends cancelled or succeeded, once."""
    after_gate: collections.Counter[tuple[str, str]] = collections.Counter()
    p = cancel_pipeline(after_gate)
    outcomes: collections.Counter[str] = collections.Counter()
    async with (
        ws.Engine.open(db, pipelines=[p]) as resumer,
        ws.Engine.open(db, pipelines=[p]) as other,
    ):
        canceller = resumer if engines == 1 else other
        for k in range(40):
            run = await resumer.start(p, {"n": k}, timeout=SAFETY)
            assert run.status == "paused"
            rid = run.run_id

            async def do_resume(k: int = k, rid: str = rid) -> ws.Run:
                await checkpoints(k % 5)
                return await resumer.resume(rid, {"approved": True, "by": "r"}, timeout=SAFETY)

            async def do_cancel(k: int = k, rid: str = rid) -> ws.Run:
                await checkpoints(k * 7 % 120)
                return await canceller.cancel(rid)

            with anyio.fail_after(SAFETY * 2):
                resumed, cancelled = await asyncio.gather(
                    do_resume(), do_cancel(), return_exceptions=True
                )
                final = await resumer.wait(rid, timeout=SAFETY)
            RACES[f"cancel vs resume ({engines} engine(s))"] += 1
            for result in (resumed, cancelled):
                if isinstance(result, BaseException):
                    assert isinstance(result, ws.NotPaused | ws.InvalidRunState), repr(result)
            rows = check_journal(db, rid)
            evs = [(e, i) for _, i, e, *_ in rows]
            ran = after_gate[(rid, "first")] + after_gate[(rid, "second")]
            if isinstance(resumed, ws.NotPaused):
                outcomes["cancel won"] += 1
                assert isinstance(cancelled, ws.Run) and cancelled.status == "cancelled"
                assert final.status == "cancelled"
                assert evs[-1] == ("cancelled", 1)
                assert "resumed" not in [e for e, _ in evs]
                assert ran == 0, "a stage after the gate ran although cancel won"
            else:
                assert isinstance(resumed, ws.Run), repr(resumed)
                assert count_events(db, rid, "resumed") == 1
                assert final.status in ("cancelled", "succeeded")
                assert resumed.status == final.status
                if isinstance(cancelled, ws.InvalidRunState):
                    assert final.status == "succeeded"
                if final.status == "succeeded":
                    outcomes["resume won, run succeeded"] += 1
                    assert final.output == k + 2
                    assert stage_counts(rows) == {0: 1, 1: 1, 2: 1, 3: 1}
                else:
                    outcomes["resume won, then cancelled"] += 1
                    assert isinstance(cancelled, ws.Run)
                    cancel_at = evs[-1][1]
                    assert cancel_at is not None and cancel_at >= 2
                    # Nothing at or after the stage it was cancelled in was committed.
                    assert all(i < cancel_at for i in stage_counts(rows))
            assert (await resumer.get(rid)).status == final.status
    print(f"\ncancel vs resume outcomes ({engines} engine(s)):", dict(outcomes))
    assert sum(outcomes.values()) == 40
    check_all(db)


# -- two engines recovering one abandoned run ----------------------------------------------


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(done.stdout)


@pytest.mark.parametrize("abandoned_by", ["expired-lease", "dead-owner"])
async def test_two_engines_recover_the_same_abandoned_runs(db: Path, abandoned_by: str) -> None:
    """Runs left mid-stage by an owner that is gone are recovered by exactly one of two
    engines calling `recover()` at once: one `recovered` row each, the interrupted stage
    runs exactly once more, every stage is committed once."""
    calls: collections.Counter[tuple[str, str]] = collections.Counter()
    entered: set[str] = set()

    @ws.stage
    async def first(n: int, ctx: ws.StageContext) -> int:
        calls[(ctx.run_id, "first")] += 1
        return n + 1

    @ws.stage
    async def blocked(first: int, ctx: ws.StageContext) -> int:
        calls[(ctx.run_id, "blocked")] += 1
        if calls[(ctx.run_id, "blocked")] == 1:
            entered.add(ctx.run_id)
            await anyio.Event().wait()  # the first owner never finishes it
        return first * 2

    @ws.stage
    async def last(blocked: int, ctx: ws.StageContext) -> int:
        calls[(ctx.run_id, "last")] += 1
        return blocked + 1

    p = ws.Pipeline("race-recover", [first, blocked, last])
    n_runs = 20
    async with ws.Engine.open(db, pipelines=[p]) as first_owner:
        ids = [(await first_owner.submit(p, {"n": k})).run_id for k in range(n_runs)]
        await wait_until("every run inside its blocked stage", lambda: len(entered) == n_runs)
    # close() interrupted the stages and released the leases; make them look abandoned.
    if abandoned_by == "expired-lease":
        owner, expires = "elsewhere:1:feedface", time.time() - 5
    else:
        owner, expires = f"{socket.gethostname()}:{dead_pid()}:feedface", time.time() + 3600
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE runs SET lease_owner = ?, lease_expires = ?", (owner, expires))
    conn.close()
    async with (
        ws.Engine.open(db, pipelines=[p], recover=False) as e1,
        ws.Engine.open(db, pipelines=[p], recover=False) as e2,
    ):
        launched = await asyncio.gather(e1.recover(), e2.recover(), e1.recover())
        assert sum(launched) >= n_runs
        with anyio.fail_after(SAFETY):
            for k, rid in enumerate(ids):
                run = await e1.wait(rid)
                assert run.status == "succeeded", run.error
                assert run.output == (k + 1) * 2 + 1
    RACES[f"2 engines recover ({abandoned_by})"] += n_runs
    for rid in ids:
        rows = check_journal(db, rid)
        assert count_events(db, rid, "recovered") == 1, events(db, rid)
        assert calls[(rid, "blocked")] == 2, "the interrupted stage ran more than once more"
        assert calls[(rid, "first")] == 1 and calls[(rid, "last")] == 1
        assert stage_counts(rows) == {0: 1, 1: 1, 2: 1}
        recovered = next(r for r in rows if r[2] == "recovered")
        assert json.loads(recovered[4]) == {"previous_owner": owner}
    check_all(db)


# -- a stage finishing after its lease was taken over ----------------------------------------


async def test_stage_finishing_after_its_lease_was_stolen_writes_nothing(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The lease of a running run is moved to another owner (as a recovering engine would)
    while a stage runs; when the stage finishes, the old driver's commit is refused and it
    writes nothing more."""
    entered, release, finished = anyio.Event(), anyio.Event(), anyio.Event()

    @ws.stage
    async def slow(n: int) -> int:
        entered.set()
        await release.wait()
        finished.set()
        return n + 1

    @ws.stage
    async def after(slow: int) -> int:
        return slow + 1

    p = ws.Pipeline("race-stolen", [slow, after])
    async with ws.Engine.open(db, pipelines=[p], lease_ttl=60) as engine:
        run = await engine.submit(p, {"n": 1})
        with anyio.fail_after(SAFETY):
            await entered.wait()
        with sqlite3.connect(db) as conn:
            conn.execute(
                "UPDATE runs SET lease_owner = 'thief:1:0', lease_expires = ? WHERE run_id = ?",
                (time.time() + 3600, run.run_id),
            )
        conn.close()
        before_rows, before_row = journal(db, run.run_id), run_row(db, run.run_id)
        release.set()
        with anyio.fail_after(SAFETY):
            await finished.wait()
        await wait_until("the old driver to stop", lambda: run.run_id not in engine.active_runs)
        # The engine keeps serving, and does not take the run back.
        assert (await engine.recover()) == 0
    RACES["stage finishing after lease stolen"] += 1
    assert journal(db, run.run_id) == before_rows
    after_row = run_row(db, run.run_id)
    assert after_row is not None and before_row is not None
    assert after_row["lease_owner"] == "thief:1:0"
    assert {k: v for k, v in after_row.items() if k != "updated_at"} == {
        k: v for k, v in before_row.items() if k != "updated_at"
    }
    assert any(
        run.run_id in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
    ), "the old driver stopped without a word"


@pytest.mark.parametrize("old_finishes", ["before-new-driver", "after-new-driver"])
async def test_old_driver_loses_to_the_engine_that_recovered_its_run(
    db: Path, old_finishes: str
) -> None:
    """Engine A's lease expires while its stage runs; engine B recovers the run and runs the
    stage again. A's stage then finishes (before or after B's): A's commit is refused, the
    journal holds B's result only, once."""
    a_entered, a_release = anyio.Event(), anyio.Event()
    b_entered, b_release = anyio.Event(), anyio.Event()
    calls = 0

    @ws.stage
    async def work(n: int) -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            a_entered.set()
            await a_release.wait()
            return "from-A"
        b_entered.set()
        await b_release.wait()
        return "from-B"

    @ws.stage
    async def tail(work: str) -> str:
        return work.upper()

    p = ws.Pipeline("race-takeover", [work, tail])
    async with (
        ws.Engine.open(db, pipelines=[p], lease_ttl=60) as a,
        ws.Engine.open(db, pipelines=[p], lease_ttl=60, recover=False) as b,
    ):
        run = await a.submit(p, {"n": 1})
        with anyio.fail_after(SAFETY):
            await a_entered.wait()
        with sqlite3.connect(db) as conn:  # A's lease runs out (A missed its renewals)
            conn.execute(
                "UPDATE runs SET lease_expires = ? WHERE run_id = ?", (time.time() - 1, run.run_id)
            )
        conn.close()
        assert await b.recover() == 1
        with anyio.fail_after(SAFETY):
            await b_entered.wait()
        if old_finishes == "before-new-driver":
            a_release.set()
            await wait_until("A's driver to stop", lambda: run.run_id not in a.active_runs)
            assert [e for e, _ in events(db, run.run_id)][-1] == "recovered"
            b_release.set()
        else:
            b_release.set()
            done = await b.wait(run.run_id, timeout=SAFETY)
            assert done.status == "succeeded"
            a_release.set()
            await wait_until("A's driver to stop", lambda: run.run_id not in a.active_runs)
        done = await b.wait(run.run_id, timeout=SAFETY)
    RACES[f"old driver vs recovering engine ({old_finishes})"] += 1
    assert done.status == "succeeded" and done.output == "FROM-B"
    rows = check_journal(db, run.run_id)
    assert stage_counts(rows) == {0: 1, 1: 1}
    (work_row,) = [r for r in rows if r[2] == "succeeded" and r[1] == 0]
    assert json.loads(work_row[4]) == "from-B"
    assert count_events(db, run.run_id, "recovered") == 1
    owners = query(db, "SELECT lease_owner FROM runs WHERE run_id = ?", (run.run_id,))
    assert owners == [(None,)]
