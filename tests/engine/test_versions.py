"""Versioned pipelines and workers: old runs finish on their version while new ones start on
the next, PipelineChanged says what changed, migrate_run moves a run explicitly, queued runs
are driven by worker processes and each stage runs once, and close is graceful."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import anyio
import msgspec
import pytest

import waystation as ws

log: list[str] = []


class Order(msgspec.Struct):
    item: str


@ws.stage
async def price(order: Order) -> float:
    log.append("price")
    return 10.0


approval = ws.gate("approval", schema=bool)


@ws.stage
async def charge_v1(price: float, approval: bool) -> str:
    log.append("charge_v1")
    return f"v1 charged {price}"


@ws.stage
async def charge_v2(price: float, approval: bool) -> str:
    log.append("charge_v2")
    return f"v2 charged {price}"


@ws.stage
async def receipt(charge: str) -> str:
    log.append("receipt")
    return f"receipt for {charge}"


checkout_v1 = ws.Pipeline(
    "checkout", [price, approval, ws.Stage(charge_v1.fn, name="charge")], version="1"
)
checkout_v2 = ws.Pipeline(
    "checkout",
    [price, approval, ws.Stage(charge_v2.fn, name="charge"), receipt],
    version="2",
)


async def test_old_runs_finish_on_their_version_new_ones_start_on_the_next(db: Path) -> None:
    log.clear()
    async with ws.Engine.open(db, pipelines=[checkout_v1]) as engine:
        old = await engine.start(checkout_v1, {"order": Order("pen")})
        assert old.pipeline_version == "1" and old.status == "paused"
    async with ws.Engine.open(db, pipelines=[checkout_v1, checkout_v2]) as engine:
        new = await engine.start("checkout", {"order": Order("ink")})
        assert new.pipeline_version == "2"
        done_old = await engine.resume(old.run_id, True)
        done_new = await engine.resume(new.run_id, True)
    assert done_old.output == "v1 charged 10.0"
    assert done_new.output == "receipt for v2 charged 10.0"


async def test_a_changed_pipeline_is_refused_and_says_what_changed(db: Path) -> None:
    async with ws.Engine.open(db, pipelines=[checkout_v1]) as engine:
        run = await engine.start(checkout_v1, {"order": Order("pen")})

    async def charge_differently(price: float) -> str:
        return "changed"

    changed = ws.Pipeline(
        "checkout", [price, approval, ws.Stage(charge_differently, name="charge")]
    )
    async with ws.Engine.open(db, pipelines=[changed]) as engine:
        with pytest.raises(ws.PipelineChanged) as caught:
            await engine.resume(run.run_id, True)
        message = str(caught.value)
        assert "what changed" in message
        assert "- stage:charge(price: float, approval: bool) -> str" in message
        assert "+ stage:charge(price: float) -> str" in message
        still = await engine.get(run.run_id)
        assert still.status == "paused" and still.pause is not None


async def test_migrate_run_moves_a_paused_run_to_a_new_version(db: Path) -> None:
    log.clear()
    async with ws.Engine.open(db, pipelines=[checkout_v1, checkout_v2]) as engine:
        run = await engine.start(checkout_v1, {"order": Order("pen")})
        moved = await engine.migrate_run(run.run_id, to=checkout_v2)
        assert moved.pipeline_version == "2" and moved.status == "paused"
        done = await engine.resume(run.run_id, True)
        assert done.output == "receipt for v2 charged 10.0"
        events = [t.event for t in await engine.history(run.run_id)]
        assert "migrated" in events
        other = ws.Pipeline("checkout", [ws.Stage(price.fn, name="quote"), approval], version="3")
        engine.register(other)
        paused = await engine.start(checkout_v1, {"order": Order("ink")})
        with pytest.raises(ws.PipelineChanged, match="stages it has reached"):
            await engine.migrate_run(paused.run_id, to=other)
        assert (await engine.get(paused.run_id)).pipeline_version == "1"
    assert log == ["price", "charge_v2", "receipt", "price"]


@ws.stage
async def approval_by_code(price: float) -> bool:
    return True


@ws.stage
async def geo(order: Order) -> str:
    return "geo ok"


@ws.stage
async def charge_unapproved(price: float) -> str:
    return f"charged {price}"


async def _refused_and_untouched(
    engine: ws.Engine, run: ws.Run, to: ws.Pipeline, match: str, error: type = ws.PipelineChanged
) -> None:
    before = [t.event for t in await engine.history(run.run_id)]
    with pytest.raises(error, match=match):
        await engine.migrate_run(run.run_id, to=to)
    after = await engine.get(run.run_id)
    assert after.pipeline_version == run.pipeline_version and after.status == run.status
    assert [t.event for t in await engine.history(run.run_id)] == before


async def test_migrate_run_refuses_a_version_whose_reached_stages_differ_in_kind_or_branches(
    db: Path,
) -> None:
    """The stages a run has reached must be the same kinds under the same names in the new
    version, a group with the same branches. Before, only top-level names were compared:
    a gate made a plain stage took any answer as the gate's output (a str for a bool, and
    the run then stuck `running`), and a group with renamed branches dropped the finished
    branch's result and kept a pause for a gate the new version does not have."""
    as_code = ws.Pipeline("checkout", [price, ws.Stage(approval_by_code.fn, name="approval")])
    checks_v1 = ws.Pipeline(
        "checks", [ws.parallel(geo, ws.gate("ok", schema=bool), name="checks")], version="1"
    )
    checks_v2 = ws.Pipeline(
        "checks",
        [ws.parallel(ws.Stage(geo.fn, name="geo2"), ws.gate("ok", schema=bool), name="checks")],
        version="2",
    )
    gate_to_stage = ws.Pipeline("checkout", as_code.stages, version="4")
    async with ws.Engine.open(
        db, pipelines=[checkout_v1, gate_to_stage, checks_v1, checks_v2]
    ) as engine:
        run = await engine.start(checkout_v1, {"order": Order("pen")})
        await _refused_and_untouched(engine, run, gate_to_stage, "gate approval")
        grouped = await engine.start(checks_v1, {"order": Order("pen")})
        assert grouped.status == "paused"
        await _refused_and_untouched(engine, grouped, checks_v2, r"\[stage geo2, gate ok\]")


