"""The SQLite store on its own: group commit, guarded updates, isolation of a bad write."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import msgspec
import pytest

from waystation.errors import StoreError
from waystation.store.base import Guard, NewTransition
from waystation.store.sqlite import _MARK_CASCADE, _ROW_ROOM, SQLiteStore

from .runs import new_run


async def test_create_is_idempotent_by_id_and_key(db: Path) -> None:
    store = SQLiteStore(db)
    await store.open()
    try:
        created, first = await store.create_run(new_run("r1", idempotency_key="k"))
        assert created and first.seq == 2
        created, again = await store.create_run(new_run("r2", idempotency_key="k"))
        assert not created and again.run_id == "r1"
        created, same_id = await store.create_run(new_run("r1"))
        assert not created and same_id.run_id == "r1"
        assert [r.run_id for r in await store.list_runs()] == ["r1"]
        assert [t.event for t in await store.history("r1")] == ["created", "started"]
    finally:
        await store.close()


async def test_empty_strings_and_any_number_are_stored_as_given(db: Path) -> None:
    """The store binds None as a value of another type than its column holds (it is cheaper
    to bind than None) and SQL turns it back: a real "" (or "-1") in a text column, and
    -1 or 0 in a number column, must come back as given, not as NULL; None as None."""
    store = SQLiteStore(db)
    await store.open()
    try:
        kw: dict[str, Any] = {"parent_run_id": "", "idempotency_key": "", "replay_of": "-1"}
        kw |= {"lease_owner": "", "lease_expires": -1.0, "wake_at": 0.0}
        run = new_run("r1", **kw)
        run.transitions = [
            NewTransition("created", None, "", 0, None, ""),
            NewTransition("started", 0, "-1", 1),  # folded into the row before
            NewTransition("note", -1, "a", 2, "{}", "-1"),
            NewTransition("note", 0, None, 0, None, None),
        ]
        created, first = await store.create_run(run)
        assert created
        stored = await store.get_run("r1")
        assert stored == first
        assert (stored.parent_run_id, stored.idempotency_key, stored.replay_of) == ("", "", "-1")
        assert (stored.lease_owner, stored.lease_expires, stored.wake_at) == ("", -1.0, 0.0)
        assert (stored.output, stored.error, stored.pause, stored.cancel_requested) == (
            None,
            None,
            None,
            0,
        )
        rows = [
            (t.seq, t.event, t.stage_index, t.stage_path, t.attempt, t.payload, t.error)
            for t in await store.history("r1")
        ]
        assert rows == [
            (1, "created", None, "", 0, None, ""),
            (2, "started", 0, "-1", 1, None, None),
            (3, "note", -1, "a", 2, "{}", "-1"),
            (4, "note", 0, None, 0, None, None),
        ]
        # the empty key is a key like any other
        created, again = await store.create_run(new_run("r2", idempotency_key=""))
        assert not created and again.run_id == "r1"
        created, plain = await store.create_run(new_run("r3"))
        assert created and (plain.idempotency_key, plain.lease_owner, plain.wake_at) == (
            None,
            None,
            None,
        )
        stored3 = await store.get_run("r3")
        assert stored3 == plain
    finally:
        await store.close()


async def test_max_payload_is_the_connections_length_limit_less_room_for_the_row(
    db: Path, short_rows: int
) -> None:
    """An output of `max_payload` bytes fits in its journal row and in the run's row, with
    every id as long as the engine allows (512 characters of 4 bytes each)."""
    store = SQLiteStore(db)
    await store.open()
    try:
        assert store.max_payload == short_rows - _ROW_ROOM
        long = "\U0001d11e" * 512
        run = new_run(long, idempotency_key=long, parent_run_id=long, replay_of=long)
        await store.create_run(run)
        output = '"' + "x" * (store.max_payload - 2) + '"'
        seq = await store.update_run(
            long,
            Guard(("running",)),
            [NewTransition("succeeded", 0, long, 1, output), NewTransition("completed", 1)],
            {"status": "succeeded", "output": output, "lease_owner": long},
        )
        assert seq is not None
        stored = await store.get_run(long)
        assert stored is not None and stored.output == output
        assert [t.payload for t in await store.history(long)][-2] == output
        # the lowered limit is SQLite's own: past it, the write is refused
        await store.create_run(new_run("r2"))
        with pytest.raises(StoreError, match="too big"):
            await store.update_run(
                "r2", Guard(("running",)), [NewTransition("succeeded", 0, "a", 1, "x" * short_rows)]
            )
    finally:
        await store.close()


async def test_max_payload_follows_sqlites_own_limit(db: Path) -> None:
    store = SQLiteStore(db)
    await store.open()
    try:
        with contextlib.closing(sqlite3.connect(db)) as conn:
            assert store.max_payload == conn.getlimit(sqlite3.SQLITE_LIMIT_LENGTH) - _ROW_ROOM
    finally:
        await store.close()


async def test_guarded_update_applies_once(db: Path) -> None:
    store = SQLiteStore(db)
    await store.open()
    try:
        await store.create_run(new_run("r1"))
        await store.update_run("r1", Guard(("running",)), [], {"status": "paused"})
        guard = Guard(("paused",), seq=2)
        results = await asyncio.gather(
            *[
                store.update_run("r1", guard, [NewTransition("resumed", 0)], {"status": "running"})
                for _ in range(10)
            ]
        )
        assert sorted(results, key=lambda r: r is None) == [3] + [None] * 9
        events = [t.event for t in await store.history("r1")]
        assert events.count("resumed") == 1
    finally:
        await store.close()


async def test_owner_guard_fences_a_stale_driver(db: Path) -> None:
    store = SQLiteStore(db)
    await store.open()
    try:
        await store.create_run(new_run("r1", lease_owner="a", lease_expires=1.0))
        assert await store.update_run("r1", Guard(("running",), seq=2), [], {"lease_owner": "b"})
        stale = await store.update_run(
            "r1", Guard(("running",), owner="a"), [NewTransition("succeeded", 0)]
        )
        assert stale is None
        assert [t.event for t in await store.history("r1")] == ["created", "started"]
    finally:
        await store.close()


async def test_concurrent_writes_share_commits(db: Path) -> None:
    store = SQLiteStore(db)
    await store.open()
    try:
        await asyncio.gather(*[store.create_run(new_run(f"r{i:04d}")) for i in range(500)])
        stats = store.stats
        assert stats["writes"] == 500
        assert stats["batches"] < 500  # some commits carried several runs' writes
        assert len(await store.list_runs(limit=1000)) == 500
    finally:
        await store.close()


async def test_a_failing_write_does_not_sink_its_batch(db: Path) -> None:
    store = SQLiteStore(db)
    await store.open()
    try:
        await store.create_run(new_run("r1"))
        bad = store.update_run("r1", Guard(("running",)), [NewTransition("x", 0)])
        # A duplicate (run_id, seq) primary key: raises inside the writer's batch.
        dup = NewTransition("dup", 0)

        async def duplicate() -> None:
            def op(conn: sqlite3.Connection, rows: object) -> None:
                conn.execute(
                    "INSERT INTO transitions (run_id, seq, event, at) VALUES ('r1', 1, 'dup', 0)"
                )

            await store._write(op)

        good = [store.create_run(new_run(f"g{i}")) for i in range(20)]
        results = await asyncio.gather(bad, duplicate(), *good, return_exceptions=True)
        assert isinstance(results[1], Exception)
        assert all(not isinstance(r, BaseException) for i, r in enumerate(results) if i != 1)
        assert len(await store.list_runs(limit=100)) == 21
        assert dup.event == "dup"
    finally:
        await store.close()


async def test_writes_submitted_before_close_are_committed(db: Path) -> None:
    store = SQLiteStore(db)
    await store.open()
    pending = [asyncio.ensure_future(store.create_run(new_run(f"r{i}"))) for i in range(50)]
    await asyncio.sleep(0)
    await store.close()
    await asyncio.gather(*pending)
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 50


async def test_update_refuses_unknown_columns(db: Path) -> None:
    store = SQLiteStore(db)
    await store.open()
    try:
        with pytest.raises(ValueError, match="cannot set run columns"):
            await store.update_run("r1", Guard(("running",)), [], {"run_id; DROP TABLE runs": 1})
    finally:
        await store.close()


async def test_wal_and_synchronous_settings(db: Path) -> None:
    for durability, expected in (("full", 2), ("normal", 1)):
        store = SQLiteStore(db, durability=durability)  # type: ignore[arg-type]
        await store.open()
        try:
            writer = store._writer
            assert writer is not None
            conn = writer._conn
            mode = await store._write(
                lambda c, rows: c.execute("PRAGMA journal_mode").fetchone()[0]
            )
            sync = await store._write(lambda c, rows: c.execute("PRAGMA synchronous").fetchone()[0])
            assert conn is not None and mode == "wal" and sync == expected
        finally:
            await store.close()


async def test_the_check_for_open_children_uses_their_index(db: Path) -> None:
    """A run that ends looks for unfinished children in the same commit; through
    `runs_parent` it would read every child it ever had."""
    store = SQLiteStore(db)
    await store.open()
    await store.close()
    with sqlite3.connect(db) as conn:
        plan = conn.execute(f"EXPLAIN QUERY PLAN {_MARK_CASCADE}", ("r", 1.0)).fetchall()
    assert "USING INDEX runs_open_children" in " ".join(row[3] for row in plan), plan


async def test_wake_queries_use_the_wake_index(db: Path) -> None:
    """The timers ask for due runs and the next wake time often; through the status index
    they would visit every paused run (200 ms with a million), so they must use runs_wake."""
    store = SQLiteStore(db)
    await store.open()
    seen: list[str] = []
    read = store._read

    async def spy(sql: str, params: Any = ()) -> list[Any]:
        seen.append(sql)
        return await read(sql, params)

    store._read = spy  # type: ignore[method-assign]
    try:
        await store.next_wake()
        await store.due_runs(0.0)
        await store.due_runs(0.0, pipelines=["a", "b"], after=(0.0, "r"))
    finally:
        await store.close()
    assert len(seen) == 3
    with sqlite3.connect(db) as conn:
        for sql in seen:
            params = [0.0] * sql.count("?")
            plan = " ".join(row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params))
            assert "runs_wake" in plan, (sql, plan)


async def test_due_runs_page_by_cursor_and_pipeline(db: Path) -> None:
    """The timers read due runs a page at a time after a (wake_at, run_id) cursor, and only
    those of the pipelines they have: every due run comes once, in that order."""
    store = SQLiteStore(db)
    await store.open()
    try:
        for i in range(7):
            for name in ("a", "b"):
                run = new_run(f"{name}{i}", wake_at=float(i % 3))
                run.pipeline, run.status = name, "pending"
                await store.create_run(run)
        late = new_run("late", wake_at=99.0)
        late.status = "pending"
        await store.create_run(late)
        seen: list[str] = []
        after: tuple[float, str] | None = None
        while True:
            page = await store.due_runs(5.0, 2, pipelines={"a"}, after=after)
            seen += [r.run_id for r in page]
            if len(page) < 2:
                break
            after = (page[-1].wake_at or 0.0, page[-1].run_id)
        assert seen == ["a0", "a3", "a6", "a1", "a4", "a2", "a5"]
        assert await store.due_runs(5.0, pipelines=()) == []
        assert len(await store.due_runs(5.0)) == 14
    finally:
        await store.close()


async def test_a_run_ending_with_open_children_is_recorded_for_their_cancelling(
    db: Path,
) -> None:
    """An update that ends a run as failed or cancelled while it has an unfinished child
    records it (in the same commit) for its children to be cancelled, even if the process
    dies before doing so; a run without unfinished children, or one that ends otherwise, is
    not recorded. Clearing respects the time of the ending it was asked about, and pruning
    a tree forgets its records."""
    store = SQLiteStore(db)
    await store.open()
    try:
        for run_id in ("parent", "lonely", "done_kids", "paused_parent"):
            await store.create_run(new_run(run_id))
        for kid, parent in (
            ("kid", "parent"),
            ("finished_kid", "done_kids"),
            ("kid2", "paused_parent"),
        ):
            child = msgspec.structs.replace(new_run(kid, parent_run_id=parent), root_run_id=parent)
            await store.create_run(child)
        await store.update_run("finished_kid", Guard(("running",)), [], {"status": "succeeded"})
        ended = {"status": "failed", "lease_owner": None}
        failed = await store.settle_run("parent", Guard(("running",)), [], ended)
        assert failed is not None
        await store.update_run("lonely", Guard(("running",)), [], ended)
        await store.update_run("done_kids", Guard(("running",)), [], {"status": "cancelled"})
        await store.update_run("paused_parent", Guard(("running",)), [], {"status": "paused"})
        # A guard that fails records nothing either.
        assert await store.update_run("parent", Guard(("running",)), [], ended) is None

        assert await store.open_cascades(failed.updated_at) == []  # only older ones
        assert await store.open_cascades(failed.updated_at + 1) == [("parent", failed.updated_at)]
        await store.clear_cascade("parent", upto=failed.updated_at - 1)  # an earlier ending
        assert [r for r, _ in await store.open_cascades(failed.updated_at + 1)] == ["parent"]
        await store.clear_cascade("parent", upto=failed.updated_at)
        assert await store.open_cascades(failed.updated_at + 1) == []

        # Cancelled, the same; and a pruned tree takes its record with it.
        await store.update_run("paused_parent", Guard(("paused",)), [], {"status": "cancelled"})
        assert [r for r, _ in await store.open_cascades(2e9)] == ["paused_parent"]
        await store.update_run("kid2", Guard(("running",)), [], {"status": "cancelled"})
        assert (await store.prune(2e9, ("succeeded", "cancelled"))).deleted > 0
        assert await store.get_run("paused_parent") is None
        assert await store.open_cascades(2e9) == []
    finally:
        await store.close()


async def test_a_runs_input_is_kept_apart_from_its_row(db: Path) -> None:
    """The input is written once, to `run_inputs` (a run created alone and runs created in
    one batch alike), and read with the run everywhere a run is read; the row that every
    stage commit updates does not carry it. Set through an update, it is replaced there;
    a pruned run takes it with it."""
    store = SQLiteStore(db)
    await store.open()
    try:
        big = '{"doc": "' + "x" * 20_000 + '"}'
        created, alone = await store.create_run(msgspec.structs.replace(new_run("a"), input=big))
        assert created and alone.input == big
        many = await asyncio.gather(
            *[
                store.create_run(
                    msgspec.structs.replace(new_run(f"b{i:03d}"), input=f'{{"i": {i}}}')
                )
                for i in range(300)
            ]
        )
        assert store.stats["batches"] < 301  # some were created in one batch
        assert all(r.input == f'{{"i": {i}}}' for i, (_, r) in enumerate(many))
        assert (await store.get_run("a")).input == big  # type: ignore[union-attr]
        assert [r.input for r in await store.list_runs(limit=2)] == [big, '{"i": 0}']
        # Created again (the same id): nothing changes, the existing input comes back.
        created, again = await store.create_run(msgspec.structs.replace(new_run("a"), input="{}"))
        assert not created and again.input == big

        settled = await store.settle_run(
            "a", Guard(("running",)), [], {"status": "succeeded", "input": '{"doc": "y"}'}
        )
        assert settled is not None and settled.input == '{"doc": "y"}'
        assert (await store.get_run("a")).input == '{"doc": "y"}'  # type: ignore[union-attr]
        with sqlite3.connect(db) as conn:
            assert conn.execute("SELECT COUNT(*) FROM runs WHERE input IS NOT NULL").fetchone() == (
                0,
            )
            assert conn.execute("SELECT COUNT(*) FROM run_inputs").fetchone() == (301,)
        assert (await store.prune(2e9, ("succeeded",))).deleted == 1
        with sqlite3.connect(db) as conn:
            assert conn.execute("SELECT COUNT(*) FROM run_inputs").fetchone() == (300,)
            # An input row whose run is gone (left by hand, say) never shows under a new run.
            conn.execute("INSERT INTO run_inputs VALUES ('gone', '{\"secret\": 1}')")
        created, fresh = await store.create_run(
            msgspec.structs.replace(new_run("gone"), input=None)
        )
        assert created and fresh.input is None
        assert (await store.get_run("gone")).input is None  # type: ignore[union-attr]
    finally:
        await store.close()


async def test_prune_pages_through_runs_and_deletes_only_whole_finished_trees(db: Path) -> None:
    """Prune looks at a page of runs at a time (a read), and deletes, in the write
    transaction, the trees whose every run is finished: a root whose child is still
    running stays, and so does a run that is not finished."""
    store = SQLiteStore(db)
    await store.open()
    try:
        done = {"status": "succeeded", "lease_owner": None}
        for run_id in ("a1", "a2", "a3", "b_open", "c_paused", "d1", "d2"):
            await store.create_run(new_run(run_id))
        for run_id in ("a1", "a2", "a3", "b_open", "d1", "d2"):
            await store.update_run(run_id, Guard(("running",)), [], done)
        await store.update_run("c_paused", Guard(("running",)), [], {"status": "paused"})
        kid = msgspec.structs.replace(new_run("kid", parent_run_id="b_open"), root_run_id="b_open")
        await store.create_run(kid)  # still running: its tree stays whole
        finished_kid = msgspec.structs.replace(
            new_run("kid_done", parent_run_id="d1"), root_run_id="d1"
        )
        await store.create_run(finished_kid)
        await store.update_run("kid_done", Guard(("running",)), [], done)

        pages, deleted, roots, after = 0, 0, [], None
        while True:
            page = await store.prune(2e9, ("succeeded",), after=after, limit=3)
            pages += 1
            deleted += page.deleted
            roots += page.roots
            if page.last is None:
                break
            after = page.last
        assert pages == 3  # 9 runs, 3 a page; d1's child went with d1, so the third is short
        assert sorted(roots) == ["a1", "a2", "a3", "d1", "d2"]
        assert deleted == 6  # d1's child with it
        left = sorted(r.run_id for r in await store.list_runs(limit=100))
        assert left == ["b_open", "c_paused", "kid"]
    finally:
        await store.close()


async def test_prune_never_frees_the_journals_largest_rowid(db: Path) -> None:
    """Live events follow the journal by rowid, and SQLite gives a new row one more than
    the largest rowid left. So when prune deletes the newest rows, the newest stays as a
    row of no run, which no read returns, and a later prune moves it on."""
    store = SQLiteStore(db)
    await store.open()
    try:
        done = {"status": "succeeded", "lease_owner": None}
        seen: list[str] = []
        for run_id in ("old-1", "old-2"):
            await store.create_run(new_run(run_id))
            await store.update_run(run_id, Guard(("running",)), [], done)
            end = await store.journal_end()
            assert (await store.prune(2e9, ("succeeded",))).roots == [run_id]
            assert await store.journal_end() == end  # kept: no rowid is given twice
            with contextlib.closing(sqlite3.connect(db)) as conn:
                kept = conn.execute("SELECT run_id, seq, event FROM transitions").fetchall()
            assert kept == [("", 0, "pruned")]
            await store.create_run(new_run("next"))
            page = await store.journal_after(end)
            assert [(t.run_id, t.event) for t in page.rows] == [
                ("next", "created"),
                ("next", "started"),
            ]
            assert (await store.journal_after(0)).rows == page.rows  # the kept row is skipped
            assert await store.history("") == []
            seen += [t.run_id for t in (await store.journal_after(0, root_run_id="next")).rows]
            await store.update_run("next", Guard(("running",)), [], done)
            assert (await store.prune(2e9, ("succeeded",))).roots == ["next"]
        assert seen == ["next"] * 4
    finally:
        await store.close()
