"""Versioned migrations: applied once, in order, recorded; newer or foreign files refused."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from waystation import NotAWaystationDatabase, SchemaTooNew, StoreError, migrations
from waystation.store.base import NewTransition
from waystation.store.sqlite import SQLiteStore


def _conn(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


def test_applies_all_then_nothing(tmp_path: Path) -> None:
    conn = _conn(tmp_path / "a.db")
    known = migrations.migrations("sqlite")
    assert known and [m.version for m in known] == sorted(m.version for m in known)
    assert migrations.apply(conn) == len(known)
    assert migrations.apply(conn) == 0
    rows = conn.execute("SELECT version, name FROM schema_migrations").fetchall()
    assert rows == [(m.version, m.name) for m in known]
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"runs", "transitions", "schema_migrations"} <= tables


def test_verify_only_reports_a_database_behind(tmp_path: Path) -> None:
    conn = _conn(tmp_path / "a.db")
    with pytest.raises(StoreError, match="waystation migrate"):
        migrations.apply(conn, verify_only=True)
    migrations.apply(conn)
    assert migrations.apply(conn, verify_only=True) == 0


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    conn = _conn(tmp_path / "a.db")
    migrations.apply(conn)
    conn.execute("INSERT INTO schema_migrations VALUES (9999, 'future', 'now')")
    with pytest.raises(SchemaTooNew, match="upgrade waystation"):
        migrations.apply(conn)


def test_foreign_database_is_refused(tmp_path: Path) -> None:
    conn = _conn(tmp_path / "a.db")
    conn.execute("CREATE TABLE customers (id INTEGER)")
    with pytest.raises(NotAWaystationDatabase, match="customers"):
        migrations.apply(conn)
    assert conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 1


def test_statements_split_by_sqlite_not_by_semicolons() -> None:
    script = "-- a comment; with a semicolon\nCREATE TABLE t (x TEXT DEFAULT 'a;b');\nSELECT 1;\n"
    statements = migrations._statements(script)
    assert len(statements) == 2 and "'a;b'" in statements[0]


def test_migrations_read_through_importlib_resources_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """Read from the package folder (fast) or, where there is none (a zipped install),
    through importlib.resources: the same migrations either way."""
    direct = migrations.migrations("sqlite")
    monkeypatch.setattr(migrations.os.path, "isdir", lambda path: False)
    assert migrations.migrations("sqlite") == direct
    assert [m.version for m in direct] == list(range(1, len(direct) + 1))


def _at_version(db: Path, monkeypatch: pytest.MonkeyPatch, version: int) -> sqlite3.Connection:
    """A new database brought up to `version` only, as an older waystation left it."""
    every = migrations.migrations("sqlite")
    with monkeypatch.context() as m:
        m.setattr(migrations, "migrations", lambda backend="sqlite": every[:version])
        conn = _conn(db)
        migrations.apply(conn)
    return conn


async def test_a_journal_written_before_folded_rows_reads_the_same_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "old.db"
    conn = _at_version(db, monkeypatch, 2)
    old = [
        ("created", None, None, 0, None),
        ("started", 0, "a", 1, None),
        ("succeeded", 0, "a", 1, "1"),
        ("started", 1, "b", 1, None),
    ]
    conn.execute(
        "INSERT INTO runs (run_id, pipeline, pipeline_version, fingerprint, status, seq, "
        "stage_index, root_run_id, lease_owner, created_at, updated_at) "
        "VALUES ('r', 'p', '1', 'f', 'running', 4, 1, 'r', 'me', 1, 1)"
    )
    conn.executemany(
        "INSERT INTO transitions (run_id, seq, stage_index, stage_path, event, attempt, "
        "payload, at) VALUES ('r', ?, ?, ?, ?, ?, ?, 1)",
        [
            (seq, i, path, event, attempt, payload)
            for seq, (event, i, path, attempt, payload) in enumerate(old, 1)
        ],
    )
    conn.close()

    store = SQLiteStore(db)
    await store.open()  # applies 0003
    try:
        shape = [
            (t.seq, t.event, t.stage_index, t.stage_path, t.attempt, t.payload)
            for t in await store.history("r")
        ]
        assert shape == [(seq, e, i, p, a, pl) for seq, (e, i, p, a, pl) in enumerate(old, 1)]
        step = [
            NewTransition("succeeded", 1, "b", 1, payload="2"),
            NewTransition("started", 2, "c", 1),
        ]
        assert await store.step_run("r", "me", 4, 2, step) == 6
        after = await store.history("r", after_seq=4)
        assert [(t.seq, t.event, t.stage_path) for t in after] == [
            (5, "succeeded", "b"),
            (6, "started", "c"),
        ]
        assert await store.count_stage_executions("r") == {"r": (3, 6)}
    finally:
        await store.close()
    with closing(_conn(db)) as conn:
        assert conn.execute("SELECT COUNT(*) FROM transitions").fetchone() == (5,)
        assert conn.execute("SELECT COUNT(*) FROM journal").fetchone() == (6,)


async def test_inputs_written_in_the_runs_row_move_to_their_own_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before migration 5 a run's input was a column of its row; after it, the input lives
    in `run_inputs` (a stage commit no longer rewrites it) and reads the same."""
    db = tmp_path / "old.db"
    conn = _at_version(db, monkeypatch, 4)
    conn.executemany(
        "INSERT INTO runs (run_id, pipeline, pipeline_version, fingerprint, status, seq, "
        "stage_index, input, root_run_id, lease_owner, created_at, updated_at) "
        "VALUES (?, 'p', '1', 'f', 'running', 2, 0, ?, ?, 'me', 1, 1)",
        [("r1", '{"doc": "' + "x" * 5000 + '"}', "r1"), ("r2", None, "r2")],
    )
    conn.close()

    store = SQLiteStore(db)
    await store.open()  # applies 0005
    try:
        r1, r2 = await store.get_run("r1"), await store.get_run("r2")
        assert r1 is not None and r1.input == '{"doc": "' + "x" * 5000 + '"}'
        assert r2 is not None and r2.input is None
        assert [r.input for r in await store.list_runs()] == [r1.input, None]
    finally:
        await store.close()
    with closing(_conn(db)) as conn:
        assert conn.execute("SELECT run_id FROM runs WHERE input IS NOT NULL").fetchall() == []
        assert conn.execute("SELECT run_id, length(input) FROM run_inputs").fetchall() == [
            ("r1", 5011)
        ]


