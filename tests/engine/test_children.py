"""Child runs through the public API: pipelines as stages, run_child, map, branch, loop,
pause propagation, budgets, cycles, cancellation of trees, failure chains."""

from __future__ import annotations

import importlib.util
import signal
import sqlite3
import sys
import time
from collections import Counter
from contextlib import closing
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

import waystation as ws
from tests.processes import wait_until

executed: Counter[str] = Counter()
SAFETY = 30  # seconds; a safety net against hangs, never a timing assertion


class Review(msgspec.Struct):
    ok: bool
    note: str


# -- a small tree: nightly > report > review -------------------------------------------------


@ws.stage
async def extract(doc: str) -> str:
    executed[f"extract:{doc}"] += 1
    return doc.upper()


@ws.stage
async def score(extract: str) -> int:
    executed[f"score:{extract}"] += 1
    if extract == "BAD":
        raise ValueError(f"cannot score {extract}")
    return len(extract)


review = ws.Pipeline("review", [extract, score])


@ws.stage
async def load(docs: list[str]) -> list[str]:
    executed["load"] += 1
    return docs


@ws.stage
async def fan_out(load: list[str], ctx: ws.StageContext) -> list[int]:
    executed["fan_out"] += 1
    return await ws.map_children(ctx, review, [{"doc": d} for d in load], max_concurrency=3)


@ws.stage
async def summarize(fan_out: list[int]) -> int:
    return sum(fan_out)


report = ws.Pipeline("report", [load, fan_out, summarize])


@ws.stage
async def publish(report: int) -> str:
    return f"total {report}"


nightly = ws.Pipeline("nightly", [report, publish])


async def test_pipeline_as_stage_and_map_children(db: Path) -> None:
    executed.clear()
    async with ws.Engine.open(db, pipelines=[nightly]) as engine:
        run = await engine.start(nightly, {"docs": ["a", "bb", "ccc", "dddd"]})
        assert run.status == "succeeded", run.error
        assert run.output == "total 10"
        tree = await engine.tree(run.run_id)
        assert [c.run.pipeline for c in tree.children] == ["report"]
        reviews = tree.children[0].children
        assert len(reviews) == 4
        assert all(r.run.run_kind == "map" and r.run.depth == 2 for r in reviews)
        assert all(r.run.root_run_id == run.run_id for r in reviews)
        assert {r.run.parent_run_id for r in reviews} == {tree.children[0].run.run_id}
        assert sorted(r.run.output for r in reviews) == [1, 2, 3, 4]
        direct = await engine.list(parent_run_id=run.run_id)
        assert [r.pipeline for r in direct] == ["report"]
        assert tree.children[0].run.run_kind == "child"
    assert all(n == 1 for n in executed.values())


async def test_failed_child_carries_the_chain(db: Path) -> None:
    async with ws.Engine.open(db, pipelines=[nightly]) as engine:
        run = await engine.start(nightly, {"docs": ["ok", "bad"]})
        assert run.status == "failed" and run.error is not None
        assert run.error.stage_name == "report"
        assert "nightly > report > report[0] > fan_out > review[1] > score" in run.error.message
        assert "ValueError: cannot score BAD" in run.error.message
        assert run.error.type == "waystation.errors.ChildFailed"


# -- pausing at the bottom of a 3-level tree -------------------------------------------------

approve = ws.gate("approve", schema=Review, reason="check the leaf")


@ws.stage
async def leaf_work(item: str) -> str:
    executed[f"leaf:{item}"] += 1
    return item * 2


@ws.stage
async def leaf_done(leaf_work: str, approve: Review) -> str:
    executed[f"leaf_done:{leaf_work}"] += 1
    return f"{leaf_work}:{approve.note}"


leaf = ws.Pipeline("leaf", [leaf_work, approve, leaf_done])
middle = ws.Pipeline("middle", [leaf.as_stage("leaf_run")])


@ws.stage
async def wrap(middle: str) -> str:
    return f"<{middle}>"


top = ws.Pipeline("top", [middle, wrap])


async def test_pause_at_the_bottom_is_answered_through_the_root(db: Path) -> None:
    executed.clear()
    async with ws.Engine.open(db, pipelines=[top]) as engine:
        run = await engine.start(top, {"item": "x"})
        assert run.status == "paused" and run.pause is not None
        assert run.pause.kind == "approve" and run.pause.stage_name == "middle"
        deepest = run.pause.run_id
        assert deepest is not None and deepest != run.run_id
        bottom = await engine.get(deepest)
        assert bottom.pipeline == "leaf" and bottom.status == "paused" and bottom.depth == 2
        middle_run = (await engine.list(parent_run_id=run.run_id))[0]
        assert middle_run.status == "paused"
        with pytest.raises(ws.InvalidResumeInput, match="ok"):
            await engine.resume(run.run_id, {"note": "missing ok"})
        done = await engine.resume(run.run_id, {"ok": True, "note": "fine"})
        assert done.status == "succeeded" and done.output == "<xx:fine>"
        assert (await engine.get(deepest)).status == "succeeded"
    assert executed == Counter({"leaf:x": 1, "leaf_done:xx": 1})


async def test_pause_answered_through_the_child_after_a_restart(db: Path) -> None:
    executed.clear()
    async with ws.Engine.open(db, pipelines=[top]) as engine:
        run = await engine.start(top, {"item": "y"})
        assert run.pause is not None
        deepest = run.pause.run_id
    assert deepest is not None
    async with ws.Engine.open(db, pipelines=[top]) as engine:
        child = await engine.resume(deepest, {"ok": True, "note": "later"})
        assert child.status == "succeeded"
        done = await engine.wait(run.run_id, timeout=10)
        assert done.status == "succeeded" and done.output == "<yy:later>"
    assert executed == Counter({"leaf:y": 1, "leaf_done:yy": 1})


async def test_map_children_with_several_paused_children(db: Path) -> None:
    executed.clear()

    @ws.stage
    async def many(items: list[str], ctx: ws.StageContext) -> list[str]:
        return await ws.map_children(ctx, leaf, [{"item": i} for i in items])

    parent = ws.Pipeline("many", [many])
    async with ws.Engine.open(db, pipelines=[parent]) as engine:
        run = await engine.start(parent, {"items": ["a", "b"]})
        assert run.status == "paused"
        children = await engine.list(parent_run_id=run.run_id)
        assert [c.status for c in children] == ["paused", "paused"]
        first = await engine.resume(children[1].run_id, {"ok": True, "note": "1"})
        assert first.status == "succeeded"
        # The parent may have been woken to look again; it settles paused on the other.
        again = await engine.wait(run.run_id, timeout=10)
        assert again.status == "paused" and again.pause is not None
        assert again.pause.run_id == children[0].run_id
        await engine.resume(children[0].run_id, {"ok": True, "note": "0"})
        done = await engine.wait(run.run_id, timeout=10)
        assert done.status == "succeeded" and done.output == ["aa:0", "bb:1"]
    assert executed["leaf:a"] == 1 and executed["leaf:b"] == 1


# -- budgets and cycles ----------------------------------------------------------------------


@ws.stage
async def recurse(n: int, ctx: ws.StageContext) -> int:
    return 1 + await ctx.run_child(deep, {"n": n + 1})


deep = ws.Pipeline("deep", [recurse])


