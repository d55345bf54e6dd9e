"""Shared fixtures. Tests open engines inside the test body (`async with Engine.open(...)`)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from waystation.store import sqlite as sqlite_store


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """A fresh database path in a temporary directory."""
    return tmp_path / "runs.db"


@pytest.fixture
def short_rows(monkeypatch: pytest.MonkeyPatch) -> int:
    """SQLite's limit on a string and on a row (SQLITE_LIMIT_LENGTH, 1e9 bytes by default),
    lowered to 100,000 on the store's writer connection: a test of outputs past the limit
    then needs 100 KB rather than 1 GB. Returns the limit."""
    limit = 100_000
    connect = sqlite_store._connect

    def limited(path: str, durability: sqlite_store.Durability) -> sqlite3.Connection:
        conn = connect(path, durability)
        conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, limit)
        return conn

    monkeypatch.setattr(sqlite_store, "_connect", limited)
    return limit