async def test_migrate_run_without_the_runs_version_compares_with_its_journal(
    db: Path,
) -> None:
    """With the version the run is on gone, the comparison uses the stages its journal
    recorded. Before, it was skipped: a run paused at a gate moved to a version without it,
    and its answer was taken as another stage's output."""
    no_gate = ws.Pipeline(
        "checkout", [price, ws.Stage(charge_unapproved.fn, name="charge")], version="5"
    )
    async with ws.Engine.open(db, pipelines=[checkout_v1]) as engine:
        run = await engine.start(checkout_v1, {"order": Order("pen")})
    async with ws.Engine.open(db, pipelines=[no_gate, checkout_v2]) as engine:
        await _refused_and_untouched(engine, run, no_gate, "gate approval")
        moved = await engine.migrate_run(run.run_id, to=checkout_v2)  # the same stages
        assert moved.pipeline_version == "2" and moved.status == "paused"
        done = await engine.resume(run.run_id, True)
    assert done.output == "receipt for v2 charged 10.0"


async def test_migrate_run_moves_a_run_off_a_version_edited_in_place(db: Path) -> None:
    """The usual reason to migrate: version 1 was changed without a new version number, so
    the run cannot continue on it; the edited code, registered as version 2, takes it."""
    async with ws.Engine.open(db, pipelines=[checkout_v1]) as engine:
        run = await engine.start(checkout_v1, {"order": Order("pen")})
    edited = ws.Pipeline("checkout", checkout_v2.stages, version="1")
    async with ws.Engine.open(db, pipelines=[edited, checkout_v2]) as engine:
        with pytest.raises(ws.PipelineChanged):
            await engine.resume(run.run_id, True)
        moved = await engine.migrate_run(run.run_id, to=checkout_v2)
        assert moved.pipeline_version == "2"
        done = await engine.resume(run.run_id, True)
    assert done.output == "receipt for v2 charged 10.0"


