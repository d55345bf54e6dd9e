"""Parallel groups through the public API: overlap, limits, both error modes, pauses in
several branches answered separately, per-branch retries, validation, and a real crash."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sqlite3
import textwrap
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import msgspec
import pytest

import waystation as ws
from tests.killing import run_and_kill

spans: dict[str, tuple[float, float]] = {}
running = {"now": 0, "max": 0}
executed: Counter[str] = Counter()


async def _work(name: str, seconds: float) -> None:
    executed[name] += 1
    running["now"] += 1
    running["max"] = max(running["max"], running["now"])
    start = time.monotonic()
    await anyio.sleep(seconds)
    spans[name] = (start, time.monotonic())
    running["now"] -= 1


@ws.stage
async def geo(person: str) -> str:
    await _work("geo", 0.2)
    return f"geo:{person}"


@ws.stage
async def credit(person: str) -> int:
    await _work("credit", 0.2)
    return 700


@ws.stage
async def fraud(person: str) -> bool:
    await _work("fraud", 0.2)
    return False


@ws.stage
async def decide(enrich: dict[str, Any], credit: int, fraud: bool) -> str:
    return f"{enrich['geo']} credit={credit} fraud={fraud}"


def _reset() -> None:
    spans.clear()
    executed.clear()
    running.update(now=0, max=0)


async def test_branches_overlap_and_bind_by_name(db: Path) -> None:
    _reset()
    enrich = ws.parallel(geo, credit, fraud, name="enrich")
    pipe = ws.Pipeline("onboard", [enrich, decide])
    async with ws.Engine.open(db, pipelines=[pipe]) as engine:
        run = await engine.start(pipe, {"person": "ann"})
        assert run.status == "succeeded", run.error
        assert run.output == "geo:ann credit=700 fraud=False"
        history = await engine.history(run.run_id)
    starts = max(s for s, _ in spans.values())
    ends = min(e for _, e in spans.values())
    assert starts < ends, "the three branches never ran at the same time"
    assert running["max"] == 3
    branch_rows = [(t.event, t.stage_path) for t in history if t.stage_path != "enrich"]
    for b in ("geo", "credit", "fraud"):
        assert ("started", f"enrich.{b}") in branch_rows
        assert ("succeeded", f"enrich.{b}") in branch_rows
    started = [t for t in history if t.event == "started" and t.stage_path == "enrich.geo"]
    assert started[0].payload == {"concurrent_group": "enrich"}


async def test_max_concurrency_is_respected(db: Path) -> None:
    _reset()

    def make(n: int) -> ws.Stage:
        async def branch() -> int:
            await _work(f"b{n}", 0.05)
            return n

        return ws.Stage(branch, name=f"b{n}")

    group = ws.parallel(*[make(n) for n in range(6)], name="limited", max_concurrency=2)
    pipe = ws.Pipeline("limited", [group])
    async with ws.Engine.open(db, pipelines=[pipe]) as engine:
        run = await engine.start(pipe)
        assert run.status == "succeeded"
        assert run.output == {f"b{n}": n for n in range(6)}
    assert running["max"] == 2


released = anyio.Event()


@ws.stage
async def boom() -> int:
    raise ValueError("boom")


@ws.stage
async def slow() -> int:
    executed["slow"] += 1
    await anyio.sleep(60)
    return 1


async def test_fail_fast_cancels_the_other_branches(db: Path) -> None:
    _reset()
    pipe = ws.Pipeline("ff", [ws.parallel(boom, slow, name="g")])
    async with ws.Engine.open(db, pipelines=[pipe]) as engine:
        with anyio.fail_after(10):
            run = await engine.start(pipe)
        assert run.status == "failed" and run.error is not None
        assert run.error.type == "waystation.errors.ParallelFailed"
        assert "boom" in run.error.message
        events = {(t.event, t.stage_path) for t in await engine.history(run.run_id)}
    assert ("failed", "g.boom") in events
    if executed["slow"]:
        assert ("cancelled", "g.slow") in events


@ws.stage
async def boom2() -> int:
    raise KeyError("two")


@ws.stage
async def fine() -> int:
    await anyio.sleep(0.05)
    return 5


async def test_wait_for_all_collects_every_error(db: Path) -> None:
    pipe = ws.Pipeline("wfa", [ws.parallel(boom, boom2, fine, name="g", on_error="wait_for_all")])
    async with ws.Engine.open(db, pipelines=[pipe]) as engine:
        run = await engine.start(pipe)
        assert run.status == "failed" and run.error is not None
        assert "2 of 3 branches failed" in run.error.message
        assert "boom" in run.error.message and "two" in run.error.message
        events = {(t.event, t.stage_path) for t in await engine.history(run.run_id)}
    assert ("succeeded", "g.fine") in events


class Ok(msgspec.Struct):
    ok: bool


@ws.stage
async def before(x: int) -> int:
    executed["before"] += 1
    return x


@ws.stage
async def counted(before: int) -> int:
    executed["counted"] += 1
    return before * 2


@ws.stage
async def after(legal: Ok, finance: Ok, counted: int) -> str:
    executed["after"] += 1
    return f"{legal.ok}/{finance.ok}/{counted}"


approvals = ws.parallel(
    ws.gate("legal", schema=Ok), ws.gate("finance", schema=Ok), counted, name="approvals"
)
two_gates = ws.Pipeline("two_gates", [before, approvals, after])


async def test_two_paused_branches_are_answered_separately(db: Path) -> None:
    _reset()
    async with ws.Engine.open(db, pipelines=[two_gates]) as engine:
        run = await engine.start(two_gates, {"x": 4})
        assert run.status == "paused"
        assert sorted(p.pause_id for p in run.pauses) == [
            "approvals.finance#0",
            "approvals.legal#0",
        ]
        assert {p.stage_path for p in run.pauses} == {"approvals.legal", "approvals.finance"}
        with pytest.raises(ws.InvalidRunState, match="2 open pauses"):
            await engine.resume(run.run_id, {"ok": True})
        with pytest.raises(ws.InvalidResumeInput):
            await engine.resume(run.run_id, {"ok": "no"}, pause_id="approvals.legal#0")
        one = await engine.resume(run.run_id, {"ok": True}, pause_id="approvals.legal#0")
        assert one.status == "paused" and [p.pause_id for p in one.pauses] == [
            "approvals.finance#0"
        ]
    # The second answer comes from a new engine (a new process would do the same).
    async with ws.Engine.open(db, pipelines=[two_gates]) as engine:
        done = await engine.resume(run.run_id, {"ok": False})
        assert done.status == "succeeded" and done.output == "True/False/8"
    assert executed == Counter({"before": 1, "counted": 1, "after": 1})


attempts: Counter[str] = Counter()


@ws.stage(retry=ws.Retry(attempts=3))
async def flaky_branch() -> str:
    attempts["flaky"] += 1
    if attempts["flaky"] < 3:
        raise ConnectionError("try again")
    return "ok"


async def test_retries_are_per_branch(db: Path) -> None:
    attempts.clear()
    pipe = ws.Pipeline("retrying", [ws.parallel(flaky_branch, fine, name="g")])
    async with ws.Engine.open(db, pipelines=[pipe]) as engine:
        run = await engine.start(pipe)
        assert run.status == "succeeded" and run.output == {"flaky_branch": "ok", "fine": 5}
        retries = [t for t in await engine.history(run.run_id) if t.event == "retrying"]
    assert [(t.stage_path, t.attempt) for t in retries] == [
        ("g.flaky_branch", 1),
        ("g.flaky_branch", 2),
    ]


keys: dict[str, list[str]] = {}


@ws.stage(retry=ws.Retry(attempts=2))
async def pays(ctx: ws.StageContext) -> str:
    keys.setdefault("pays", []).append(ctx.idempotency_key)
    if len(keys["pays"]) == 1:
        raise ConnectionError("the bank timed out")
    return ctx.idempotency_key


@ws.stage
async def refunds(ctx: ws.StageContext) -> str:
    return ctx.idempotency_key


async def test_each_branch_has_its_own_idempotency_key(db: Path) -> None:
    """Before: every branch of a group had the group's `<run>:<index>`, so an external API
    deduplicating by it took one branch's call for another's."""
    keys.clear()
    pipe = ws.Pipeline("keyed", [fine, ws.parallel(pays, refunds, name="g")])
    async with ws.Engine.open(db, pipelines=[pipe]) as engine:
        run = await engine.start(pipe)
    assert run.status == "succeeded"
    assert run.output == {"pays": f"{run.run_id}:1:g.pays", "refunds": f"{run.run_id}:1:g.refunds"}
    assert keys["pays"] == [f"{run.run_id}:1:g.pays"] * 2  # the same on every attempt


def test_group_validation_errors() -> None:
    with pytest.raises(ws.PipelineDefinitionError, match="two branches are named"):
        ws.parallel(fine, fine)
    with pytest.raises(ws.PipelineDefinitionError, match="two stages or branches are named"):
        ws.Pipeline("dup", [fine, ws.parallel(fine, boom, name="g")])

    @ws.stage
    async def needs_sibling(fine: int) -> int:
        return fine

    with pytest.raises(ws.PipelineDefinitionError, match="side by side"):
        ws.Pipeline("sib", [ws.parallel(fine, needs_sibling, name="g")])
    with pytest.raises(ws.PipelineDefinitionError, match="nested"):
        ws.parallel(ws.parallel(fine, boom, name="inner"), geo)


WORKLOAD = """
import os, anyio, waystation as ws