async def test_dynamic_recursion_is_bounded_by_max_depth(db: Path) -> None:
    async with ws.Engine.open(db, pipelines=[deep], limits=ws.Limits(max_depth=3)) as engine:
        run = await engine.start(deep, {"n": 0})
        assert run.status == "failed" and run.error is not None
        assert "max_depth 3 exceeded" in run.error.message
        assert "deep > recurse > deep[0]" in run.error.message
        tree = await engine.tree(run.run_id)
        depth = 0
        while tree.children:
            tree = tree.children[0]
            depth += 1
        assert depth == 3


@ws.stage
async def spender(amount: int, ctx: ws.StageContext) -> float:
    return await ctx.spend("tokens", amount)


spending = ws.Pipeline("spending", [spender], budgets={"tokens": 1000})


async def test_named_budget_is_enforced(db: Path) -> None:
    async with ws.Engine.open(db, pipelines=[spending]) as engine:
        ok = await engine.start(spending, {"amount": 600})
        assert ok.status == "succeeded" and ok.output == 600
        over = await engine.start(spending, {"amount": 1200})
        assert over.status == "failed" and over.error is not None
        assert "budget 'tokens' exceeded" in over.error.message


async def test_max_children_per_stage(db: Path) -> None:
    @ws.stage
    async def wide(ctx: ws.StageContext) -> list[int]:
        return await ws.map_children(ctx, review, [{"doc": "a"}] * 5)

    p = ws.Pipeline("wide", [wide], limits=ws.Limits(max_children=3))
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        run = await engine.start(p)
        assert run.status == "failed" and run.error is not None
        assert "max_children 3 exceeded" in run.error.message


# -- max_total_stages: one count, whoever counts it and whenever ----------------------------


@ws.stage
async def limit_begin(n: int) -> int:
    return n


@ws.stage
async def limit_leaf(n: int) -> int:
    return n + 1


@ws.stage
async def limit_side(n: int) -> int:
    return n


@ws.stage
async def limit_other(n: int) -> int:
    return n


@ws.stage(when=lambda n: n < 0)
async def limit_skipped(n: int) -> int:
    return n


@ws.stage(retry=ws.Retry(attempts=2))
async def limit_flaky(n: int, ctx: ws.StageContext) -> int:
    if ctx.attempt == 1:
        raise ValueError("the first attempt fails")
    return n


limit_kid_a = ws.Pipeline("limit_kid_a", [limit_leaf])
limit_kid_b = ws.Pipeline("limit_kid_b", [limit_leaf, ws.gate("kid_ok", schema=bool)])
limited = ws.Pipeline(
    "limited",
    [
        limit_begin,
        ws.parallel(limit_kid_a, limit_side, name="fan_in"),
        limit_skipped,
        limit_flaky,
        ws.gate("limit_ok", schema=bool),
        ws.parallel(limit_kid_b, limit_other, name="fan_out"),
    ],
)


async def _run_limited(db: Path, limit: int, *, restart: bool) -> ws.Run:
    """Run `limited` under `max_total_stages=limit`, answering each pause: in the same
    engine, or (`restart`) in a new one opened on the file after the first is closed."""
    limits = ws.Limits(max_total_stages=limit)
    async with ws.Engine.open(db, pipelines=[limited], limits=limits) as engine:
        run = await engine.start(limited, {"n": 1})
        while run.status == "paused" and not restart:
            run = await engine.resume(run.run_id, True, timeout=SAFETY)
    while run.status == "paused":
        async with ws.Engine.open(db, pipelines=[limited], limits=limits) as engine:
            run = await engine.resume(run.run_id, True, timeout=SAFETY)
    return run


async def _started_rows(engine: ws.Engine, root_run_id: str) -> int:
    """The `started` and `retrying` rows of a tree's journals."""
    stack, rows = [await engine.tree(root_run_id)], 0
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        history = await engine.history(node.run.run_id)
        rows += sum(t.event in ("started", "retrying") for t in history)
    return rows


async def test_max_total_stages_counts_the_journal_whoever_counts_it(tmp_path: Path) -> None:
    """The tree (two groups that each launch a child, a stage its `when` skips, a retry, a
    gate in the root and one in a child) needs exactly as many stage executions as its
    journals hold `started` and `retrying` rows, whether one engine runs it or each pause
    is answered by a new engine that reloads the count from the journal. Before, a
    driver's running count left out gates, groups and skipped stages that the journal's
    count (read when a tree's count was first needed) had in: the limit that applied
    depended on where the first child was launched and on restarts."""
    free = await _run_limited(tmp_path / "free.db", 10_000, restart=False)
    assert free.status == "succeeded", free.error
    async with ws.Engine.open(tmp_path / "free.db", pipelines=[limited]) as engine:
        needed = await _started_rows(engine, free.run_id)
    # The root's 11 (its 6 stages, 4 branches, a retry), 1 as `fan_out` is entered again
    # to take in the child's answer (its unfinished branch starts again), the children's 3.
    assert needed == 15
    outcomes = {}
    for limit in range(needed - 7, needed + 2):
        for restart in (False, True):
            run = await _run_limited(tmp_path / f"{limit}-{restart}.db", limit, restart=restart)
            outcomes[limit, restart] = run.status
            if run.status == "failed":
                assert run.error is not None
                assert f"max_total_stages {limit} exceeded" in run.error.message
    assert outcomes == {
        (limit, restart): "succeeded" if limit >= needed else "failed"
        for limit in range(needed - 7, needed + 2)
        for restart in (False, True)
    }
    # The plan counts as the engine does: all but the retry and the branch's second start.
    assert ws.make_plan(limited).min_stage_executions == needed - 2


def test_a_pipeline_that_includes_itself_is_rejected() -> None:
    inner = ws.Pipeline("loopy", [extract])
    with pytest.raises(ws.PipelineDefinitionError, match="loopy > loopy"):
        ws.Pipeline("loopy", [inner])


# -- cancellation ----------------------------------------------------------------------------


async def test_cancelling_a_parent_cancels_its_descendants(db: Path) -> None:
    async with ws.Engine.open(db, pipelines=[top]) as engine:
        run = await engine.start(top, {"item": "z"})
        assert run.status == "paused"
        cancelled = await engine.cancel(run.run_id)
        assert cancelled.status == "cancelled"
        tree = await engine.tree(run.run_id)
        statuses = []
        stack = [tree]
        while stack:
            node = stack.pop()
            statuses.append(node.run.status)
            stack.extend(node.children)
        assert statuses == ["cancelled"] * 3


# -- a parent's stage that stops, and its children -----------------------------------------


entered_stuck: list[anyio.Event] = []  # set by `stuck` once it runs


@ws.stage
async def stuck(n: int) -> int:
    executed["stuck"] += 1
    for event in entered_stuck:
        event.set()
    await anyio.Event().wait()  # runs until it is stopped
    return n


forever = ws.Pipeline("forever", [stuck])


async def children_of(engine: ws.Engine, run_id: str) -> list[ws.Run]:
    return await engine.list(parent_run_id=run_id, limit=100)


async def test_cancelling_a_paused_child_lets_its_parent_go_on(db: Path) -> None:
    """The parent waits on its child's gate; the child is cancelled by itself: the parent
    continues and learns it (ChildFailed), instead of staying paused on a pause that is
    gone."""
    ask = ws.Pipeline("ask", [ws.gate("ok", schema=bool)])

    @ws.stage
    async def delegate(x: int, ctx: ws.StageContext) -> str:
        try:
            await ctx.run_child(ask, {})
        except ws.ChildFailed as exc:
            return f"without approval: {exc}"
        return "approved"

    parent = ws.Pipeline("delegating", [delegate])
    async with ws.Engine.open(db, pipelines=[parent]) as engine:
        run = await engine.start(parent, {"x": 1})
        assert run.status == "paused"
        (child,) = await children_of(engine, run.run_id)
        assert (await engine.cancel(child.run_id)).status == "cancelled"
        with anyio.fail_after(SAFETY):
            done = await engine.wait(run.run_id)
    assert done.status == "succeeded"
    assert done.output.startswith("without approval") and "cancelled" in done.output