async def test_runs_a_crash_left_with_open_children_are_recorded_for_recovery(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Migration 4 records the failed or cancelled runs that already have unfinished
    children (a crash before this version left them so), for recovery to cancel those."""
    db = tmp_path / "old.db"
    conn = _at_version(db, monkeypatch, 3)
    conn.executemany(
        "INSERT INTO runs (run_id, pipeline, pipeline_version, fingerprint, status, "
        "parent_run_id, root_run_id, created_at, updated_at) "
        "VALUES (?, 'p', '1', 'f', ?, ?, 'x', 1, ?)",
        [
            ("failed_open", "failed", None, 5.0),
            ("kid1", "paused", "failed_open", 1.0),
            ("failed_done", "failed", None, 6.0),
            ("kid2", "succeeded", "failed_done", 1.0),
            ("paused_open", "paused", None, 7.0),
            ("kid3", "paused", "paused_open", 1.0),
        ],
    )
    conn.close()
    with closing(_conn(db)) as conn:
        migrations.apply(conn)
        assert conn.execute("SELECT run_id, since FROM cascades").fetchall() == [
            ("failed_open", 5.0)
        ]


async def test_a_journal_from_before_migration_6_is_followed_by_rowid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Migration 6 drops the journal's time index (live events follow rowids since): the
    rows written before it are read from a position in commit order, stamps out of order
    and all, and the time of a row finds its position without the index."""
    db = tmp_path / "old.db"
    conn = _at_version(db, monkeypatch, 5)
    conn.execute(
        "INSERT INTO runs (run_id, pipeline, pipeline_version, fingerprint, status, seq, "
        "stage_index, root_run_id, created_at, updated_at) "
        "VALUES ('r', 'p', '1', 'f', 'succeeded', 3, 0, 'r', 1, 1)"
    )
    conn.executemany(  # the second stamped before the first: a clock set back between
        "INSERT INTO transitions (run_id, seq, event, attempt, at) VALUES ('r', ?, ?, 0, ?)",
        [(1, "created", 100.0), (2, "note", 50.0), (3, "completed", 200.0)],
    )
    conn.close()

    store = SQLiteStore(db)
    await store.open()  # applies 0006
    try:
        page = await store.journal_after(0, root_run_id="r")
        assert [(t.seq, t.event) for t in page.rows] == [
            (1, "created"),
            (2, "note"),
            (3, "completed"),
        ]
        assert (await store.journal_after(0)).rows == page.rows
        assert await store.journal_position(150.0) == await store.journal_end() - 1
    finally:
        await store.close()
    with closing(_conn(db)) as conn:
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert "transitions_at" not in names
