"""Live events (`subscribe`) on real SQLite: every row once, in order, filtered by run or tree,
across processes, snapshot + stream, until_settled, clean ends and rows stamped late."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import sys
import textwrap
import time
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

import waystation as ws
from waystation.engine.events import subscribe

LIMIT = 30.0
"""Bound of every wait (generous: a loaded 2-core box starting a Python subprocess)."""


class Decision(msgspec.Struct):
    ok: bool


@ws.stage
async def double(n: int) -> int:
    return n * 2


@ws.stage(retry=ws.Retry(attempts=2))
async def flaky(double: int, ctx: ws.StageContext) -> int:
    if ctx.attempt == 1:
        raise ValueError("first attempt fails")
    return double + 1


@ws.stage
async def label(flaky: int) -> str:
    return f"n={flaky}"


steps = ws.Pipeline("steps", [double, flaky, label])

approval = ws.gate("approval", schema=Decision, reason="go on?")


@ws.stage
async def finish(double: int, approval: Decision) -> str:
    return f"{double}:{approval.ok}"


gated = ws.Pipeline("gated", [double, approval, finish])


@ws.stage
async def inner_a(n: int) -> int:
    return n + 1


@ws.stage
async def inner_b(inner_a: int) -> int:
    return inner_a * 10


inner = ws.Pipeline("inner", [inner_a, inner_b])


@ws.stage
async def after(inner: int) -> str:
    return f"inner gave {inner}"


outer = ws.Pipeline("outer", [inner, after])


class Hold:
    """Holds the `held` stage until released (created inside each test's event loop)."""

    entered: anyio.Event
    release: anyio.Event


hold = Hold()


@ws.stage
async def held(double: int) -> int:
    hold.entered.set()
    await hold.release.wait()
    return double + 1


@ws.stage
async def tail(held: int) -> str:
    return f"n={held}"


holding = ws.Pipeline("holding", [double, held, tail])


@ws.stage(continue_on_error=True)
async def broken(n: int) -> int:
    raise RuntimeError("broken on purpose")


@ws.stage
async def survive(broken: ws.Failed | int) -> str:
    return "survived" if isinstance(broken, ws.Failed) else "fine"


@ws.stage
async def explode(n: int) -> int:
    raise RuntimeError("boom")


resilient = ws.Pipeline("resilient", [broken, survive])
doomed = ws.Pipeline("doomed", [explode])

PIPELINES = [steps, gated, outer, holding, resilient, doomed]


def key(t: ws.Transition) -> tuple[str, int]:
    return (t.run_id, t.seq)


async def collect(
    stream: AsyncGenerator[ws.Transition, None],
    stop: Callable[[list[ws.Transition]], bool] = lambda got: False,
) -> list[ws.Transition]:
    """Every transition until the stream ends or `stop(got)` holds; bounded."""
    got: list[ws.Transition] = []
    with anyio.fail_after(LIMIT):
        async with contextlib.aclosing(stream) as events:
            async for t in events:
                got.append(t)
                if stop(got):
                    break
    return got


def completed(run_id: str) -> Callable[[list[ws.Transition]], bool]:
    return lambda got: any(t.run_id == run_id and t.event == "completed" for t in got)


class SignallingStore(ws.SQLiteStore):
    """A store that says when a subscriber has made its first read (its starting point)."""

    def __init__(self, path: Path, watch: str | None = None) -> None:
        super().__init__(path)
        self.watch = watch
        self.first_read = asyncio.Event()

    async def get_run(self, run_id: str) -> Any:
        record = await super().get_run(run_id)
        if run_id == self.watch:
            self.first_read.set()
        return record

    async def journal_end(self) -> int:
        end = await super().journal_end()
        self.first_read.set()
        return end


@pytest.mark.parametrize("by", ["run_id", "everything"])
async def test_a_run_id_used_again_after_a_prune_is_streamed_as_a_new_run(
    db: Path, by: str
) -> None:
    """A pruned run's id may start a fresh run, numbered from 1 again. Before, a live
    subscriber took its rows for rows already delivered and dropped them (a run follower
    for ever, the all-runs one for five minutes)."""
    filters: dict[str, Any] = {"run_id": {"run_id": "job-1"}, "everything": {}}[by]

    def second_done(got: list[ws.Transition]) -> bool:
        return sum(t.run_id == "job-1" and t.event == "completed" for t in got) == 2

    got: list[ws.Transition] = []
    first_streamed = anyio.Event()
    async with ws.Engine.open(db, pipelines=PIPELINES) as engine:
        stream = subscribe(engine, since=time.time(), poll_interval=0.01, **filters)

        async def listen() -> None:
            async with contextlib.aclosing(stream) as events:
                async for t in events:
                    got.append(t)
                    if completed("job-1")(got):
                        first_streamed.set()
                    if second_done(got):
                        return

        with anyio.fail_after(LIMIT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(listen)
                first = await engine.start(steps, {"n": 1}, run_id="job-1")
                await first_streamed.wait()  # streamed before it goes
                assert await engine.prune(older_than=0) == 1
                second = await engine.start(steps, {"n": 10}, run_id="job-1")
        history = await engine.history("job-1")
    assert first.output != second.output
    mine = [t for t in got if t.run_id == "job-1"]
    assert [t.seq for t in mine] == [t.seq for t in history] * 2
    assert mine[len(history) :] == history


async def test_a_run_follower_that_delivered_nothing_sees_a_run_given_the_id_again(
    db: Path,
) -> None:
    """A stream of one run that began after the run finished has delivered nothing when the
    run is pruned and its id used again. Before, it waited for rows numbered above the
    first run's last, and so missed the new run."""
    async with ws.Engine.open(db, pipelines=PIPELINES) as engine:
        first = await engine.start(steps, {"n": 1}, run_id="job-2")
        assert first.status == "succeeded"
        got: list[ws.Transition] = []
        store = SignallingStore(db, watch="job-2")
        async with ws.Engine.open(store, recover=False) as watcher:

            async def listen() -> None:
                stream = subscribe(watcher, run_id="job-2", poll_interval=0.01)
                got.extend(await collect(stream, completed("job-2")))

            with anyio.fail_after(LIMIT):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(listen)
                    await store.first_read.wait()  # the stream begins after the first run
                    assert await engine.prune(older_than=0) == 1
                    second = await engine.start(steps, {"n": 10}, run_id="job-2")
        assert second.status == "succeeded" and second.output != first.output
        assert got == await engine.history("job-2")


# -- one run -----------------------------------------------------------------------------------


@pytest.mark.parametrize("by", ["run_id", "root_run_id", "everything"])
async def test_a_subscriber_receives_every_transition_once_in_order(db: Path, by: str) -> None:
    async with ws.Engine.open(db, pipelines=PIPELINES) as engine:
        since = time.time()
        run_id = "steps-1"
        filters: dict[str, Any] = {
            "run_id": {"run_id": run_id},
            "root_run_id": {"root_run_id": run_id},
            "everything": {},
        }[by]
        async with anyio.create_task_group() as tg:
            results: list[list[ws.Transition]] = []

            async def listen() -> None:
                stream = subscribe(engine, since=since, **filters)
                results.append(await collect(stream, completed(run_id)))

            tg.start_soon(listen)
            run = await engine.start(steps, {"n": 4}, run_id=run_id)
            assert run.status == "succeeded" and run.output == "n=9"
        (got,) = results
        history = await engine.history(run_id)
    assert got == history
    assert [t.seq for t in got] == list(range(1, len(history) + 1))
    assert "retrying" in [t.event for t in got]


async def test_the_default_start_is_when_iteration_begins(db: Path, tmp_path: Path) -> None:
    """Rows committed before the subscriber's first read are not delivered, later ones are:
    for one run (by its seq) and for every run (the rows already in the re-read window are
    remembered, so an earlier run's rows do not come back)."""
    async with ws.Engine.open(db, pipelines=PIPELINES) as engine:
        paused = await engine.start(gated, {"n": 1}, run_id="gated-1")
        assert paused.status == "paused"
        before = await engine.history("gated-1")
        earlier = await engine.start(steps, {"n": 1}, run_id="steps-early")
        assert earlier.status == "succeeded"

        run_store = SignallingStore(db, watch="gated-1")
        all_store = SignallingStore(db)
        async with (
            ws.Engine.open(run_store, recover=False) as run_watcher,
            ws.Engine.open(all_store, recover=False) as all_watcher,
        ):
            async with anyio.create_task_group() as tg:
                of_run: list[ws.Transition] = []
                of_all: list[ws.Transition] = []

                async def listen_run() -> None:
                    stream = subscribe(run_watcher, run_id="gated-1")
                    of_run.extend(await collect(stream, completed("gated-1")))

                async def listen_all() -> None:
                    stream = subscribe(all_watcher)
                    of_all.extend(await collect(stream, completed("steps-late")))

                tg.start_soon(listen_run)
                tg.start_soon(listen_all)
                with anyio.fail_after(LIMIT):
                    await run_store.first_read.wait()
                    await all_store.first_read.wait()
                done = await engine.resume("gated-1", {"ok": True})
                assert done.status == "succeeded" and done.output == "2:True"
                late = await engine.start(steps, {"n": 2}, run_id="steps-late")
                assert late.status == "succeeded"
        history = await engine.history("gated-1")
        late_history = await engine.history("steps-late")
    assert of_run == history[len(before) :]
    assert of_run[0].event == "resumed"
    assert "steps-early" not in {t.run_id for t in of_all}
    assert [t for t in of_all if t.run_id == "steps-late"] == late_history
    assert [t for t in of_all if t.run_id == "gated-1"] == history[len(before) :]
    assert len(set(map(key, of_all))) == len(of_all)


# -- filters -----------------------------------------------------------------------------------


async def test_filter_by_run_and_by_tree_with_a_child_pipeline(db: Path) -> None:
    async with ws.Engine.open(db, pipelines=PIPELINES) as engine:
        since = time.time()
        results: dict[str, list[ws.Transition]] = {}

        async def listen(name: str, **filters: Any) -> None:
            stream = subscribe(engine, since=since, until_settled=True, **filters)
            results[name] = await collect(stream)

        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: listen("outer", run_id="outer-1"))
            tg.start_soon(lambda: listen("tree", root_run_id="outer-1"))
            other = await engine.submit(steps, {"n": 3}, run_id="other-1")
            run = await engine.start(outer, {"n": 1}, run_id="outer-1")
            assert run.status == "succeeded" and run.output == "inner gave 20"
            assert (await engine.wait(other.run_id, timeout=LIMIT)).status == "succeeded"
        (child,) = await engine.list(parent_run_id="outer-1")
        assert child.pipeline == "inner" and child.root_run_id == "outer-1"
        # The child alone, checked against its tree; and a run that is not in that tree.
        of_child = await collect(
            subscribe(engine, run_id=child.run_id, root_run_id="outer-1", since=since),
            completed(child.run_id),
        )
        not_in_tree = await collect(subscribe(engine, run_id="other-1", root_run_id="outer-1"))
        outer_history = await engine.history("outer-1")
        child_history = await engine.history(child.run_id)

    assert results["outer"] == outer_history
    assert of_child == child_history
    assert not_in_tree == []
    tree = results["tree"]
    assert {t.run_id for t in tree} == {"outer-1", child.run_id}
    assert [t for t in tree if t.run_id == "outer-1"] == outer_history
    assert [t for t in tree if t.run_id == child.run_id] == child_history
    assert tree[-1].run_id == "outer-1" and tree[-1].event == "completed"
    assert [t.at for t in tree] == sorted(t.at for t in tree)  # commit order


# -- across processes --------------------------------------------------------------------------

REMOTE = """
import asyncio
import sys

import waystation as ws


@ws.stage
async def one(n: int) -> int:
    return n + 1


@ws.stage(retry=ws.Retry(attempts=2))
async def two(one: int, ctx: ws.StageContext) -> int:
    if ctx.attempt == 1:
        raise ValueError("try again")
    return one * 2


remote = ws.Pipeline("remote", [one, two])


async def main() -> None:
    async with ws.Engine.open(sys.argv[1], pipelines=[remote]) as engine:
        run = await engine.start(remote, {"n": 1}, run_id=sys.argv[2])
        assert run.status == "succeeded", run.error


asyncio.run(main())
"""


async def test_a_run_started_in_another_process(db: Path, tmp_path: Path) -> None:
    script = tmp_path / "remote.py"
    script.write_text(textwrap.dedent(REMOTE))
    run_id = "remote-1"
    # Create the database (and its schema) before the other process opens it.
    async with ws.Engine.open(db, recover=False) as engine:
        since = time.time()
        results: dict[str, list[ws.Transition]] = {}

        async def listen(name: str, stream: AsyncGenerator[ws.Transition, None]) -> None:
            results[name] = await collect(stream, completed(run_id))

        async with anyio.create_task_group() as tg:
            tg.start_soon(listen, "run", subscribe(engine, run_id=run_id, after_seq=0))
            tg.start_soon(listen, "all", subscribe(engine, since=since))
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                str(script),
                str(db),
                run_id,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            with anyio.fail_after(LIMIT):
                _, err = await proc.communicate()
            assert proc.returncode == 0, err.decode()
        history = await engine.history(run_id)
        assert (await engine.get(run_id)).status == "succeeded"
    assert results["run"] == history
    assert results["all"] == history
    assert [t.event for t in history].count("retrying") == 1


# -- snapshot + stream -------------------------------------------------------------------------


@pytest.mark.parametrize("release", ["before_iterating", "while_iterating"])
async def test_snapshot_then_stream_misses_nothing_and_repeats_nothing(
    db: Path, release: str
) -> None:
    hold.entered, hold.release = anyio.Event(), anyio.Event()
    async with ws.Engine.open(db, pipelines=PIPELINES) as engine:
        run = await engine.submit(holding, {"n": 5}, run_id="held-1")
        with anyio.fail_after(LIMIT):
            await hold.entered.wait()
        snapshot = await engine.history(run.run_id)
        assert snapshot[-1].event == "started" and snapshot[-1].stage_path == "held"
        stream = subscribe(engine, run_id=run.run_id, after_seq=snapshot[-1].seq)
        streamed: list[ws.Transition] = []
        if release == "before_iterating":
            hold.release.set()
            streamed = await collect(stream, completed(run.run_id))
        else:
            async with anyio.create_task_group() as tg:

                async def listen() -> None:
                    streamed.extend(await collect(stream, completed(run.run_id)))

                tg.start_soon(listen)
                hold.release.set()
        done = await engine.wait(run.run_id, timeout=LIMIT)
        assert done.status == "succeeded" and done.output == "n=11"
        history = await engine.history(run.run_id)
    assert snapshot + streamed == history
    assert [t.seq for t in snapshot + streamed] == list(range(1, len(history) + 1))


# -- until_settled -----------------------------------------------------------------------------


async def test_until_settled_stops_at_a_pause_and_at_completion(db: Path) -> None:
    async with ws.Engine.open(db, pipelines=PIPELINES) as engine:
        to_pause = subscribe(engine, run_id="gated-2", after_seq=0, until_settled=True)
        async with anyio.create_task_group() as tg:
            first: list[ws.Transition] = []

            async def listen() -> None:
                first.extend(await collect(to_pause))

            tg.start_soon(listen)
            paused = await engine.start(gated, {"n": 2}, run_id="gated-2")
            assert paused.status == "paused"
        assert first == await engine.history("gated-2")
        assert first[-1].event == "paused"

        # A settled run ends the stream at once; after the resume, at the completion.
        last = first[-1].seq
        assert await collect(subscribe(engine, run_id="gated-2", until_settled=True)) == []
        done = await engine.resume("gated-2", {"ok": False})
        assert done.status == "succeeded"
        rest = await collect(
            subscribe(engine, run_id="gated-2", after_seq=last, until_settled=True)
        )
        assert first + rest == await engine.history("gated-2")
        assert rest[0].event == "resumed" and rest[-1].event == "completed"


class SlowEndStore(ws.SQLiteStore):
    """A store whose `journal_end` is read only once `go` is set: the root commits meanwhile,
    as it may on a loaded machine between a stream's first two reads."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.asked = asyncio.Event()
        self.go = asyncio.Event()

    async def journal_end(self) -> int:
        self.asked.set()
        await self.go.wait()
        return await super().journal_end()


async def test_until_settled_ends_when_the_root_settles_as_the_stream_starts(db: Path) -> None:
    """Before, the stream read the root's position in its journal before the journal's end:
    rows the root committed in between were neither delivered nor counted, and the stream
    waited for them for ever."""
    store = SlowEndStore(db)
    async with ws.Engine.open(db, pipelines=PIPELINES) as engine:
        paused = await engine.start(gated, {"n": 1}, run_id="gated-9")
        assert paused.status == "paused"
        async with ws.Engine.open(store, recover=False) as watcher:
            got: list[ws.Transition] = []

            async def listen() -> None:
                stream = subscribe(
                    watcher, root_run_id="gated-9", until_settled=True, poll_interval=0.01
                )
                async with contextlib.aclosing(stream) as events:
                    got.extend([t async for t in events])

            with anyio.fail_after(LIMIT):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(listen)
                    await store.asked.wait()
                    done = await engine.resume("gated-9", {"ok": True})
                    assert done.status == "succeeded"
                    store.go.set()
    # The stream ended; the rows committed before its position count as before it.
    assert got == []


async def test_until_settled_passes_a_handled_failure_and_stops_at_a_final_one(db: Path) -> None:
    async with ws.Engine.open(db, pipelines=PIPELINES) as engine:
        streams = {
            "resilient-1": subscribe(engine, run_id="resilient-1", after_seq=0, until_settled=True),
            "doomed-1": subscribe(engine, root_run_id="doomed-1", until_settled=True, since=0),
        }
        results: dict[str, list[ws.Transition]] = {}
        async with anyio.create_task_group() as tg:
            for run_id, stream in streams.items():

                async def listen(run_id: str = run_id, stream: Any = stream) -> None:
                    results[run_id] = await collect(stream)

                tg.start_soon(listen)
            ok = await engine.start(resilient, {"n": 1}, run_id="resilient-1")
            assert ok.status == "succeeded" and ok.output == "survived"
            failed = await engine.start(doomed, {"n": 1}, run_id="doomed-1")
            assert failed.status == "failed"
        assert results["resilient-1"] == await engine.history("resilient-1")
        assert "failed" in [t.event for t in results["resilient-1"]]
        assert results["resilient-1"][-1].event == "completed"
        assert results["doomed-1"] == await engine.history("doomed-1")
        assert results["doomed-1"][-1].event == "failed"


# -- ending cleanly ----------------------------------------------------------------------------


async def test_aclose_and_cancellation_leave_no_tasks(db: Path) -> None:
    async with ws.Engine.open(db, pipelines=PIPELINES) as engine:
        run = await engine.start(steps, {"n": 1}, run_id="steps-2")
        assert run.status == "succeeded"
    # An observer (a web process, say): no worker, so no task of its own comes and goes.
    async with ws.Engine.open(db, recover=False) as engine:
        tasks = asyncio.all_tasks()

        for stream in (
            subscribe(engine, run_id="steps-2", after_seq=0),
            subscribe(engine, since=0.0),
        ):
            with anyio.fail_after(LIMIT):
                first = await anext(stream)
                second = await anext(stream)
            assert (first.seq, second.seq) == (1, 2)
            await stream.aclose()
            assert asyncio.all_tasks() == tasks

        # A consumer cancelled while the stream waits for rows that never come.
        reached = anyio.Event()

        async def consume() -> None:
            async for t in subscribe(engine, run_id="steps-2", after_seq=0):
                if t.event == "completed":
                    reached.set()

        consumer = asyncio.create_task(consume())
        with anyio.fail_after(LIMIT):
            await reached.wait()
        consumer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await consumer
        assert asyncio.all_tasks() == tasks


# -- rows stamped late (clock skew between writers) --------------------------------------------


def _insert(db: Path, run_id: str, seq: int, at: float) -> None:
    with contextlib.closing(sqlite3.connect(db, timeout=LIMIT)) as conn, conn:
        conn.execute(
            "INSERT INTO transitions (run_id, seq, event, attempt, at) VALUES (?, ?, ?, 0, ?)",
            (run_id, seq, "note", at),
        )
        conn.execute("UPDATE runs SET seq = ? WHERE run_id = ?", (seq, run_id))


@pytest.mark.parametrize("by", ["root_run_id", "everything"])
async def test_a_row_of_a_transaction_older_than_the_stream_is_delivered(db: Path, by: str) -> None:
    """Rows are stamped when written, inside their transaction, and a long transaction
    commits them well after that. A stream that began meanwhile must still deliver them.
    Before, streams followed the stamps with a one-second window, and missed them."""
    async with ws.Engine.open(db, pipelines=PIPELINES) as engine:
        paused = await engine.start(gated, {"n": 4}, run_id="gated-4")
        assert paused.status == "paused"
        n = len(await engine.history("gated-4"))
        store = SignallingStore(db)
        filters: dict[str, Any] = {"root_run_id": {"root_run_id": "gated-4"}, "everything": {}}
        async with ws.Engine.open(store, recover=False) as watcher:
            writer = sqlite3.connect(db, isolation_level=None, timeout=LIMIT)
            try:
                writer.execute("BEGIN IMMEDIATE")
                writer.execute(
                    "INSERT INTO transitions (run_id, seq, event, attempt, at) "
                    "VALUES ('gated-4', ?, 'note', 0, ?)",
                    (n + 1, time.time() - 60),
                )
                writer.execute("UPDATE runs SET seq = ? WHERE run_id = 'gated-4'", (n + 1,))
                got: list[ws.Transition] = []

                async def listen() -> None:
                    stream = subscribe(watcher, poll_interval=0.01, **filters[by])
                    got.extend(await collect(stream, lambda got: len(got) == 1))

                with anyio.fail_after(LIMIT):
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(listen)
                        await store.first_read.wait()  # the stream has begun
                        writer.execute("COMMIT")
            finally:
                writer.close()
    assert [(t.run_id, t.seq, t.event) for t in got] == [("gated-4", n + 1, "note")]


async def test_rows_stamped_behind_the_cursor_are_delivered_once(db: Path) -> None:
    """Another writer whose clock lags: its rows come in commit order, whatever their
    stamps say (once each, numbered without gaps)."""
    async with ws.Engine.open(db, pipelines=PIPELINES) as engine:
        paused = await engine.start(gated, {"n": 3}, run_id="gated-3")
        assert paused.status == "paused"
        history = await engine.history("gated-3")
        n = len(history)
        got: list[ws.Transition] = []
        stream = subscribe(engine, since=0)
        with anyio.fail_after(LIMIT):
            async with contextlib.aclosing(stream) as events:
                async for t in events:
                    got.append(t)
                    if len(got) == n:
                        cursor = max(t.at for t in got).timestamp()
                        await anyio.to_thread.run_sync(_insert, db, "gated-3", n + 1, cursor - 0.5)
                    elif len(got) == n + 1:
                        await anyio.to_thread.run_sync(_insert, db, "gated-3", n + 2, cursor - 60)
                        await anyio.to_thread.run_sync(_insert, db, "gated-3", n + 3, time.time())
                    elif len(got) == n + 3:
                        break
    assert got[:n] == history
    assert [t.seq for t in got] == list(range(1, n + 4))
    assert [t.event for t in got[n:]] == ["note", "note", "note"]


async def test_conflicting_arguments_are_refused(db: Path) -> None:
    async with ws.Engine.open(db, recover=False) as engine:
        for kwargs, message in (
            ({"after_seq": 3}, "pass run_id"),
            ({"run_id": "r", "after_seq": 3, "since": 0.0}, "not both"),
            ({"until_settled": True}, "needs a run"),
            ({"poll_interval": 0}, "positive"),
        ):
            with pytest.raises(ValueError, match=message):
                await anext(subscribe(engine, **kwargs))


async def test_engine_subscribe_is_the_same_stream(db: Path) -> None:
    """`Engine.subscribe` is the public face of `events.subscribe`."""
    pipe = ws.Pipeline("wired", [ws.gate("wait", schema=bool)])
    async with ws.Engine.open(db, pipelines=[pipe]) as engine:
        run = await engine.start(pipe)
        before = await engine.history(run.run_id)
        seen: list[str] = []
        async with contextlib.aclosing(
            engine.subscribe(run_id=run.run_id, after_seq=before[-1].seq, until_settled=True)
        ) as stream:
            await engine.resume(run.run_id, True)
            with anyio.fail_after(10):
                async for t in stream:
                    seen.append(t.event)
    assert seen == ["resumed", "succeeded", "completed"]