SIDE = os.environ["SIDE_FILE"]
SLOW = os.environ["SLOW_MARKER"]

def note(line):
    with open(SIDE, "a") as f:
        f.write(line + "\\n"); f.flush(); os.fsync(f.fileno())

def make(name, slow):
    async def branch(n: int) -> str:
        note(f"{name} start")
        if slow and os.path.exists(SLOW):
            await anyio.sleep(60)
        return f"{name}:{n}"
    return ws.Stage(branch, name=name)

group = ws.parallel(make("a", False), make("b", False), make("c", True), make("d", True),
                    name="g")
pipe = ws.Pipeline("crashy", [group])

async def main(db):
    async with ws.Engine.open(db, pipelines=[pipe]) as engine:
        run = await engine.submit(pipe, {"n": 1})
        print(run.run_id, flush=True)
        await anyio.sleep(120)

if __name__ == "__main__":
    import sys
    anyio.run(main, sys.argv[1])
"""


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("crashy_workload", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fast_branches_committed(db: Path, side: Path) -> Callable[[str], bool]:
    """True once all four branches started and a and b are committed."""

    def ready(run_id: str) -> bool:
        lines = side.read_text().splitlines() if side.exists() else []
        with sqlite3.connect(db) as conn:
            done = conn.execute(
                "SELECT COUNT(*) FROM journal WHERE run_id = ? AND event = 'succeeded'",
                (run_id,),
            ).fetchone()[0]
        return len(lines) >= 4 and done >= 2

    return ready


async def test_sigkill_mid_group_reruns_only_unfinished_branches(tmp_path: Path) -> None:
    db, side, marker = tmp_path / "runs.db", tmp_path / "side.txt", tmp_path / "slow"
    script = tmp_path / "crashy_workload.py"
    script.write_text(textwrap.dedent(WORKLOAD))
    marker.write_text("1")
    os.environ.update(SIDE_FILE=str(side), SLOW_MARKER=str(marker))
    run_id = run_and_kill(
        script,
        db,
        side,
        marker,
        _fast_branches_committed(db, side),
        "the workload never got its fast branches committed",
    )
    marker.unlink()
    module = _load(script)
    async with ws.Engine.open(db, pipelines=[module.pipe]) as engine:
        run = await engine.wait(run_id, timeout=20)
        assert run.status == "succeeded"
        assert run.output == {"a": "a:1", "b": "b:1", "c": "c:1", "d": "d:1"}
        history = await engine.history(run_id)
    starts = Counter(side.read_text().split())
    assert starts["a"] == 1 and starts["b"] == 1  # committed before the kill: not run again
    assert starts["c"] == 2 and starts["d"] == 2  # in flight at the kill: run again
    succeeded = Counter(t.stage_path for t in history if t.event == "succeeded")
    assert all(succeeded[f"g.{b}"] == 1 for b in "abcd")
    assert "recovered" in [t.event for t in history]


async def test_fail_fast_never_journals_a_finished_branch_as_cancelled(db: Path) -> None:
    """Branch `quick` has handed its result to the writer when branch `failing` fails: its
    commit applies, so it must not then be journaled `cancelled` as if it had been stopped.
    The store is wrapped to hold the moment: quick's commit is queued, then failing fails
    and its failure is committed (cancelling the group), and only then does quick's wait
    for its commit end."""
    quick_queued = asyncio.Event()
    failure_committed = asyncio.Event()

    @ws.stage
    async def failing() -> int:
        await quick_queued.wait()
        raise KeyError("x")

    @ws.stage
    async def quick() -> int:
        return 1

    pipe = ws.Pipeline("ff-race", [ws.parallel(failing, quick, name="g")])
    async with ws.Engine.open(db, pipelines=[pipe]) as engine:
        update_run = engine.store.update_run

        async def held_update(run_id: str, guard: Any, transitions: Any, values: Any = None) -> Any:
            paths = {(t.event, t.stage_path) for t in transitions}
            if ("succeeded", "g.quick") in paths:
                queued = asyncio.ensure_future(update_run(run_id, guard, transitions, values))
                await asyncio.sleep(0)  # the write is with the writer now
                quick_queued.set()
                await failure_committed.wait()
                await asyncio.sleep(0.01)  # still waiting when the group is cancelled
                return await queued
            result = await update_run(run_id, guard, transitions, values)
            if ("failed", "g.failing") in paths:
                failure_committed.set()
            return result

        engine.store.update_run = held_update  # type: ignore[method-assign]
        with anyio.fail_after(10):
            run = await engine.start(pipe)
        assert run.status == "failed"
        ends: dict[str, list[str]] = {}
        for t in await engine.history(run.run_id):
            if (t.stage_path or "").startswith("g.") and t.event in (
                "succeeded",
                "failed",
                "cancelled",
            ):
                ends.setdefault(t.stage_path, []).append(t.event)
    assert ends == {"g.failing": ["failed"], "g.quick": ["succeeded"]}


def test_a_sleep_stage_cannot_be_a_branch() -> None:
    """Refused when the group is made, not when the run reaches it."""
    with pytest.raises(ws.PipelineDefinitionError, match="sleep stage"):
        ws.parallel(geo, ws.sleep_stage("nap", 5), name="g")


@ws.stage
async def steady() -> int:
    return 1


@ws.stage(continue_on_error=True)
async def shaky() -> int:
    raise ValueError("no answer")


@ws.stage
async def summary(steady: int, shaky: ws.Failed | int) -> str:
    return f"steady={steady} shaky={getattr(shaky, 'message', shaky)}"


@pytest.mark.parametrize("restart", [False, True])
async def test_a_continue_on_error_branch_hands_its_failure_on(db: Path, restart: bool) -> None:
    """Before: the flag was ignored on a branch, and the group failed (though `plan`
    said later stages get a ws.Failed). With a restart between the group and the next
    stage (a gate), the failure is read back from the journal; a replay from the next
    stage reuses it (its `failed` row), as it reuses the other branch's result."""
    gate = [ws.gate("go_on", schema=bool)] if restart else []
    pipe = ws.Pipeline("shaky-group", [ws.parallel(steady, shaky, name="g"), *gate, summary])
    async with ws.Engine.open(db, pipelines=[pipe]) as engine:
        run = await engine.start(pipe)
        if restart:
            assert run.status == "paused"
    if restart:
        async with ws.Engine.open(db, pipelines=[pipe]) as engine:
            run = await engine.resume(run.run_id, True)
    assert run.status == "succeeded" and run.output == "steady=1 shaky=no answer"
    async with ws.Engine.open(db, pipelines=[pipe]) as engine:
        rows = [(t.event, t.stage_path) for t in await engine.history(run.run_id)]
        again = await engine.replay(run.run_id, from_stage="summary")
    assert ("failed", "g.shaky") in rows and ("succeeded", "g") in rows
    assert again.status == "succeeded" and again.output == "steady=1 shaky=no answer"


@ws.stage(continue_on_error=True)
async def naps(ctx: ws.StageContext) -> int:
    await ctx.sleep(1)  # not supported in a branch: this fails the group, flag or not
    return 1


async def test_a_group_failed_by_a_continue_on_error_branch_fails_again_on_retry(
    db: Path,
) -> None:
    """The branch's `failed` row is not a failure handed on (it carries no `Failed`): a
    retry runs the branch again rather than reading it back as its output."""
    pipe = ws.Pipeline("napping-branch", [ws.parallel(steady, naps, name="g")])
    async with ws.Engine.open(db, pipelines=[pipe]) as engine:
        run = await engine.start(pipe)
        assert run.status == "failed"
        again = await engine.retry(run.run_id)
    assert again.status == "failed" and again.error is not None
    assert "ctx.sleep is not supported" in again.error.message
