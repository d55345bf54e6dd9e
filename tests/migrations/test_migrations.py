"""Versioned migrations: applied once, in order, recorded; newer or foreign files refused."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from waystation import NotAWaystationDatabase, SchemaTooNew, StoreError, migrations


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