async def test_a_timed_out_stage_stops_its_child(db: Path) -> None:
    """Each timed-out attempt's child is cancelled with it, not left to run on."""
    executed.clear()

    @ws.stage(timeout=0.5, retry=ws.Retry(attempts=2, backoff=0.01))
    async def launch(n: int, ctx: ws.StageContext) -> int:
        return int(await ctx.run_child(forever, {"n": n}))

    parent = ws.Pipeline("timing-out", [launch])
    async with ws.Engine.open(db, pipelines=[parent]) as engine:
        with anyio.fail_after(SAFETY):
            run = await engine.start(parent, {"n": 1})
        assert run.status == "failed" and run.error is not None
        assert "timed out" in run.error.message
        kids = await children_of(engine, run.run_id)
    assert [k.status for k in kids] == ["cancelled", "cancelled"]


async def test_a_failing_branch_stops_the_child_of_another(db: Path) -> None:
    @ws.stage
    async def kid(ctx: ws.StageContext) -> int:
        return int(await ctx.run_child(forever, {"n": 1}))

    entered = anyio.Event()

    @ws.stage
    async def boom() -> int:
        await entered.wait()  # the other branch's child is running
        raise RuntimeError("boom")

    parent = ws.Pipeline("fail-fast-kid", [ws.parallel(kid, boom, name="g")])
    entered_stuck[:] = [entered]
    async with ws.Engine.open(db, pipelines=[parent]) as engine:
        with anyio.fail_after(SAFETY):
            run = await engine.start(parent)
        assert run.status == "failed"
        kids = await children_of(engine, run.run_id)
    assert [k.status for k in kids] == ["cancelled"]


async def test_cancelling_a_parent_whose_child_holds_the_last_slot(db: Path) -> None:
    """One slot, held by the child (the waiting parent gave its own back): cancel must
    not wait for a slot the child will never free. Both end cancelled, at once."""
    executed.clear()

    @ws.stage
    async def wait_for_child(n: int, ctx: ws.StageContext) -> int:
        return int(await ctx.run_child(forever, {"n": n}))

    parent = ws.Pipeline("one-slot", [wait_for_child])
    entered = anyio.Event()
    entered_stuck[:] = [entered]
    async with ws.Engine.open(db, pipelines=[parent], max_concurrent_runs=1) as engine:
        run = await engine.submit(parent, {"n": 1})
        with anyio.fail_after(SAFETY):
            await entered.wait()
            cancelled = await engine.cancel(run.run_id)
        assert cancelled.status == "cancelled"
        kids = await children_of(engine, run.run_id)
    assert [k.status for k in kids] == ["cancelled"]
    entered_stuck.clear()


