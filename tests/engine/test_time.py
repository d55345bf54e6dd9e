"""Durable time and rollback through the public API, with a manual clock: sleeps that
survive a restart, scheduled starts, pause expiry, compensation (also across a crash)."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import textwrap
from collections import Counter
from contextlib import closing
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

import waystation as ws
from tests.killing import run_and_kill

DAY = 86_400.0
calls: Counter[str] = Counter()


@ws.stage
async def prepare(n: int) -> int:
    calls["prepare"] += 1
    return n + 1


@ws.stage
async def finish(prepare: int) -> str:
    calls["finish"] += 1
    return f"done {prepare}"


napping = ws.Pipeline("napping", [prepare, ws.sleep_stage("nap", timedelta(days=2)), finish])


async def _until(engine: ws.Engine, run_id: str, *statuses: str) -> ws.Run:
    """Poll the committed status (the timer acts in the engine's own task)."""
    with anyio.fail_after(10):
        while True:
            run = await engine.get(run_id)
            if run.status in statuses:
                return run
            await anyio.sleep(0.01)


async def _settled(engine: ws.Engine, run_id: str) -> ws.Run:
    return await _until(engine, run_id, "succeeded", "failed", "cancelled")


def test_one_manual_clock_serves_engines_in_two_event_loops(tmp_path: Path) -> None:
    """A test suite may keep one clock while each test runs in an event loop of its own."""
    clock = ws.ManualClock(start=1_000_000.0)

    async def nap_through(db: Path) -> ws.Run:
        async with ws.Engine.open(db, pipelines=[napping], clock=clock) as engine:
            run = await engine.submit(napping, {"n": 1})
            await _until(engine, run.run_id, "pending")
            clock.advance(2 * DAY)
            return await _settled(engine, run.run_id)

    calls.clear()
    first = asyncio.run(nap_through(tmp_path / "first.db"))
    second = asyncio.run(nap_through(tmp_path / "second.db"))  # a new loop, the same clock
    assert (first.status, second.status) == ("succeeded", "succeeded")
    assert calls == Counter({"prepare": 2, "finish": 2})


async def test_a_sleep_survives_a_restart_and_wakes_on_time(db: Path) -> None:
    calls.clear()
    clock = ws.ManualClock(start=1_000_000.0)
    async with ws.Engine.open(db, pipelines=[napping], clock=clock) as engine:
        run = await engine.submit(napping, {"n": 1})
        await _until(engine, run.run_id, "pending")
        parked = await engine.get(run.run_id)
        assert parked.stage_name == "nap" and engine.active_runs == []
        clock.advance(DAY)  # a day passes; then the process stops
    with sqlite3.connect(db) as conn:
        wake_at = conn.execute("SELECT wake_at FROM runs").fetchone()[0]
    assert wake_at == 1_000_000.0 + 2 * DAY
    clock2 = ws.ManualClock(start=1_000_000.0 + DAY)  # a new process, a day later
    async with ws.Engine.open(db, pipelines=[napping], clock=clock2) as engine:
        clock2.advance(DAY - 60)
        await anyio.sleep(0.05)
        assert (await engine.get(run.run_id)).status == "pending"  # not yet: one minute left
        clock2.advance(60)
        done = await _settled(engine, run.run_id)
        assert done.status == "succeeded" and done.output == "done 2"
        events = [t.event for t in await engine.history(run.run_id)]
    assert events.count("sleeping") == 1 and events.count("woke") == 1
    assert calls == Counter({"prepare": 1, "finish": 1})


async def test_cancelling_a_sleeping_run_cancels_it_at_once(db: Path) -> None:
    """Nobody drives a sleeping run: cancel settles it now, not when it would have woken."""
    calls.clear()
    clock = ws.ManualClock(start=1_000_000.0)
    async with ws.Engine.open(db, pipelines=[napping], clock=clock) as engine:
        run = await engine.submit(napping, {"n": 1})
        await _until(engine, run.run_id, "pending")
        cancelled = await engine.cancel(run.run_id)
        assert cancelled.status == "cancelled" and not cancelled.cancel_requested
        clock.advance(3 * DAY)
        await anyio.sleep(0.05)
        assert (await engine.get(run.run_id)).status == "cancelled"
        events = [(t.event, t.stage_index) for t in await engine.history(run.run_id)]
    assert events[-2:] == [("sleeping", 1), ("cancelled", 1)]
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT wake_at, lease_owner FROM runs").fetchone() == (None, None)
    assert calls == Counter({"prepare": 1})


@ws.stage
async def polls(n: int, ctx: ws.StageContext) -> int:
    calls["before"] += 1
    await ctx.sleep(30)
    calls["after"] += 1
    return n * 2


async def test_ctx_sleep_reenters_the_stage_after_waking(db: Path) -> None:
    calls.clear()
    clock = ws.ManualClock(start=5_000.0)
    pipe = ws.Pipeline("polling", [polls])
    async with ws.Engine.open(db, pipelines=[pipe], clock=clock) as engine:
        run = await engine.submit(pipe, {"n": 4})
        await _until(engine, run.run_id, "pending")
        clock.advance(30)
        done = await _settled(engine, run.run_id)
    assert done.output == 8
    assert calls == Counter({"before": 2, "after": 1})


async def test_a_run_scheduled_for_later_starts_then(db: Path) -> None:
    calls.clear()
    clock = ws.ManualClock(start=10_000.0)
    pipe = ws.Pipeline("later", [prepare, finish])
    async with ws.Engine.open(db, pipelines=[pipe], clock=clock) as engine:
        run = await engine.submit(pipe, {"n": 0}, not_before=10_000.0 + 3600)
        assert run.status == "pending"
        await anyio.sleep(0.05)
        assert calls["prepare"] == 0
        clock.advance(3600)
        done = await _settled(engine, run.run_id)
    assert done.status == "succeeded" and done.output == "done 1"


@pytest.mark.parametrize(
    "when", [float("nan"), float("inf"), True, "2030-01-01", 1_800_000_000_000, 10**30]
)
async def test_a_start_time_that_is_not_one_is_refused(db: Path, when: Any) -> None:
    """Before, NaN and True started the run at once, infinity parked it for ever, a time in
    milliseconds parked it for 50,000 years, and a string or a huge int raised a bare
    TypeError or OverflowError."""
    pipe = ws.Pipeline("later", [prepare, finish])
    async with ws.Engine.open(db, pipelines=[pipe]) as engine:
        with pytest.raises(ws.InvalidInput, match="not_before must be a datetime or a Unix"):
            await engine.submit(pipe, {"n": 0}, not_before=when)
        assert await engine.list() == []


class Approval(msgspec.Struct):
    approved: bool


@ws.stage
async def act(approval: Approval) -> str:
    return "approved" if approval.approved else "declined"


strict = ws.Pipeline(
    "strict", [ws.gate("approval", schema=Approval, expires_after=timedelta(days=3)), act]
)
lenient = ws.Pipeline(
    "lenient",
    [
        ws.gate("approval", schema=Approval, expires_after=3 * DAY, on_expire={"approved": False}),
        act,
    ],
)


async def test_an_expired_pause_fails_the_run(db: Path) -> None:
    clock = ws.ManualClock(start=0.0)
    async with ws.Engine.open(db, pipelines=[strict], clock=clock) as engine:
        run = await engine.start(strict)
        assert run.status == "paused" and run.pause is not None
        assert run.pause.expires_at == 3 * DAY
        clock.advance(3 * DAY - 1)
        await anyio.sleep(0.05)
        assert (await engine.get(run.run_id)).status == "paused"
        clock.advance(1)
        done = await _settled(engine, run.run_id)
        assert done.status == "failed" and done.error is not None
        assert done.error.type == "waystation.errors.PauseExpired"
        with pytest.raises(ws.NotPaused):
            await engine.resume(run.run_id, {"approved": True})


async def test_an_expired_pause_goes_on_with_its_default_once(db: Path) -> None:
    clock = ws.ManualClock(start=0.0)
    async with (
        ws.Engine.open(db, pipelines=[lenient], clock=clock) as one,
        ws.Engine.open(db, pipelines=[lenient], clock=clock) as two,
    ):
        run = await one.start(lenient)
        clock.advance(3 * DAY)
        done = await _settled(two, run.run_id)
        assert done.status == "succeeded" and done.output == "declined"
        events = [t.event for t in await two.history(run.run_id)]
    assert events.count("expired") == 1 and events.count("resumed") == 1


async def test_a_last_stage_gate_that_expires_with_its_default_removes_the_workspace(
    db: Path, tmp_path: Path
) -> None:
    """The expiry's commit finishes the run, with no driver after it: before, the
    workspace of the succeeded root stayed. The timers are fired here, at the expiry,
    rather than by moving the clock: the clean-up then has happened when `fire` returns."""
    workspaces: list[Path] = []

    @ws.stage
    async def draft(ctx: ws.StageContext) -> int:
        workspaces.append(ctx.workspace)
        (ctx.workspace / "draft.txt").write_text("x")
        return 1

    gate = ws.gate("approve", schema=bool, expires_after=DAY, on_expire=False)
    p = ws.Pipeline("last-gate-expires", [draft, gate])
    clock = ws.ManualClock(start=0.0)
    async with ws.Engine.open(
        db, pipelines=[p], clock=clock, workspace_root=tmp_path / "spaces"
    ) as engine:
        run = await engine.start(p)
        assert run.status == "paused" and (workspaces[0] / "draft.txt").exists()
        assert await engine.timers.fire(DAY) == 1
        done = await engine.get(run.run_id)
        assert done.status == "succeeded" and done.output is False
        assert not workspaces[0].exists()


async def test_an_answer_in_time_cancels_the_expiry(db: Path) -> None:
    clock = ws.ManualClock(start=0.0)
    async with ws.Engine.open(db, pipelines=[strict], clock=clock) as engine:
        run = await engine.start(strict)
        done = await engine.resume(run.run_id, {"approved": True})
        assert done.output == "approved"
        clock.advance(10 * DAY)
        await anyio.sleep(0.05)
        assert (await engine.get(run.run_id)).status == "succeeded"
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT wake_at FROM runs").fetchone()[0] is None


undone: list[str] = []


async def undo_reserve(item: str, output: str) -> None:
    undone.append(f"unreserve {output}")


def undo_charge(output: int) -> None:
    if output < 0:
        raise RuntimeError("refund failed")
    undone.append(f"refund {output}")


@ws.stage(compensate=undo_reserve)
async def reserve(item: str) -> str:
    return f"R-{item}"


@ws.stage(compensate=undo_charge)
async def charge(reserve: str, amount: int) -> int:
    return amount


@ws.stage
async def ship(charge: int) -> str:
    raise RuntimeError("no courier")


saga = ws.Pipeline("saga", [reserve, charge, ship], on_failure="compensate")


async def test_a_failed_saga_compensates_in_reverse_order(db: Path) -> None:
    undone.clear()
    async with ws.Engine.open(db, pipelines=[saga]) as engine:
        run = await engine.start(saga, {"item": "lamp", "amount": 30})
        assert run.status == "failed" and run.error is not None
        assert "no courier" in run.error.message
        events = [(t.event, t.stage_path) for t in await engine.history(run.run_id)]
    assert undone == ["refund 30", "unreserve R-lamp"]
    tail = [e for e in events if e[0].startswith("compensat")]
    assert tail == [("compensating", "ship"), ("compensated", "charge"), ("compensated", "reserve")]


async def test_a_failing_compensation_is_journaled_and_the_error_kept(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    undone.clear()
    caplog.set_level(logging.WARNING, logger="waystation")
    async with ws.Engine.open(db, pipelines=[saga]) as engine:
        run = await engine.start(saga, {"item": "vase", "amount": -5})
        assert run.status == "failed" and run.error is not None
        assert "no courier" in run.error.message
        events = [t.event for t in await engine.history(run.run_id)]
    assert "compensation_failed" in events and undone == ["unreserve R-vase"]
    assert any("compensation of charge failed" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("from_stage", [0, None])
async def test_a_compensated_run_is_not_retried_but_can_be_replayed(
    db: Path, from_stage: int | None
) -> None:
    """Its first stages' results stand for undone work (the reservation was released):
    retry refuses, naming the way out, and writes nothing; replay from stage 0 runs it all
    again, and so does a replay that names no stage (before: it reused the undone
    reservation and charge, and a new failure undid them a second time)."""
    undone.clear()
    async with ws.Engine.open(db, pipelines=[saga]) as engine:
        run = await engine.start(saga, {"item": "lamp", "amount": 30})
        assert run.status == "failed"
        before = await engine.history(run.run_id)
        with pytest.raises(ws.InvalidRunState, match=r"compensated.*replay"):
            await engine.retry(run.run_id)
        assert await engine.history(run.run_id) == before
        assert (await engine.get(run.run_id)).status == "failed"
        again = await engine.replay(run.run_id, from_stage=from_stage)
        events = [(t.event, t.stage_path) for t in await engine.history(again.run_id)]
    assert again.status == "failed"  # `ship` still has no courier
    assert ("succeeded", "reserve") in events and ("reused", "reserve") not in events
    assert undone == ["refund 30", "unreserve R-lamp"] * 2


async def test_retrying_a_run_cancelled_while_compensating_finishes_the_compensation(
    db: Path,
) -> None:
    """Cancelled in the middle of undoing `charge`: retry carries the compensation on (the
    interrupted undo runs again, as after a crash; `reserve` is undone once) and the run
    fails with its original error; after that it is a compensated run, not retried."""
    entered = anyio.Event()
    go_on = anyio.Event()
    undos: list[str] = []

    async def slow_refund(output: int) -> None:
        undos.append("refund")
        entered.set()
        await go_on.wait()

    async def unreserve(output: str) -> None:
        undos.append("unreserve")

    @ws.stage(compensate=unreserve)
    async def book(item: str) -> str:
        return f"R-{item}"

    @ws.stage(compensate=slow_refund)
    async def pay(book: str) -> int:
        return 30

    @ws.stage
    async def deliver(pay: int) -> str:
        raise RuntimeError("no courier")

    p = ws.Pipeline("saga-cancelled", [book, pay, deliver], on_failure="compensate")
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        run = await engine.submit(p, {"item": "lamp"})
        with anyio.fail_after(10):
            await entered.wait()
            cancelled = await engine.cancel(run.run_id)
        assert cancelled.status == "cancelled"
        assert undos == ["refund"]
        go_on.set()
        # Replayed, naming no stage, it starts from the first: `pay` was refunded already.
        with anyio.fail_after(10):
            replayed = await engine.replay(run.run_id)
        replay_rows = [(t.event, t.stage_path) for t in await engine.history(replayed.run_id)]
        assert ("succeeded", "book") in replay_rows and ("reused", "pay") not in replay_rows
        undos.clear()
        undos.append("refund")  # as before the replay, for the retry's count below
        with anyio.fail_after(10):
            retried = await engine.retry(run.run_id)
        assert retried.status == "failed" and retried.error is not None
        assert "no courier" in retried.error.message
        assert undos == ["refund", "refund", "unreserve"]
        with pytest.raises(ws.InvalidRunState, match="compensated"):
            await engine.retry(run.run_id)
        events = [(t.event, t.stage_path) for t in await engine.history(run.run_id)]
    assert [e for e in events if e[0] == "compensated"] == [
        ("compensated", "pay"),
        ("compensated", "book"),
    ]


async def test_a_due_run_this_engine_cannot_wake_does_not_make_its_timer_spin(
    db: Path,
) -> None:
    """A worker without the sleeping run's pipeline sees it due and leaves it (an engine
    with the pipeline will wake it): it looks again at its recheck, not in a busy loop."""
    async with ws.Engine.open(db, pipelines=[napping]) as owner:
        run = await owner.submit(napping, {"n": 1})
        await _until(owner, run.run_id, "pending")
    with sqlite3.connect(db) as conn:  # as if its two days were up
        conn.execute("UPDATE runs SET wake_at = 1.0 WHERE run_id = ?", (run.run_id,))
    conn.close()
    other = ws.Pipeline("other", [prepare])
    async with ws.Engine.open(db, pipelines=[other]) as worker:
        next_wake = worker.store.next_wake
        looks = 0

        async def counted() -> float | None:
            nonlocal looks
            looks += 1
            return await next_wake()

        worker.store.next_wake = counted  # type: ignore[method-assign]
        await anyio.sleep(0.5)
        assert (await worker.get(run.run_id)).status == "pending"
    assert looks <= 3  # before: thousands in half a second


async def test_recovery_leaves_a_parked_run_alone_on_a_manual_clock(db: Path) -> None:
    """The wake-up time is on the engine's clock, which in a test may be far from real
    time: recovery must compare with that clock too, not start the run early (nor take
    it over and park it again at every poll)."""
    clock = ws.ManualClock(start=1_000.0)  # long before real time
    async with ws.Engine.open(db, pipelines=[napping], clock=clock, poll_interval=0.02) as engine:
        run = await engine.submit(napping, {"n": 1})
        await _until(engine, run.run_id, "pending")
        await anyio.sleep(0.3)  # many recovery polls
        assert (await engine.get(run.run_id)).status == "pending"
        events = [t.event for t in await engine.history(run.run_id)]
    assert "recovered" not in events and events[-1] == "sleeping"


async def test_a_sleeping_run_whose_stored_output_no_longer_decodes_is_not_taken(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Its wake-up comes, but its state cannot be loaded: the timer leaves it as it was
    (pending, held by nobody, for an engine with the version it needs), saying why,
    instead of taking it and driving nothing."""
    clock = ws.ManualClock(start=1_000_000.0)
    async with ws.Engine.open(db, pipelines=[napping], clock=clock) as engine:
        run = await engine.submit(napping, {"n": 1})
        await _until(engine, run.run_id, "pending")
    with closing(sqlite3.connect(db)) as conn, conn:  # `prepare` returned an int
        conn.execute(
            "UPDATE transitions SET payload = '\"oops\"' WHERE run_id = ? "
            "AND event = 'succeeded' AND stage_index = 0",
            (run.run_id,),
        )
    caplog.set_level(logging.WARNING, logger="waystation")
    async with ws.Engine.open(db, pipelines=[napping], clock=clock) as engine:
        clock.advance(2 * DAY)
        await anyio.sleep(0.2)
        parked = await engine.get(run.run_id)
        assert (parked.status, engine.active_runs) == ("pending", [])
    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT lease_owner FROM runs").fetchone() == (None,)
    assert any("timer not applied" in r.getMessage() for r in caplog.records)


async def test_a_pause_of_a_run_whose_state_no_longer_loads_still_expires(db: Path) -> None:
    """Failing it by expiry needs nothing loaded: a damaged output must not keep the run
    paused past its expiry."""
    clock = ws.ManualClock(start=0.0)
    async with ws.Engine.open(db, pipelines=[strict], clock=clock) as engine:
        run = await engine.start(strict)
        assert run.status == "paused"
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute(
            "UPDATE transitions SET payload = '[1, 2]' WHERE run_id = ? AND event = 'created'",
            (run.run_id,),
        )
        conn.execute("UPDATE run_inputs SET input = '[1, 2]' WHERE run_id = ?", (run.run_id,))
    async with ws.Engine.open(db, pipelines=[strict], clock=clock) as engine:
        clock.advance(3 * DAY)
        done = await _settled(engine, run.run_id)
    assert done.status == "failed" and done.error is not None
    assert done.error.type == "waystation.errors.PauseExpired"


def test_an_expiry_default_is_checked_against_the_schema_when_the_gate_is_made() -> None:
    with pytest.raises(ws.PipelineDefinitionError, match="on_expire='maybe'"):
        ws.gate("ok", schema=bool, expires_after=60, on_expire="maybe")
    gate = ws.gate("ok", schema=bool, expires_after=60, on_expire=False)
    assert gate.expiry == (60.0, False)
    assert ws.gate("ok", schema=bool, expires_after=60).expiry == (60.0, "fail")


async def test_an_expired_pause_in_a_saga_undoes_the_stages_before_it(db: Path) -> None:
    """Failing by expiry is failing: the completed stages are compensated, last first,
    and the run is then refused a retry like any compensated run."""
    undone.clear()
    clock = ws.ManualClock(start=0.0)
    waiting = ws.Pipeline(
        "saga-waiting",
        [reserve, charge, ws.gate("approval", schema=bool, expires_after=DAY), ship],
        on_failure="compensate",
    )
    async with ws.Engine.open(db, pipelines=[waiting], clock=clock) as engine:
        run = await engine.start(waiting, {"item": "lamp", "amount": 30})
        assert run.status == "paused"
        clock.advance(DAY)
        done = await _settled(engine, run.run_id)
        assert done.status == "failed" and done.error is not None
        assert done.error.type == "waystation.errors.PauseExpired"
        events = [(t.event, t.stage_path) for t in await engine.history(run.run_id)]
        with pytest.raises(ws.InvalidRunState, match="compensated"):
            await engine.retry(run.run_id)
    assert undone == ["refund 30", "unreserve R-lamp"]
    assert [e for e in events if e[0] in ("expired", "compensating", "compensated", "failed")] == [
        ("expired", "approval"),
        ("compensating", "approval"),
        ("compensated", "charge"),
        ("compensated", "reserve"),
        ("failed", "approval"),
    ]


SAGA_SCRIPT = """
import os, sys, time, anyio, waystation as ws

SIDE = os.environ["SIDE_FILE"]
SLOW = os.environ["SLOW_MARKER"]

def note(line):
    with open(SIDE, "a") as f:
        f.write(line + "\\n"); f.flush(); os.fsync(f.fileno())

def make(name):
    def undo(output: str) -> None:
        note(f"undo {name}")
        if name == "b" and os.path.exists(SLOW):
            time.sleep(60)  # the process is killed here, mid-compensation
    async def do(x: int) -> str:
        return name
    return ws.Stage(do, name=name, compensate=undo)

@ws.stage
async def boom(x: int) -> str:
    raise RuntimeError("boom")

if os.environ.get("SAGA_SHAPE") == "group":  # b and c as branches: each has its own undo
    middle = [ws.parallel(make("b"), make("c"), name="g")]
else:
    middle = [make("b"), make("c")]
pipe = ws.Pipeline("crash_saga", [make("a"), *middle, boom], on_failure="compensate")

async def main(db):
    async with ws.Engine.open(db, pipelines=[pipe]) as engine:
        run = await engine.submit(pipe, {"x": 1})
        print(run.run_id, flush=True)
        await anyio.sleep(120)

if __name__ == "__main__":
    anyio.run(main, sys.argv[1])
"""


@pytest.mark.parametrize("shape", ["stages", "group"])
async def test_a_crash_during_compensation_continues_with_the_rest(
    tmp_path: Path, shape: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With `group`, b and c are branches of a parallel group: before, their own
    compensations never ran (only stages' did), so the side file said just "undo a"."""
    db, side, marker = tmp_path / "runs.db", tmp_path / "side.txt", tmp_path / "slow"
    script = tmp_path / "crash_saga.py"
    script.write_text(textwrap.dedent(SAGA_SCRIPT))
    marker.write_text("1")
    monkeypatch.setenv("SAGA_SHAPE", shape)
    os.environ.update(SIDE_FILE=str(side), SLOW_MARKER=str(marker))
    run_id = run_and_kill(
        script,
        db,
        side,
        marker,
        lambda _: side.exists() and "undo b" in side.read_text(),
        "compensation never reached b",
    )
    marker.unlink()
    import importlib.util

    spec = importlib.util.spec_from_file_location("crash_saga", script)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    async with ws.Engine.open(db, pipelines=[module.pipe]) as engine:
        run = await engine.wait(run_id, timeout=20)
        assert run.status == "failed" and run.error is not None
        assert "boom" in run.error.message
        events = [(t.event, t.stage_path) for t in await engine.history(run_id)]
    # c was compensated before the kill and is not compensated again; b was in flight
    # (at-least-once) and runs again; a runs once.
    assert side.read_text().split("\n")[:-1] == ["undo c", "undo b", "undo b", "undo a"]
    b, c = ("g.b", "g.c") if shape == "group" else ("b", "c")
    assert [e for e in events if e[0] == "compensated"] == [
        ("compensated", c),
        ("compensated", b),
        ("compensated", "a"),
    ]


def _undo(name: str) -> Any:
    def undo(output: Any) -> None:
        undone.append(f"undo {name}")

    return undo


def _step(name: str) -> ws.Stage:
    async def do(x: int) -> str:
        return name

    return ws.Stage(do, name=name, compensate=_undo(name))


grandchild = ws.Pipeline("grandchild", [_step("g1")])


@ws.stage(compensate=_undo("c2"))
async def c2(x: int, ctx: ws.StageContext) -> str:
    return str(await ctx.run_child(grandchild, {"x": x}))


child_saga = ws.Pipeline("child_saga", [_step("c1"), c2])


@ws.stage
async def explode(child_saga: str) -> str:
    raise RuntimeError("late failure")


parent_saga = ws.Pipeline(
    "parent_saga", [_step("p1"), child_saga, explode], on_failure="compensate"
)


async def test_children_compensate_with_their_parent_deepest_first(db: Path) -> None:
    undone.clear()
    async with ws.Engine.open(db, pipelines=[parent_saga]) as engine:
        run = await engine.start(parent_saga, {"x": 1})
        assert run.status == "failed" and run.error is not None
        assert "late failure" in run.error.message
        tree = await engine.tree(run.run_id)
        child_events = [t.event for t in await engine.history(tree.children[0].run.run_id)]
    assert undone == ["undo g1", "undo c2", "undo c1", "undo p1"]
    assert child_events.count("compensated") == 2


async def test_a_run_failed_by_its_expired_gate_cancels_its_paused_child(db: Path) -> None:
    """A parallel group waits on a gate that expires (failing the run) and on a child that
    is paused at its own gate: the expiry fails the run without a driver, and the child,
    which could do nothing for it any more, is cancelled rather than left paused."""
    ask = ws.Pipeline("ask-child", [ws.gate("child_ok", schema=bool)])

    @ws.stage
    async def kid(ctx: ws.StageContext) -> Any:
        return await ctx.run_child(ask, {})

    gate = ws.gate("approval", schema=Approval, expires_after=DAY)
    parent = ws.Pipeline("group-expiring", [ws.parallel(gate, kid, name="both")])
    clock = ws.ManualClock(start=0.0)
    async with ws.Engine.open(db, pipelines=[parent, ask], clock=clock) as engine:
        run = await engine.start(parent)
        assert run.status == "paused" and len(run.pauses) == 2
        (child,) = await engine.list(parent_run_id=run.run_id)
        assert child.status == "paused"
        clock.advance(DAY)
        done = await _settled(engine, run.run_id)
        assert done.status == "failed" and done.error is not None
        assert done.error.type == "waystation.errors.PauseExpired"
        assert (await _until(engine, child.run_id, "cancelled", "succeeded")).status == "cancelled"


async def test_due_runs_of_other_pipelines_do_not_hold_back_this_engines(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """600 pauses of a pipeline this engine does not have expire before one of its own:
    the timer must still expire its own (it used to look at the first 500 due runs only,
    none of which it could act on, again and again), and say nothing of the others'."""
    other = ws.Pipeline("other-work", [ws.gate("approval", schema=Approval, expires_after=10)])
    mine = ws.Pipeline(
        "my-work",
        [ws.gate("approval", schema=Approval, expires_after=15, on_expire={"approved": True}), act],
    )
    clock = ws.ManualClock(start=0.0)
    async with ws.Engine.open(db, pipelines=[other, mine], clock=clock) as both:
        for _ in range(600):
            assert (await both.start(other)).status == "paused"
        run = await both.start(mine)
        assert run.status == "paused"
    async with ws.Engine.open(db, pipelines=[mine], clock=clock) as engine:
        clock.advance(20.0)
        done = await _settled(engine, run.run_id)
        assert done.status == "succeeded" and done.output == "approved"
        assert len(await engine.list(status="paused", limit=1000)) == 600
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text[:500]


trip_undone: list[str] = []


def _trip_step(name: str, *, fails: bool = False) -> ws.Stage:
    async def do() -> str:
        if fails:
            raise ConnectionError(f"{name}: no seats")
        return f"{name} booked"

    def undo(output: str) -> None:
        trip_undone.append(f"undo {output}")

    return ws.Stage(do, name=name, compensate=undo)


async def test_a_failing_group_undoes_its_branches_that_completed(db: Path) -> None:
    """The saga a parallel group most needs: hotel and car booked while the flight fails.
    Before, only the stages before the group were undone, and hotel and car stayed
    booked. The flight, which failed, is not undone."""
    trip_undone.clear()
    trip = ws.Pipeline(
        "trip",
        [
            _trip_step("deposit"),
            ws.parallel(
                _trip_step("hotel"),
                _trip_step("flight", fails=True),
                _trip_step("car"),
                name="book",
                on_error="wait_for_all",
            ),
        ],
        on_failure="compensate",
    )
    async with ws.Engine.open(db, pipelines=[trip]) as engine:
        run = await engine.start(trip)
        events = [(t.event, t.stage_path) for t in await engine.history(run.run_id)]
    assert run.status == "failed"
    assert trip_undone == ["undo car booked", "undo hotel booked", "undo deposit booked"]
    assert [e for e in events if e[0] == "compensated"] == [
        ("compensated", "book.car"),
        ("compensated", "book.hotel"),
        ("compensated", "deposit"),
    ]


@ws.stage(compensate=lambda what, output: trip_undone.append(f"undo child {output}"))
async def reserve_one(what: str) -> str:
    return what


reserving = ws.Pipeline("reserving", [reserve_one], on_failure="compensate")


@ws.stage(compensate=lambda output: trip_undone.append(f"undo {output}"))
async def rooms(ctx: ws.StageContext) -> str:
    return str(await ctx.run_child(reserving, {"what": "room"}))


@ws.stage
async def seats(ctx: ws.StageContext) -> str:
    await ctx.run_child(reserving, {"what": "seat"})
    raise ConnectionError("the seat's payment failed")


async def test_a_failing_group_undoes_the_children_of_its_completed_branches_only(
    db: Path,
) -> None:
    """The room (a completed branch's child) is undone; the seat, reserved by the branch
    that then failed, is not: a failing branch is treated as a failing stage is."""
    trip_undone.clear()
    trip = ws.Pipeline(
        "trip-children",
        [ws.parallel(rooms, seats, name="book", on_error="wait_for_all")],
        on_failure="compensate",
    )
    async with ws.Engine.open(db, pipelines=[trip]) as engine:
        run = await engine.start(trip)
    assert run.status == "failed"
    assert trip_undone == ["undo child room", "undo room"]


asks_child = ws.Pipeline("asks-child", [ws.gate("child_ok", schema=bool)])


@ws.stage
async def asks(ctx: ws.StageContext) -> bool:
    if not await ctx.run_child(asks_child, {}):
        raise ConnectionError("refused")
    return True


async def test_a_failing_group_of_a_run_from_before_branch_keys_undoes_its_childs_children(
    db: Path,
) -> None:
    """A run created before branch children were keyed by branch (its `created` row has
    no mark, its children's keys no `@group.branch`): the branch that completed is known
    by its child's `created` row, and that child is undone too."""
    trip_undone.clear()
    trip = ws.Pipeline(
        "trip-legacy", [ws.parallel(rooms, asks, name="book")], on_failure="compensate"
    )
    async with ws.Engine.open(db, pipelines=[trip, reserving, asks_child]) as engine:
        run = await engine.start(trip)
        assert run.status == "paused"
        kids = await engine.list(parent_run_id=run.run_id)
    (room,) = [k for k in kids if k.pipeline == "reserving"]
    with closing(sqlite3.connect(db)) as conn, conn:  # as an engine before the keys made them
        conn.execute(
            "UPDATE runs SET idempotency_key = replace(idempotency_key, '@book.rooms', '') "
            "WHERE run_id = ?",
            (room.run_id,),
        )
        conn.execute(
            "UPDATE transitions SET payload = json_remove(payload, '$.child_keys') "
            "WHERE run_id = ? AND event = 'created'",
            (run.run_id,),
        )
    async with ws.Engine.open(db, pipelines=[trip, reserving, asks_child]) as engine:
        (pause,) = (await engine.get(run.run_id)).pauses
        await engine.resume(run.run_id, False, pause_id=pause.pause_id, wait=False)
        done = await engine.wait(run.run_id, timeout=20)
    assert done.status == "failed"
    assert trip_undone == ["undo child room", "undo room"]


@ws.stage
async def asks_in_branch(ctx: ws.StageContext) -> bool:
    return bool(await ctx.run_child(asks_child, {}))


async def test_a_gate_keeps_its_expiry_when_its_group_is_entered_again(db: Path) -> None:
    """A group waits on a gate (expiring after a day) and on a child's gate. Answering the
    child half a day in takes the run out of its pause and back into the group, where the
    gate pauses again: it must still expire at the end of the first day. Before, its
    expiry started again from the re-entry."""
    gate = ws.gate("approval", schema=bool, expires_after=DAY)
    parent = ws.Pipeline("group-expiry", [ws.parallel(gate, asks_in_branch, name="both")])
    clock = ws.ManualClock(start=0.0)
    async with ws.Engine.open(db, pipelines=[parent, asks_child], clock=clock) as engine:
        run = await engine.start(parent)
        assert run.status == "paused" and len(run.pauses) == 2
        (child_pause,) = [p for p in run.pauses if p.kind == "child_ok"]
        clock.advance(DAY / 2)
        await engine.resume(run.run_id, True, pause_id=child_pause.pause_id, wait=False)
        again = await _until(engine, run.run_id, "paused")
        with anyio.fail_after(10):
            while len(again.pauses) != 1:  # the child's answer is taken in
                await anyio.sleep(0.01)
                again = await engine.get(run.run_id)
        assert [p.expires_at for p in again.pauses] == [DAY]
        clock.advance(DAY / 2)
        done = await _settled(engine, run.run_id)
    assert done.status == "failed" and done.error is not None
    assert done.error.type == "waystation.errors.PauseExpired"


@ws.stage
async def asks_slowly(ctx: ws.StageContext) -> bool:
    return bool(await ctx.run_child(asks_then_waits, {}))


child_may_finish: dict[str, anyio.Event] = {}  # made by the test, in its event loop


@ws.stage
async def waits(child_ok: bool) -> bool:
    await child_may_finish["event"].wait()
    return child_ok


asks_then_waits = ws.Pipeline("asks-then-waits", [ws.gate("child_ok", schema=bool), waits])


async def test_a_run_woken_by_a_childs_answer_elsewhere_is_not_parked_until_its_expiry(
    db: Path,
) -> None:
    """A group waits on its own gate (expiring after a day) and on a child's gate. A process
    without the pipelines (a web handler) answers the child: the run is taken out of its
    pause, for a worker to take in the answer. Before, it kept its pause's expiry as its
    wake-up time, so no worker took it until the day was over, when its gate, unanswerable
    meanwhile, failed it."""
    gate = ws.gate("approval", schema=bool, expires_after=DAY)
    parent = ws.Pipeline("woken-elsewhere", [ws.parallel(gate, asks_in_branch, name="both")])
    clock = ws.ManualClock(start=0.0)
    async with ws.Engine.open(
        db, pipelines=[parent, asks_child], clock=clock, poll_interval=0.05
    ) as worker:
        run = await worker.start(parent)
        (child_pause,) = [p for p in run.pauses if p.kind == "child_ok"]
        async with ws.Engine.open(db, recover=False) as web:
            await web.resume(run.run_id, True, pause_id=child_pause.pause_id, wait=False)
        again = await _until(worker, run.run_id, "paused")
        with anyio.fail_after(10):
            while len(again.pauses) != 1:  # the worker took the child's answer in
                await anyio.sleep(0.01)
                again = await worker.get(run.run_id)
        assert [p.expires_at for p in again.pauses] == [DAY]  # its first expiry still
        await worker.resume(run.run_id, True, pause_id=again.pauses[0].pause_id)
        done = await _settled(worker, run.run_id)
    assert done.status == "succeeded", done.error
    assert done.output == {"approval": True, "asks_in_branch": True}


async def test_a_run_left_while_waiting_on_an_answered_child_is_recovered(db: Path) -> None:
    """The same run, woken in the worker itself: it waits for the answered child, and the
    worker closes meanwhile. The next engine must continue it at once. Before, it kept its
    pause's expiry as its wake-up time, and recovery left it alone until then."""
    gate = ws.gate("approval", schema=bool, expires_after=DAY)
    parent = ws.Pipeline("left-waiting", [ws.parallel(gate, asks_slowly, name="both")])
    clock = ws.ManualClock(start=0.0)
    child_may_finish["event"] = anyio.Event()
    async with ws.Engine.open(db, pipelines=[parent, asks_then_waits], clock=clock) as first:
        run = await first.start(parent)
        (child_pause,) = [p for p in run.pauses if p.kind == "child_ok"]
        await first.resume(run.run_id, True, pause_id=child_pause.pause_id, wait=False)
        await _until(first, run.run_id, "running")
        await first.close(grace=0)
    child_may_finish["event"].set()
    async with ws.Engine.open(
        db, pipelines=[parent, asks_then_waits], clock=clock, poll_interval=0.05
    ) as second:
        again = await _until(second, run.run_id, "paused")
        with anyio.fail_after(10):
            while len(again.pauses) != 1:
                await anyio.sleep(0.01)
                again = await second.get(run.run_id)
        assert [p.expires_at for p in again.pauses] == [DAY]
        await second.resume(run.run_id, True, pause_id=again.pauses[0].pause_id)
        done = await _settled(second, run.run_id)
    assert done.status == "succeeded", done.error
    assert done.output == {"approval": True, "asks_slowly": True}
