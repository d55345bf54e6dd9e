"""Writes a batch applies together (create, step, finish): each caller still gets its own
outcome when some of the batch's rows do not apply, and nothing of the others is lost."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from waystation.store.base import Guard, NewRun, NewTransition
from waystation.store.sqlite import SQLiteStore

from .runs import new_run

T = TypeVar("T")


def _run(run_id: str, **kw: Any) -> NewRun:
    return new_run(run_id, lease_owner="me", **kw)


async def _in_one_batch(store: SQLiteStore, calls: list[Callable[[], Awaitable[T]]]) -> list[T]:
    """Run the calls so that all their writes meet in one batch: hold the writer thread
    with a write that blocks until every call has queued its own."""
    gate = threading.Event()
    held = asyncio.ensure_future(store._write(lambda conn, rows: gate.wait(10)))
    await asyncio.sleep(0.05)  # the writer has taken the blocking write
    before = store.stats["batches"]

    async def call(c: Callable[[], Awaitable[T]]) -> T:
        return await c()

    # Each call starts in its own task, in list order, so the writes queue in that order.
    tasks = [asyncio.ensure_future(call(c)) for c in calls]
    await asyncio.sleep(0)  # each call has queued its write
    gate.set()
    await held
    results = await asyncio.gather(*tasks)
    assert store.stats["batches"] - before <= 2  # the holding batch and then theirs
    return results


def _rows(db: Path, sql: str, *params: Any) -> list[Any]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql, params).fetchall()


@pytest.mark.parametrize("clash", ["same id", "same idempotency key"])
async def test_creates_in_one_batch_report_existing_runs(db: Path, clash: str) -> None:
    store = SQLiteStore(db)
    await store.open()
    try:
        await store.create_run(_run("old", idempotency_key="k-old"))
        calls: list[Callable[[], Awaitable[Any]]] = [
            (lambda i=i: store.create_run(_run(f"r{i:03}"))) for i in range(300)
        ]
        again = _run("old") if clash == "same id" else _run("new-id", idempotency_key="k-old")
        calls.insert(100, lambda: store.create_run(again))
        results = await _in_one_batch(store, calls)
        flags = [created for created, _ in results]
        assert flags.count(False) == 1 and not flags[100]
        assert results[100][1].run_id == "old"
        assert all(record.seq == 2 for created, record in results if created)
        assert _rows(db, "SELECT COUNT(*) FROM runs")[0][0] == 301
        assert _rows(db, "SELECT COUNT(*) FROM journal")[0][0] == 2 * 301
        assert _rows(db, "SELECT COUNT(*) FROM journal WHERE run_id = 'new-id'")[0][0] == 0
    finally:
        await store.close()


@pytest.mark.parametrize("miss", ["lease taken", "cancel asked", "stale seq"])
async def test_steps_in_one_batch_fence_each_run_alone(db: Path, miss: str) -> None:
    store = SQLiteStore(db)
    await store.open()
    try:
        ids = [f"r{i:03}" for i in range(100)]
        for rid in ids:
            await store.create_run(_run(rid))
        if miss == "lease taken":  # by another engine
            await store.update_run("r042", Guard(("running",)), [], {"lease_owner": "other"})
        elif miss == "cancel asked":
            await store.update_run("r042", Guard(("running",)), [], {"cancel_requested": 1})
        rows = [
            NewTransition("succeeded", 0, "a", 1, payload="1"),
            NewTransition("started", 1, "b", 1),
        ]

        def step(rid: str) -> Callable[[], Awaitable[int | None]]:
            seq = 1 if rid == "r042" and miss == "stale seq" else 2
            return lambda: store.step_run(rid, "me", seq, 1, rows)

        results = await _in_one_batch(store, [step(rid) for rid in ids])
        missed = {rid for rid, r in zip(ids, results, strict=True) if r is None}
        assert missed == {"r042"}
        assert all(r == 4 for rid, r in zip(ids, results, strict=True) if rid not in missed)
        moved = _rows(db, "SELECT run_id FROM runs WHERE stage_index = 1 AND seq = 4")
        assert {r[0] for r in moved} == set(ids) - missed
        for rid in ids:
            events = [t.event for t in await store.history(rid)]
            expected = ["created", "started"] + ([] if rid in missed else ["succeeded", "started"])
            assert events == expected, rid
    finally:
        await store.close()


async def test_finishes_in_one_batch_return_their_commit_time(db: Path) -> None:
    store = SQLiteStore(db)
    await store.open()
    try:
        ids = [f"r{i:02}" for i in range(50)]
        for rid in ids:
            await store.create_run(_run(rid))
        await store.update_run("r13", Guard(("running",)), [], {"cancel_requested": 1})
        rows = [NewTransition("succeeded", 0, "a", 1, payload='"x"'), NewTransition("completed", 1)]
        calls = [
            (lambda rid=rid: store.finish_run(rid, "me", 2, 1, rows, f'"{rid}"')) for rid in ids
        ]
        results = await _in_one_batch(store, calls)
        assert results[13] is None
        for rid, at in zip(ids, results, strict=True):
            record = await store.get_run(rid)
            assert record is not None
            if rid == "r13":
                assert (record.status, record.seq, record.lease_owner) == ("running", 2, "me")
                continue
            assert at is not None and record.updated_at == at
            assert (record.status, record.stage_index, record.seq) == ("succeeded", 1, 4)
            assert (record.output, record.lease_owner, record.lease_expires) == (
                f'"{rid}"',
                None,
                None,
            )
            assert [t.event for t in await store.history(rid)][-1] == "completed"
    finally:
        await store.close()


async def test_a_failing_write_does_not_sink_the_batched_ones(db: Path) -> None:
    store = SQLiteStore(db)
    await store.open()
    try:
        for rid in ("a", "b"):
            await store.create_run(_run(rid))
        rows = [NewTransition("succeeded", 0, "a", 1), NewTransition("started", 1, "b", 1)]

        def boom(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
            conn.execute("INSERT INTO no_such_table VALUES (1)")

        async def failing() -> str:
            try:
                await store._write(boom)
            except Exception as exc:
                return type(exc).__name__
            return "no error"

        results = await _in_one_batch(
            store,
            [
                lambda: store.step_run("a", "me", 2, 1, rows),
                failing,
                lambda: store.step_run("b", "me", 2, 1, rows),
            ],
        )
        assert results == [4, "StoreError", 4]
    finally:
        await store.close()


@pytest.mark.parametrize("with_other", [False, True], ids=["alone", "with another step"])
@pytest.mark.parametrize("cancel_first", [False, True], ids=["step first", "cancel first"])
async def test_a_batch_keeps_queue_order_around_other_writes(
    db: Path, cancel_first: bool, with_other: bool
) -> None:
    """A step queued before a cancel request of its run applies; one queued after it does
    not, whatever else shares the batch."""
    store = SQLiteStore(db)
    await store.open()
    try:
        for rid in ("a", "b"):
            await store.create_run(_run(rid))
        rows = [NewTransition("succeeded", 0, "a", 1), NewTransition("started", 1, "b", 1)]

        def step(rid: str) -> Callable[[], Awaitable[int | None]]:
            return lambda: store.step_run(rid, "me", 2, 1, rows)

        async def cancel() -> int | None:
            guard = Guard(("running",))
            return await store.update_run("a", guard, [], {"cancel_requested": 1})

        named = {"cancel": cancel, "a": step("a"), "b": step("b")}
        names = ["cancel", "a"] if cancel_first else ["a", "cancel"]
        if with_other:
            names.append("b")
        results = await _in_one_batch(store, [named[n] for n in names])
        outcome = dict(zip(names, results, strict=True))
        assert outcome["a"] == (None if cancel_first else 4)
        assert outcome.get("b", 4) == 4
    finally:
        await store.close()


# -- folded journal rows (migration 0003) ------------------------------------------------------


async def test_a_stage_commit_is_one_stored_row_read_back_as_two(db: Path) -> None:
    store = SQLiteStore(db)
    await store.open()
    try:
        await store.create_run(_run("r"))  # created + started a: one row
        step = [
            NewTransition("succeeded", 0, "a", 1, payload="1"),
            NewTransition("started", 1, "b", 1),
        ]
        assert await store.step_run("r", "me", 2, 1, step) == 4
        # Not folded: a `started` with a payload (a branch's marker), a retry's `started` of
        # the same stage, and a `started` after a failure (an error of its own comes first).
        retry = [
            NewTransition("retrying", 1, "b", 1, error='{"e": 1}'),
            NewTransition("started", 1, "b", 2),
            NewTransition("started", 2, "c", 1, payload='"marker"'),
        ]
        assert await store.update_run("r", Guard(("running",)), retry) == 7
        end = [NewTransition("succeeded", 2, "c", 1, payload="3"), NewTransition("completed", 3)]
        assert await store.finish_run("r", "me", 7, 3, end, "3") is not None
        logical = await store.history("r")
        expected = [
            ("created", None, None, 0, None, None),
            ("started", 0, "a", 1, None, None),
            *[(t.event, t.stage_index, t.stage_path, t.attempt, t.payload, t.error) for t in step],
            *[(t.event, t.stage_index, t.stage_path, t.attempt, t.payload, t.error) for t in retry],
            *[(t.event, t.stage_index, t.stage_path, t.attempt, t.payload, t.error) for t in end],
        ]
        assert [
            (t.event, t.stage_index, t.stage_path, t.attempt, t.payload, t.error) for t in logical
        ] == expected
        assert [t.seq for t in logical] == list(range(1, 10))
        # Stored: created+started, succeeded+started, retrying, started (attempt 2),
        # started (marker), succeeded+completed.
        assert _rows(db, "SELECT COUNT(*) FROM transitions WHERE run_id = 'r'") == [(6,)]
        view = _rows(db, "SELECT * FROM journal WHERE run_id = 'r' ORDER BY seq")
        assert view == [
            (
                t.run_id,
                t.seq,
                t.stage_index,
                t.stage_path,
                t.event,
                t.attempt,
                t.payload,
                t.error,
                t.at,
            )
            for t in logical
        ]
        # 4 started + 1 retrying, read up to the completed row folded into the last one.
        assert await store.count_stage_executions("r") == {"r": (5, 9)}

        # Every position, and every page size, reads the same rows after it: a folded row
        # gives both its transitions.
        positions = set()
        for k, t in enumerate(logical):
            assert [x.seq for x in await store.history("r", after_seq=t.seq)] == list(
                range(t.seq + 1, 10)
            )
            page = await store.run_journal("r", t.seq)
            assert page.rows == logical[k + 1 :]
            assert page.holder is not None
            positions.add(page.holder)
            if page.rows:  # the row holding the last one: the position of the run's end
                assert page.end == (await store.run_journal("r", 9)).holder
        assert len(positions) == 6  # 9 rows in 6 stored rows (three pairs folded)
        assert await store.run_journal("r", 0) == (None, logical, max(positions))
        assert await store.run_journal("r", 10) == (None, [], None)
        for limit in (1, 2, 3):
            for tree in (None, "r"):
                pages: list[Any] = []
                position = 0
                while True:
                    page = await store.journal_after(position, root_run_id=tree, limit=limit)
                    pages += page.rows
                    assert page.position >= position
                    position = page.position
                    if not page.more:
                        break
                assert pages == logical, (limit, tree)
                assert position == await store.journal_end()
        # The position of a time: just before the first row stamped at or after it.
        for t in logical:
            rest = (await store.journal_after(await store.journal_position(t.at))).rows
            assert rest[0].at == t.at and rest[-1] == logical[-1]
        assert await store.journal_position(logical[-1].at + 1) == await store.journal_end()
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("pair", "stored"),
    [
        # a stage commit: its outcome, then the next stage's start (folded into one row)
        ((NewTransition("succeeded", 3, "s3", 1, '"x"'), NewTransition("started", 4, "s4", 1)), 1),
        ((NewTransition("succeeded", 9, "s9", 2, "1"), NewTransition("completed", 10)), 1),
        ((NewTransition("created", payload="{}"), NewTransition("started", 0, "s0", 1)), 1),
        ((NewTransition("skipped", 1, "s1", 1), NewTransition("started", 2, "g.b", 3)), 1),
        # not folded: the second says something of its own, or is for another stage
        ((NewTransition("succeeded", 3, "s3", 1, "2"), NewTransition("started", 5, "s5", 1)), 2),
        (
            (NewTransition("succeeded", 3, "s", 1, "2"), NewTransition("started", 4, "t", 1, "{}")),
            2,
        ),
        ((NewTransition("failed", 3, "s3", 1, None, "{}"), NewTransition("completed", 4)), 1),
        (
            (
                NewTransition("retrying", 2, "s2", 1, None, "{}"),
                NewTransition("started", 2, "s2", 2),
            ),
            2,
        ),
        ((NewTransition("succeeded", 1, "s1", 1, "3"), NewTransition("paused", 2, "s2", 1)), 2),
    ],
)
def test_a_stage_commits_rows_are_those_of_the_general_path(
    pair: tuple[NewTransition, NewTransition], stored: int
) -> None:
    """`append` builds a two-transition write's rows at once (the stage commit's path); they
    must be exactly what the transition-at-a-time path builds, folded or not."""
    from waystation.store import batch

    fast: list[tuple[Any, ...]] = []
    each: list[tuple[Any, ...]] = []
    batch.append(fast, "r1", 7, list(pair), 123.5)
    batch._append_each(each, "r1", 7, list(pair), 123.5)
    assert fast == each
    assert len(fast) == stored
    assert fast[0][:2] == ("r1", 8)