async def test_no_child_is_left_undriven_when_its_siblings_fail_fast(db: Path) -> None:
    """map_children stops at an invalid item while other children are being created:
    every child that exists ends (none stays `running` with nobody driving it)."""

    @ws.stage
    async def work(n: int) -> int:
        await anyio.sleep(0.2)
        return n

    item = ws.Pipeline("item", [work])

    @ws.stage
    async def fan(k: int, ctx: ws.StageContext) -> list[int]:
        items: list[dict[str, Any]] = [{"n": i} for i in range(k)]
        items[k // 2] = {"wrong": 1}
        return list(await ws.map_children(ctx, item, items))

    parent = ws.Pipeline("fan-invalid", [fan])
    async with ws.Engine.open(db, pipelines=[parent]) as engine:
        with anyio.fail_after(SAFETY):
            run = await engine.start(parent, {"k": 20})
            assert run.status == "failed"
            for kid in await children_of(engine, run.run_id):
                assert (await engine.wait(kid.run_id)).status in ("succeeded", "cancelled")


# -- a parent paused on a child's pause that is answered meanwhile --------------------------


asking = ws.Pipeline("asking", [ws.gate("ok", schema=bool), ws.stage(lambda ok: ok, name="got")])


@ws.stage
async def ask_child(x: int, ctx: ws.StageContext) -> bool:
    return bool(await ctx.run_child(asking, {}))


asker = ws.Pipeline("asker", [ask_child])


async def test_a_child_answered_while_its_parent_commits_its_pause(db: Path) -> None:
    """The parent read its child paused and is committing its own pause when the child is
    answered (`resume` finds no paused parent to wake yet). The parent must not stay
    paused on a pause that is gone: it looks again once its pause is committed."""
    async with ws.Engine.open(db, pipelines=[asker]) as engine:
        settle_run = engine.store.settle_run
        answered: list[str] = []

        async def answer_first(run_id: str, guard: Any, rows: Any, values: Any = None) -> Any:
            pausing = values is not None and values.get("status") == "paused"
            kids = await engine.list(parent_run_id=run_id) if pausing else []
            if kids and not answered:  # the parent's pause, not the child's own
                answered.append(kids[0].run_id)
                await engine.resume(kids[0].run_id, True, wait=False)
            return await settle_run(run_id, guard, rows, values)

        engine.store.settle_run = answer_first  # type: ignore[method-assign]
        with anyio.fail_after(SAFETY):
            run = await engine.submit(asker, {"x": 1})
            done = await engine.wait(run.run_id)
            while done.status == "paused":  # it paused, then woke itself: wait again
                await anyio.sleep(0.01)
                done = await engine.wait(run.run_id)
        assert answered
    assert done.status == "succeeded" and done.output is True


async def test_a_parent_paused_on_a_child_is_woken_when_the_child_ends(db: Path) -> None:
    """As if the process had died between the child's answer and the parent's wake-up
    (two commits): the child goes on and ends, and its end wakes the parent."""
    async with ws.Engine.open(db, pipelines=[asker]) as engine:
        run = await engine.start(asker, {"x": 1})
        assert run.status == "paused"
        (child,) = await engine.list(parent_run_id=run.run_id)
        wake_ancestors = engine._wake_ancestors

        async def lost(child: Any) -> None:  # the wake-up that the crash took (the answer's)
            engine._wake_ancestors = wake_ancestors  # type: ignore[method-assign]

        engine._wake_ancestors = lost  # type: ignore[method-assign]
        with anyio.fail_after(SAFETY):
            assert (await engine.resume(child.run_id, True)).status == "succeeded"
            done = await engine.wait(run.run_id)
            while done.status == "paused":
                await anyio.sleep(0.01)
                done = await engine.wait(run.run_id)
    assert done.status == "succeeded" and done.output is True


async def test_closing_while_a_parent_waits_on_its_child(db: Path) -> None:
    """The child finishes its stage in hand and is left for the next engine; the parent,
    waiting on it, is left when the grace period ends. The next engine finishes both,
    each stage committed once."""
    executed.clear()
    started = anyio.Event()

    @ws.stage
    async def part_one(n: int) -> int:
        executed["part_one"] += 1
        started.set()
        await anyio.sleep(0.2)
        return n + 1

    @ws.stage
    async def part_two(part_one: int) -> int:
        executed["part_two"] += 1
        return part_one + 1

    two_parts = ws.Pipeline("two-parts", [part_one, part_two])

    @ws.stage
    async def delegate(n: int, ctx: ws.StageContext) -> int:
        return int(await ctx.run_child(two_parts, {"n": n}))

    parent = ws.Pipeline("waits-on-two-parts", [delegate])
    engine = await ws.Engine.open(db, pipelines=[parent], shutdown_grace=0.5)
    run = await engine.submit(parent, {"n": 1})
    with anyio.fail_after(SAFETY):
        await started.wait()
        await engine.close()
    async with ws.Engine.open(db, pipelines=[parent]) as engine:
        with anyio.fail_after(SAFETY):
            done = await engine.wait(run.run_id)
    assert done.status == "succeeded" and done.output == 3
    assert executed == Counter({"part_one": 1, "part_two": 1})


async def test_closing_lets_a_sibling_branch_of_a_waiting_child_finish(db: Path) -> None:
    """A group with a branch waiting on a child and a plain branch in flight: close gives
    the plain branch its grace to finish (it must not run again in the next engine)."""
    executed.clear()
    plain_started = anyio.Event()

    @ws.stage
    async def api_call() -> int:
        executed["api_call"] += 1
        plain_started.set()
        await anyio.sleep(0.3)
        return 1

    @ws.stage
    async def kid_branch(ctx: ws.StageContext) -> int:
        return int(await ctx.run_child(forever, {"n": 1}))

    parent = ws.Pipeline("sibling-in-grace", [ws.parallel(api_call, kid_branch, name="g")])
    engine = await ws.Engine.open(db, pipelines=[parent], shutdown_grace=1.0)
    run = await engine.submit(parent)
    with anyio.fail_after(SAFETY):
        await plain_started.wait()
        await engine.close()
    assert executed["api_call"] == 1
    async with ws.Engine.open(db, pipelines=[parent], recover=False) as engine:
        events = [(t.event, t.stage_path) for t in await engine.history(run.run_id)]
    assert ("succeeded", "g.api_call") in events  # committed within the grace


# -- three levels: a grandchild's pause shown by its grandparent ------------------------------

g_asks = ws.Pipeline(
    "g-asks",
    [
        ws.gate("g1", schema=bool),
        ws.gate("g2", schema=bool),
        ws.stage(lambda g1, g2: g1 and g2, name="g_done"),
    ],
)


@ws.stage
async def c_waits(x: int, ctx: ws.StageContext) -> bool:
    return bool(await ctx.run_child(g_asks, {}))


c_level = ws.Pipeline("c-level", [c_waits])


@ws.stage
async def p_waits(x: int, ctx: ws.StageContext) -> str:
    try:
        return str(await ctx.run_child(c_level, {"x": x}))
    except ws.ChildFailed as exc:
        return f"failed below: {exc}"


p_level = ws.Pipeline("p-level", [p_waits])


async def test_cancelling_the_middle_of_three_frees_the_top(db: Path) -> None:
    """The top shows the grandchild's pause (its run id is the grandchild's); cancelling
    the middle run (and so the grandchild) must still let the top go on."""
    async with ws.Engine.open(db, pipelines=[p_level]) as engine:
        run = await engine.start(p_level, {"x": 1})
        assert run.status == "paused"
        (middle,) = await engine.list(parent_run_id=run.run_id)
        assert (await engine.cancel(middle.run_id)).status == "cancelled"
        with anyio.fail_after(SAFETY):
            done = await engine.wait(run.run_id)
    assert done.status == "succeeded" and done.output.startswith("failed below")


async def test_a_stale_middle_run_is_woken_rather_than_shown_again(db: Path) -> None:
    """The middle run's wake-up was lost (as in a crash) when the grandchild moved on to
    its second gate. The top, woken, must wake the middle instead of pausing again on the
    middle's stale pause, over and over: it ends paused on the second gate, answerable."""
    async with ws.Engine.open(db, pipelines=[p_level]) as engine:
        run = await engine.start(p_level, {"x": 1})
        (middle,) = await engine.list(parent_run_id=run.run_id)
        (bottom,) = await engine.list(parent_run_id=middle.run_id)
        wake_ancestors = engine._wake_ancestors

        async def lost(child: Any) -> None:
            return None

        engine._wake_ancestors = lost  # type: ignore[method-assign]
        assert (await engine.resume(bottom.run_id, True)).pause.kind == "g2"
        engine._wake_ancestors = wake_ancestors  # type: ignore[method-assign]
        with anyio.fail_after(SAFETY):
            await engine.wake_if_stale(run.run_id)
            top = await engine.wait(run.run_id)
            assert top.status == "paused" and top.pause.kind == "g2"
            rows = len(await engine.history(run.run_id))
            await anyio.sleep(0.3)
            assert len(await engine.history(run.run_id)) == rows  # settled, not looping
            done = await engine.resume(run.run_id, True)
    assert done.status == "succeeded" and done.output == "True"


async def test_a_stale_middle_run_that_no_longer_loads_fails_the_link(db: Path) -> None:
    """As above, and the middle run's stored input is damaged: it is not taken (it would
    be driven by nobody, under a lease kept alive), and the top learns it cannot go on,
    instead of waking and pausing again without end."""
    async with ws.Engine.open(db, pipelines=[p_level]) as engine:
        run = await engine.start(p_level, {"x": 1})
        (middle,) = await engine.list(parent_run_id=run.run_id)
        (bottom,) = await engine.list(parent_run_id=middle.run_id)

        async def lost(child: Any) -> None:
            return None

        engine._wake_ancestors = lost  # type: ignore[method-assign]
        await engine.resume(bottom.run_id, True)
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("UPDATE run_inputs SET input = '[1, 2]' WHERE run_id = ?", (middle.run_id,))
    async with ws.Engine.open(db, pipelines=[p_level]) as engine:
        with anyio.fail_after(SAFETY):
            await engine.wake_if_stale(run.run_id)
            top = await engine.wait(run.run_id)
        stuck = await engine.get(middle.run_id)
    assert top.status == "succeeded" and "cannot go on" in top.output
    assert stuck.status == "paused"
    with closing(sqlite3.connect(db)) as conn:
        lease = conn.execute(
            "SELECT lease_owner FROM runs WHERE run_id = ?", (middle.run_id,)
        ).fetchone()
    assert lease == (None,)


async def test_closing_during_a_child_create_leaves_the_parent_for_the_next_engine(
    db: Path,
) -> None:
    """The create is with the writer when close runs out of grace: the parent is not
    failed (by an error of the engine's own), and the next engine finishes it."""
    kid = ws.Pipeline("kid", [ws.stage(lambda: 1, name="one")])

    @ws.stage
    async def launch(ctx: ws.StageContext) -> int:
        return int(await ctx.run_child(kid, {}))

    parent = ws.Pipeline("launching", [launch])
    engine = await ws.Engine.open(db, pipelines=[parent])
    create_run = engine.store.create_run
    creating = anyio.Event()

    async def slow_create(new: Any) -> Any:
        if new.parent_run_id is not None:
            creating.set()
            await anyio.sleep(0.2)  # a busy writer
        return await create_run(new)

    engine.store.create_run = slow_create  # type: ignore[method-assign]
    run = await engine.submit(parent)
    with anyio.fail_after(SAFETY):
        await creating.wait()
        await engine.close(grace=0)
    async with ws.Engine.open(db, pipelines=[parent]) as engine:
        with anyio.fail_after(SAFETY):
            done = await engine.wait(run.run_id)
        events = [t.event for t in await engine.history(run.run_id)]
    assert done.status == "succeeded" and done.output == 1
    assert "failed" not in events and "recovered" in events


# -- failures that do not stop the run, branch, loop, mapping --------------------------------


class Report(msgspec.Struct):
    pages: int


@ws.stage(continue_on_error=True)
async def primary(x: int) -> Report:
    if x < 0:
        raise RuntimeError("primary is down")
    return Report(pages=x)


@ws.stage
async def fallback(primary: ws.Failed | Report) -> str:
    if isinstance(primary, ws.Failed):
        return f"fallback after {primary.type}: {primary.message}"
    return f"{primary.pages} pages"


resilient = ws.Pipeline("resilient", [primary, fallback])


async def test_continue_on_error_lets_later_stages_choose(db: Path) -> None:
    async with ws.Engine.open(db, pipelines=[resilient]) as engine:
        run = await engine.start(resilient, {"x": -1})
        assert run.status == "succeeded"
        assert run.output == "fallback after RuntimeError: primary is down"
        ok = await engine.start(resilient, {"x": 3})
        assert ok.output == "3 pages"
        events = [(t.event, t.stage_index) for t in await engine.history(run.run_id)]
        assert ("failed", 0) in events and ("succeeded", 1) in events


@ws.stage
async def small(n: int) -> str:
    return f"small {n}"


@ws.stage
async def big(n: int) -> str:
    return f"big {n}"


def size(n: int) -> str:
    return "big" if n > 10 else "small"


sized = ws.Pipeline(
    "sized",
    [
        ws.branch(
            "route", size, {"small": ws.Pipeline("s", [small]), "big": ws.Pipeline("b", [big])}
        )
    ],
)


@ws.stage
async def halve(n: int) -> int:
    return n // 2


halving = ws.Pipeline("halving", [halve])
looping = ws.Pipeline("looping", [ws.loop(halving, until=lambda out: out < 3, max_iterations=10)])


async def test_branch_and_loop(db: Path) -> None:
    async with ws.Engine.open(db, pipelines=[sized, looping]) as engine:
        assert (await engine.start(sized, {"n": 50})).output == "big 50"
        assert (await engine.start(sized, {"n": 5})).output == "small 5"
        run = await engine.start(looping, {"n": 40})
        assert run.status == "succeeded" and run.output == 2  # 40 > 20 > 10 > 5 > 2
        kids = await engine.list(parent_run_id=run.run_id)
        assert [k.run_kind for k in kids] == ["loop"] * 4


class Metrics(msgspec.Struct):
    accuracy: float


class Scored(msgspec.Struct):
    metrics: Metrics


@ws.stage
async def measure(doc: str) -> Scored:
    return Scored(Metrics(accuracy=len(doc) / 10))


measuring = ws.Pipeline("measuring", [measure])


@ws.stage
async def documents(n: int) -> dict[str, Any]:
    return {"documents": ["x" * n, "y"]}


mapped = ws.Pipeline(
    "mapped",
    [
        documents,
        measuring.as_stage(
            "review_main",
            inputs={"doc": "documents.documents.0"},
            outputs={"accuracy": "measure.metrics.accuracy"},
        ),
    ],
)


async def test_as_stage_maps_inputs_and_outputs_by_path(db: Path) -> None:
    async with ws.Engine.open(db, pipelines=[mapped]) as engine:
        run = await engine.start(mapped, {"n": 7})
        assert run.status == "succeeded", run.error
        assert run.output == {"accuracy": 0.7}


async def test_workspace_lies_under_the_parent_and_is_removed_on_success(tmp_path: Path) -> None:
    seen: list[Path] = []

    @ws.stage
    async def use_space(doc: str, ctx: ws.StageContext) -> str:
        seen.append(ctx.workspace)
        (ctx.workspace / "out.txt").write_text(doc)
        return doc

    child = ws.Pipeline("space_child", [use_space])

    @ws.stage
    async def parent_space(ctx: ws.StageContext) -> str:
        seen.append(ctx.workspace)
        return str(await ctx.run_child(child, {"doc": "hi"}))

    parent = ws.Pipeline("space_parent", [parent_space])
    root = tmp_path / "ws"
    async with ws.Engine.open(
        tmp_path / "runs.db", pipelines=[parent], workspace_root=root
    ) as engine:
        run = await engine.start(parent)
        assert run.status == "succeeded"
    assert seen[1].parent == seen[0]
    assert not (root / run.run_id).exists()


# -- a failed parent does not leave its children open ----------------------------------------

reviewing = ws.Pipeline("reviewing", [extract, ws.gate("asked", schema=Review)])


async def test_wait_for_all_with_a_failed_and_a_paused_child(db: Path) -> None:
    """The same through one `map_children` call: its stage fails with the failed child's
    error, and the sibling paused at its gate is cancelled with it (answering it could do
    nothing for its parent: a retry of the parent launches it afresh)."""

    @ws.stage
    async def fan(ctx: ws.StageContext) -> list[Any]:
        return await ws.map_children(
            ctx, asking_or_bad, [{"doc": "bad"}, {"doc": "ok"}], on_error="wait_for_all"
        )

    parent = ws.Pipeline("fan-mixed", [fan])
    async with ws.Engine.open(db, pipelines=[parent, asking_or_bad]) as engine:
        with anyio.fail_after(SAFETY):
            run = await engine.start(parent)
        assert run.status == "failed" and run.error is not None
        assert "1 of 2 children failed" in run.error.message
        kids = sorted(await children_of(engine, run.run_id), key=lambda k: str(k.input))
        assert [(k.input, k.status) for k in kids] == [
            ({"doc": "bad"}, "failed"),
            ({"doc": "ok"}, "cancelled"),
        ]
        assert [r.run_id for r in await engine.list(status="paused")] == []


CRASH_AFTER_FAILURE = """
import os, signal, sys

import anyio

import waystation as ws


@ws.stage
async def kid(ctx: ws.StageContext) -> int:
    return await ctx.run_child(asking, {})


@ws.stage
async def boom() -> int:
    raise RuntimeError("boom")


asking = ws.Pipeline("asking", [ws.gate("sure", schema=bool)])
parent = ws.Pipeline("group-kid", [ws.parallel(kid, boom, name="g", on_error="wait_for_all")])
failed = ws.Engine._failed


async def die(self, record, failed_at):
    if record.run_id == self.parent_id:
        # Its failure is committed, its paused child not yet cancelled: die here.
        os.kill(os.getpid(), signal.SIGKILL)
    await failed(self, record, failed_at)


async def main(db):
    ws.Engine._failed = die
    async with ws.Engine.open(db, pipelines=[parent, asking]) as engine:
        run = await engine.submit(parent)
        engine.parent_id = run.run_id
        print(run.run_id, flush=True)
        await anyio.sleep(60)


if __name__ == "__main__":
    anyio.run(main, sys.argv[1])
"""


async def test_a_crash_after_a_failure_leaves_no_child_open(tmp_path: Path) -> None:
    """The process is SIGKILLed after a parent's failure is committed and before it cancels
    the sibling paused at its gate. The next engine cancels that child (after a lease time,
    so as not to race a live engine doing it), and nothing stays recorded."""
    db, script = tmp_path / "runs.db", tmp_path / "crash_after_failure.py"
    script.write_text(CRASH_AFTER_FAILURE)
    with anyio.fail_after(SAFETY):
        done = await anyio.run_process([sys.executable, str(script), str(db)], check=False)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()
    run_id = done.stdout.decode().split()[0]

    def rows(sql: str) -> list[Any]:
        with closing(sqlite3.connect(db)) as conn:
            return conn.execute(sql).fetchall()

    assert rows(f"SELECT status FROM runs WHERE run_id = '{run_id}'") == [("failed",)]
    kids = f"SELECT pipeline, status FROM runs WHERE parent_run_id = '{run_id}'"
    assert rows(kids) == [("asking", "paused")]
    assert rows("SELECT run_id FROM cascades") == [(run_id,)]

    spec = importlib.util.spec_from_file_location("crash_after_failure", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    async with ws.Engine.open(
        db, pipelines=[module.parent, module.asking], lease_ttl=0.3, poll_interval=0.05
    ) as engine:

        async def cancelled() -> bool:
            return (await children_of(engine, run_id))[0].status != "paused"

        await wait_until("the paused child cancelled", cancelled, timeout=SAFETY, poll=0.05)
        (child,) = await children_of(engine, run_id)
        assert child.status == "cancelled"
        assert (await engine.history(child.run_id))[-1].event == "cancelled"
        assert (await engine.get(run_id)).status == "failed"
    assert rows("SELECT run_id FROM cascades") == []


async def test_a_long_walk_after_a_crash_holds_up_neither_open_nor_the_leases(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Recovery's walk through what ended runs left open runs in a task of its own: while
    it is under way (here: held), `Engine.open` returns, the engine keeps polling, and a
    second walk is not started beside it. Released, it cancels the child."""
    ask = ws.Pipeline("walk-ask", [ws.gate("ok", schema=bool)])

    @ws.stage
    async def launch(ctx: ws.StageContext) -> bool:
        return bool(await ctx.run_child(ask, {}))

    parent = ws.Pipeline("walk-parent", [launch])
    async with ws.Engine.open(db, pipelines=[parent, ask]) as engine:
        run = await engine.start(parent)
        assert run.status == "paused"
        await engine.cancel(run.run_id)
        (kid,) = await children_of(engine, run.run_id)
    with closing(sqlite3.connect(db)) as conn, conn:  # as a crash before the walk leaves it
        conn.execute("UPDATE runs SET status = 'paused' WHERE run_id = ?", (kid.run_id,))
        conn.execute("INSERT INTO cascades VALUES (?, ?)", (run.run_id, time.time()))

    held, walks, polls = anyio.Event(), [], []
    walk = ws.Engine._cancel_below
    recover = ws.Engine.recover

    async def slow_walk(self: ws.Engine, parents: list[str], **kw: Any) -> int:
        walks.append(parents)
        await held.wait()
        return await walk(self, parents, **kw)

    async def counted(self: ws.Engine) -> int:
        polls.append(1)
        return await recover(self)

    monkeypatch.setattr(ws.Engine, "_cancel_below", slow_walk)
    monkeypatch.setattr(ws.Engine, "recover", counted)
    with anyio.fail_after(SAFETY):
        async with ws.Engine.open(
            db, pipelines=[parent, ask], poll_interval=0.02, lease_ttl=0.2
        ) as engine:
            await wait_until("the walk under way", lambda: bool(walks), SAFETY)
            polled = len(polls)
            await wait_until("polls during the walk", lambda: len(polls) > polled + 3, SAFETY)
            assert walks == [[run.run_id]]  # one walk, still held
            assert (await engine.get(kid.run_id)).status == "paused"
            held.set()

            async def cancelled() -> bool:
                return (await engine.get(kid.run_id)).status == "cancelled"

            await wait_until("the child cancelled", cancelled, SAFETY)
    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT * FROM cascades").fetchall() == []


@ws.stage
async def check_doc(doc: str) -> str:
    if doc == "bad":
        raise ValueError("bad doc")
    return doc


asking_or_bad = ws.Pipeline("asking-or-bad", [check_doc, ws.gate("sure", schema=Review)])


async def test_a_group_failing_cancels_the_paused_child_of_a_branch(db: Path) -> None:
    """A parallel group (wait_for_all): one branch fails, another is a child pipeline that
    pauses. The run fails; the child does not stay paused."""

    @ws.stage
    async def kid(ctx: ws.StageContext) -> Any:
        return await ctx.run_child(reviewing, {"doc": "y"})

    @ws.stage
    async def boom() -> int:
        raise RuntimeError("boom")

    group = ws.parallel(kid, boom, name="g", on_error="wait_for_all")
    parent = ws.Pipeline("group-kid", [group])
    async with ws.Engine.open(db, pipelines=[parent, reviewing]) as engine:
        with anyio.fail_after(SAFETY):
            run = await engine.start(parent)
        assert run.status == "failed"
        kids = await children_of(engine, run.run_id)
        assert [(k.pipeline, k.status) for k in kids] == [("reviewing", "cancelled")]
        assert [r.run_id for r in await engine.list(status="paused")] == []
    with closing(sqlite3.connect(db)) as conn:  # the walk is done: nothing left for recovery
        assert conn.execute("SELECT * FROM cascades").fetchall() == []


async def test_a_retried_map_cancels_the_paused_children_of_its_failed_attempt(db: Path) -> None:
    """Attempt 1 of a `map_children` stage: one child fails, one pauses. The stage is
    retried (its `Retry`), and attempt 2 launches both afresh (neither succeeded). Attempt
    1's paused child must not stay open beside attempt 2's (answering it would go nowhere)."""
    flaky = Counter[str]()

    @ws.stage
    async def check_once(doc: str) -> str:
        flaky[doc] += 1
        if doc == "bad" and flaky[doc] == 1:
            raise ValueError("bad doc, the first time")
        return doc

    kids_pipeline = ws.Pipeline("check-then-ask", [check_once, ws.gate("sure", schema=Review)])

    @ws.stage(retry=ws.Retry(attempts=2))
    async def fan(ctx: ws.StageContext) -> list[Any]:
        return await ws.map_children(
            ctx, kids_pipeline, [{"doc": "bad"}, {"doc": "ok"}], on_error="wait_for_all"
        )

    parent = ws.Pipeline("fan-retried", [fan])
    async with ws.Engine.open(db, pipelines=[parent, kids_pipeline]) as engine:
        with anyio.fail_after(SAFETY):
            run = await engine.start(parent)
        assert run.status == "paused"  # attempt 2: both children at their gates
        kids = await children_of(engine, run.run_id)
        statuses = Counter((str(k.input), k.status) for k in kids)
        assert statuses == Counter(
            {
                ("{'doc': 'bad'}", "failed"): 1,  # attempt 1
                ("{'doc': 'ok'}", "cancelled"): 1,  # attempt 1, cancelled with its stage
                ("{'doc': 'bad'}", "paused"): 1,  # attempt 2
                ("{'doc': 'ok'}", "paused"): 1,  # attempt 2
            }
        )
        assert len(run.pauses) == 2


async def test_a_retry_racing_the_failure_walk_keeps_its_new_children(db: Path) -> None:
    """A run fails and leaves a child paused; before the walk that cancels it gets to the
    run's children, a retry of the run (a supervisor, say) has launched new ones. The walk
    cancels the failed attempt's child only: the new attempt's child stays paused."""
    tries = Counter[str]()

    @ws.stage
    async def fan(ctx: ws.StageContext) -> list[Any]:
        tries["fan"] += 1
        docs = ["bad", "ok"] if tries["fan"] == 1 else ["ok"]
        return await ws.map_children(
            ctx, asking_or_bad, [{"doc": d} for d in docs], on_error="wait_for_all"
        )

    @ws.stage
    async def judge(fan: list[Any]) -> int:
        return len(fan)

    parent = ws.Pipeline("retried-under-walk", [fan, judge])
    async with ws.Engine.open(db, pipelines=[parent, asking_or_bad]) as engine:
        list_runs = engine.store.list_runs
        retried: list[ws.Run] = []
        walked = False

        async def retry_first(**kw: Any) -> Any:
            nonlocal walked
            if kw.get("parent_run_id") == run_id and not walked:
                walked = True  # the walk's first look; the retry's own looks go through
                retried.append(await engine.retry(run_id))  # waits: it pauses on its child
            return await list_runs(**kw)

        with anyio.fail_after(SAFETY):
            # the map cancels its own open children when it fails: keep it from doing so,
            # so that the run's failure walk is what meets them
            cancel_calls = engine.children.cancel_calls

            async def keep_open(*args: Any) -> None:
                del args

            engine.children.cancel_calls = keep_open  # type: ignore[method-assign]
            engine.store.list_runs = retry_first  # type: ignore[method-assign]
            run = await engine.submit(parent)
            run_id = run.run_id
            first = await engine.wait(run_id)
            engine.children.cancel_calls = cancel_calls  # type: ignore[method-assign]
            engine.store.list_runs = list_runs  # type: ignore[method-assign]
            assert first.status == "failed"
            assert [r.status for r in retried] == ["paused"]
            kids = await children_of(engine, run_id)
            by_status = Counter((str(k.input), k.status) for k in kids)
            assert by_status == Counter(
                {
                    ("{'doc': 'bad'}", "failed"): 1,
                    ("{'doc': 'ok'}", "cancelled"): 1,  # the failed attempt's
                    ("{'doc': 'ok'}", "paused"): 1,  # the retry's, left alone
                }
            )
            assert (await engine.get(run_id)).status == "paused"


# -- a new attempt takes the children an earlier one finished --------------------------------

checked: Counter[str] = Counter()


@ws.stage
async def check(doc: str) -> str:
    checked[doc] += 1
    if doc.startswith("flaky") and checked[doc] == 1:
        raise ValueError(f"{doc}: down the first time")
    return doc.upper()


checking = ws.Pipeline("checking", [check])


async def test_a_retried_map_takes_the_children_that_succeeded_before(db: Path) -> None:
    """Attempt 1 of a map: two children succeed, one fails. Attempt 2 (the stage's Retry)
    takes the two finished outputs and launches only the failed call again."""
    checked.clear()

    @ws.stage(retry=ws.Retry(attempts=2))
    async def fan(ctx: ws.StageContext) -> list[Any]:
        docs = ["a", "flaky-b", "c"]
        return await ws.map_children(ctx, checking, [{"doc": d} for d in docs])

    parent = ws.Pipeline("fan-reused", [fan])
    async with ws.Engine.open(db, pipelines=[parent, checking]) as engine:
        with anyio.fail_after(SAFETY):
            run = await engine.start(parent)
        assert run.status == "succeeded" and run.output == ["A", "FLAKY-B", "C"]
        assert checked == Counter({"a": 1, "flaky-b": 2, "c": 1})
        kids = Counter((str(k.input), k.status) for k in await children_of(engine, run.run_id))
        assert kids == Counter(
            {
                ("{'doc': 'a'}", "succeeded"): 1,
                ("{'doc': 'flaky-b'}", "failed"): 1,  # attempt 1
                ("{'doc': 'flaky-b'}", "succeeded"): 1,  # attempt 2
                ("{'doc': 'c'}", "succeeded"): 1,
            }
        )


async def test_engine_retry_takes_the_children_that_succeeded_before(db: Path) -> None:
    """The same through `engine.retry` of the failed run, over a restart: and a call whose
    input changed in the new attempt gets a new child."""
    checked.clear()
    docs = ["a", "flaky-b", "c"]

    @ws.stage
    async def fan(ctx: ws.StageContext) -> list[Any]:
        return await ws.map_children(ctx, checking, [{"doc": d} for d in docs])

    parent = ws.Pipeline("fan-retried-run", [fan])
    async with ws.Engine.open(db, pipelines=[parent, checking]) as engine:
        with anyio.fail_after(SAFETY):
            failed = await engine.start(parent)
    assert failed.status == "failed" and checked == Counter({"a": 1, "flaky-b": 1, "c": 1})
    docs[2] = "d"  # the retried stage asks for another third document
    async with ws.Engine.open(db, pipelines=[parent, checking]) as engine:
        with anyio.fail_after(SAFETY):
            done = await engine.retry(failed.run_id)
        assert done.status == "succeeded" and done.output == ["A", "FLAKY-B", "D"]
        kids = await children_of(engine, failed.run_id)
    assert checked == Counter({"a": 1, "flaky-b": 2, "c": 1, "d": 1})
    assert Counter(k.status for k in kids) == Counter({"succeeded": 4, "failed": 1})


async def test_a_retried_branch_takes_its_child_that_succeeded_before(db: Path) -> None:
    """A branch of a parallel group launches a child, then fails; its Retry takes the
    child's output instead of running it again (the other branch's key is not taken)."""
    checked.clear()
    tries = Counter[str]()

    @ws.stage(retry=ws.Retry(attempts=2))
    async def left(ctx: ws.StageContext) -> str:
        got = await ctx.run_child(checking, {"doc": "x"})
        tries["left"] += 1
        if tries["left"] == 1:
            raise RuntimeError("after the child, the first time")
        return str(got)

    @ws.stage
    async def right(ctx: ws.StageContext) -> str:
        return str(await ctx.run_child(checking, {"doc": "x"}))

    parent = ws.Pipeline("branches-reused", [ws.parallel(left, right, name="both")])
    async with ws.Engine.open(db, pipelines=[parent, checking]) as engine:
        with anyio.fail_after(SAFETY):
            run = await engine.start(parent)
        assert run.status == "succeeded"
        assert run.output == {"left": "X", "right": "X"}
        kids = await children_of(engine, run.run_id)
    assert checked == Counter({"x": 2})  # one child per branch, the left one not run again
    assert len(kids) == 2


# -- a parent waiting on a child that sleeps durably -------------------------------------------

DAY = 86_400.0


@ws.stage
async def doze(n: int, ctx: ws.StageContext) -> int:
    """Sleeps a day when n is 0 (durably: the child is parked), then returns n * 10."""
    if n == 0:
        await ctx.sleep(DAY)
    executed[f"doze:{n}"] += 1
    return n * 10


dozing = ws.Pipeline("dozing", [doze])


@ws.stage
async def await_dozer(n: int, ctx: ws.StageContext) -> int:
    executed["await_dozer"] += 1
    return int(await ctx.run_child(dozing, {"n": n}))


@ws.stage
async def map_dozers(ctx: ws.StageContext) -> list[int]:
    executed["map_dozers"] += 1
    return list(await ws.map_children(ctx, dozing, [{"n": 0}, {"n": 1}, {"n": 2}]))


@ws.stage
async def two_at_once(ctx: ws.StageContext) -> list[int]:
    """Waits on a sleeping child and a quick one in a task group of its own."""
    executed["two_at_once"] += 1
    out: dict[int, int] = {}

    async def one(n: int) -> None:
        out[n] = int(await ctx.run_child(dozing, {"n": n}))

    async with anyio.create_task_group() as tg:
        tg.start_soon(one, 0)
        tg.start_soon(one, 1)
    return [out[0], out[1]]


DOZING_PARENTS = {
    "run_child": (ws.Pipeline("awaits-dozer", [await_dozer]), 0),
    "map_children": (ws.Pipeline("maps-dozers", [map_dozers]), [0, 10, 20]),
    "task group": (ws.Pipeline("two-at-once", [two_at_once]), [0, 10]),
    "parallel branch": (
        ws.Pipeline("group-dozer", [ws.parallel(await_dozer, extract, name="g")]),
        {"await_dozer": 0, "extract": "A"},
    ),
}


def _count_reads(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Reads of each run's row through the store, from now on."""
    reads: Counter[str] = Counter()
    get_run = ws.SQLiteStore.get_run

    async def counted(self: ws.SQLiteStore, run_id: str) -> Any:
        reads[run_id] += 1
        return await get_run(self, run_id)

    monkeypatch.setattr(ws.SQLiteStore, "get_run", counted)
    return reads


async def _asleep_child(engine: ws.Engine, parent_id: str) -> str:
    """The id of the parent's child once it sleeps (pending, with a wake-up time)."""
    found: list[str] = []

    async def asleep() -> bool:
        kids = await engine.list(parent_run_id=parent_id)
        found[:] = [k.run_id for k in kids if k.status == "pending"]
        return bool(found)

    await wait_until("a child asleep", asleep, SAFETY)
    return found[0]


@pytest.mark.parametrize("how", list(DOZING_PARENTS))
async def test_a_parent_waiting_on_a_sleeping_child_does_not_poll_it(
    db: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """Before: the parent read the sleeping child's row about twice a second for the whole
    sleep. Now it waits for the child's wake-up on the engine's clock (or a change made
    here, or a lease time for changes made elsewhere: an hour here) and goes on then,
    its stage run once."""
    executed.clear()
    reads = _count_reads(monkeypatch)
    parent, output = DOZING_PARENTS[how]
    clock = ws.ManualClock(start=1_000_000.0)
    async with ws.Engine.open(db, pipelines=[parent], clock=clock, lease_ttl=3600) as engine:
        run = await engine.submit(parent, {"n": 0, "doc": "a"})
        child = await _asleep_child(engine, run.run_id)
        await anyio.sleep(0.1)  # the parent's first look at the child asleep
        before = reads[child]
        await anyio.sleep(0.5)
        assert reads[child] - before == 0  # before: 4-6 reads in these 0.5 s
        assert (await engine.get(run.run_id)).status == "running"
        clock.advance(DAY)
        done = await engine.wait(run.run_id, timeout=SAFETY)
    assert done.status == "succeeded" and done.output == output
    stage = {"map_children": "map_dozers", "task group": "two_at_once"}.get(how, "await_dozer")
    assert executed[stage] == 1 and executed["doze:0"] == 1


async def test_a_parent_learns_at_once_that_its_sleeping_child_was_cancelled(db: Path) -> None:
    """With an hour between looks, only the cancel's own word can tell the parent."""
    parent, _ = DOZING_PARENTS["run_child"]
    clock = ws.ManualClock(start=1_000_000.0)
    async with ws.Engine.open(db, pipelines=[parent], clock=clock, lease_ttl=3600) as engine:
        run = await engine.submit(parent, {"n": 0})
        await engine.cancel(await _asleep_child(engine, run.run_id))
        done = await engine.wait(run.run_id, timeout=SAFETY)
    assert done.status == "failed" and done.error is not None
    assert done.error.type == "waystation.errors.ChildFailed"
    assert "cancelled" in done.error.message


async def test_a_child_cancelled_just_after_its_parent_read_it_still_tells_the_parent(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cancel lands between the parent's read of its child (asleep) and the start of
    its wait: the word must not be lost (with an hour between looks, it would be)."""
    get_run = ws.SQLiteStore.get_run
    cancelled: list[str] = []

    async def read_then_cancel(self: ws.SQLiteStore, run_id: str) -> Any:
        record = await get_run(self, run_id)
        if record is not None and record.status == "pending" and not cancelled:
            cancelled.append(run_id)  # the parent holds the row read as asleep
            await engine.cancel(run_id)
        return record

    parent, _ = DOZING_PARENTS["run_child"]
    clock = ws.ManualClock(start=1_000_000.0)
    monkeypatch.setattr(ws.SQLiteStore, "get_run", read_then_cancel)
    async with ws.Engine.open(db, pipelines=[parent], clock=clock, lease_ttl=3600) as engine:
        run = await engine.submit(parent, {"n": 0})
        done = await engine.wait(run.run_id, timeout=SAFETY)
    assert cancelled and done.status == "failed" and done.error is not None
    assert done.error.type == "waystation.errors.ChildFailed"


# -- children of parallel branches -------------------------------------------------------------


@ws.stage
async def echo(tag: str) -> str:
    await anyio.sleep(0.05)  # both branches' launches in flight at once
    return tag


echoing = ws.Pipeline("echoing", [echo])


@ws.stage
async def left(ctx: ws.StageContext) -> str:
    return str(await ctx.run_child(echoing, {"tag": "L"}))


@ws.stage
async def right(ctx: ws.StageContext) -> str:
    return str(await ctx.run_child(echoing, {"tag": "R"}))


async def test_two_branches_each_get_their_own_child(db: Path) -> None:
    """Before: both branches' first calls had one key (the group's stage index, call 0),
    so the right branch got the left one's child and returned "L"."""
    parent = ws.Pipeline("two-branches", [ws.parallel(left, right, name="g")])
    async with ws.Engine.open(db, pipelines=[parent]) as engine:
        run = await engine.start(parent)
        kids = await engine.list(parent_run_id=run.run_id)
    assert run.status == "succeeded" and run.output == {"left": "L", "right": "R"}
    assert sorted(k.input["tag"] for k in kids) == ["L", "R"]


asks_child = ws.Pipeline("asks-child", [ws.gate("child_ok", schema=bool)])


@ws.stage
async def asks(ctx: ws.StageContext) -> bool:
    return bool(await ctx.run_child(asks_child, {}))


async def test_a_branch_child_keyed_the_old_way_is_found_again(db: Path) -> None:
    """A run paused in a group before branch keys named the branch: its branch, entered
    again once the child's pause is answered, finds its child under the old key rather
    than launching (and pausing) a new one. The other branch's call 0 is not given it."""
    parent = ws.Pipeline("old-branch-key", [ws.parallel(asks, right, name="g")])
    async with ws.Engine.open(db, pipelines=[parent]) as engine:
        run = await engine.start(parent)
        assert run.status == "paused"
        kids = await engine.list(parent_run_id=run.run_id)
    (child,) = [k for k in kids if k.pipeline == "asks-child"]
    with closing(sqlite3.connect(db)) as conn, conn:
        (key,) = conn.execute(
            "SELECT idempotency_key FROM runs WHERE run_id = ?", (child.run_id,)
        ).fetchone()
        assert key.endswith("@g.asks")
        conn.execute(  # as an engine before this change keyed it
            "UPDATE runs SET idempotency_key = ? WHERE run_id = ?",
            (key.removesuffix("@g.asks"), child.run_id),
        )
        conn.execute(  # and created the parent: without the mark of the new keys
            "UPDATE transitions SET payload = json_remove(payload, '$.child_keys') "
            "WHERE run_id = ? AND event = 'created'",
            (run.run_id,),
        )
    async with ws.Engine.open(db, pipelines=[parent]) as engine:
        (pause,) = (await engine.get(run.run_id)).pauses
        await engine.resume(run.run_id, True, pause_id=pause.pause_id, wait=False)
        done = await engine.wait(run.run_id, timeout=SAFETY)
        kids = await engine.list(parent_run_id=run.run_id)
    assert done.status == "succeeded" and done.output == {"asks": True, "right": "R"}
    assert sorted(k.pipeline for k in kids) == ["asks-child", "echoing"]