async def test_migrate_run_refuses_a_succeeded_run(db: Path) -> None:
    async with ws.Engine.open(db, pipelines=[checkout_v1, checkout_v2]) as engine:
        run = await engine.start(checkout_v1, {"order": Order("pen")})
        done = await engine.resume(run.run_id, True)
        assert done.status == "succeeded"
        await _refused_and_untouched(
            engine, done, checkout_v2, "is succeeded", error=ws.InvalidRunState
        )


@ws.stage
async def slow_step(n: int) -> int:
    await anyio.sleep(0.3)
    return n


@ws.stage
async def after_slow(slow_step: int) -> int:
    log.append("after_slow")
    return slow_step + 1


slowly = ws.Pipeline("slowly", [slow_step, after_slow])


async def test_close_lets_the_stage_in_flight_finish_and_leaves_the_rest(db: Path) -> None:
    log.clear()
    engine = await ws.Engine.open(db, pipelines=[slowly], shutdown_grace=5)
    run = await engine.submit(slowly, {"n": 1})
    await anyio.sleep(0.05)
    await engine.close()
    with sqlite3.connect(db) as conn:
        status, owner, index = conn.execute(
            "SELECT status, lease_owner, stage_index FROM runs"
        ).fetchone()
    # the first stage finished and was committed; the next was not started; lease released
    assert (status, owner, index) == ("running", None, 1)
    assert log == []
    async with ws.Engine.open(db, pipelines=[slowly]) as again:
        done = await again.wait(run.run_id, timeout=10)
    assert done.output == 2 and log == ["after_slow"]


WORKER = """
import asyncio, os, sys, time
import waystation as ws

SIDE = sys.argv[2] if __name__ == "__main__" else ""  # imported by the test for `pipe`

def note(run_id, stage):
    with open(SIDE, "a") as f:
        f.write(f"{os.getpid()} {run_id} {stage}\\n"); f.flush(); os.fsync(f.fileno())

def make(k):
    async def step(n: int, ctx: ws.StageContext) -> int:
        note(ctx.run_id, ctx.stage_name)
        await asyncio.sleep(0.002)
        return n + k
    return ws.Stage(step, name=f"s{k}")

pipe = ws.Pipeline("queued", [make(k) for k in range(3)])

async def main(db, total):
    async with ws.Engine.open(db, pipelines=[pipe], poll_interval=0.05) as engine:
        while True:
            done = len(await engine.list(status="succeeded", limit=total + 1))
            if done >= total:
                return
            await asyncio.sleep(0.1)

if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[3])))
"""


async def test_two_worker_processes_share_queued_runs_and_run_each_stage_once(
    tmp_path: Path,
) -> None:
    db, side, script = tmp_path / "runs.db", tmp_path / "side.txt", tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    total = 100
    sys.path.insert(0, str(tmp_path))
    try:
        import worker  # the same pipeline the workers run

        async with ws.Engine.open(db, pipelines=[worker.pipe], recover=False) as web:
            runs = [await web.submit(worker.pipe, {"n": i}, drive=False) for i in range(total)]
            assert {r.status for r in runs} == {"pending"}
            env = {**os.environ, "PYTHONPATH": str(tmp_path)}
            procs = [
                await asyncio.create_subprocess_exec(
                    sys.executable, str(script), str(db), str(side), str(total), env=env
                )
                for _ in range(2)
            ]
            started = time.monotonic()
            with anyio.fail_after(60):
                codes = [await p.wait() for p in procs]
            assert codes == [0, 0], codes
            finished = await web.list(status="succeeded", limit=total + 1)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("worker", None)
    assert len(finished) == total and time.monotonic() - started < 60
    lines = [line.split() for line in side.read_text().splitlines()]
    per_stage = Counter((run_id, stage) for _, run_id, stage in lines)
    assert len(per_stage) == total * 3
    assert set(per_stage.values()) == {1}, "a stage ran twice"
    workers = Counter(pid for pid, _, _ in lines)
    assert len(workers) >= 1
    print(f"stages per worker process: {dict(workers)}")
