"""Versioned SQL migrations: `<backend>/NNNN_name.sql`, applied in order, each in a transaction.

Applied versions are recorded in `schema_migrations`. A database that records a version this
code does not know was written by a newer waystation and is refused rather than guessed at.
"""

from __future__ import annotations

import functools
import os
import re
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

from ..errors import NotAWaystationDatabase, SchemaTooNew, StoreError

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    """One numbered SQL file."""

    version: int
    """Its number, from the file name."""
    name: str
    """The rest of the file name, for the record."""
    sql: str
    """The statements, run as one script inside a transaction."""


def migrations(backend: str = "sqlite") -> list[Migration]:
    """The migrations shipped for `backend`, in order."""
    found = []
    for name, read in _files(backend):
        match = _NAME.match(name)
        if match:
            found.append(Migration(int(match[1]), match[2], read()))
    found.sort(key=lambda m: m.version)
    return found


def _files(backend: str) -> list[tuple[str, Callable[[], str]]]:
    # Every Engine.open reads these. From the package's folder directly when it is one
    # (the usual install): importlib.resources costs 2-3 ms the first time in a process,
    # a tenth of a fresh process's open+resume. Through it otherwise (a zipped install).
    folder = os.path.join(os.path.dirname(__file__), backend)
    if os.path.isdir(folder):
        return [
            (name, functools.partial(_read, os.path.join(folder, name)))
            for name in os.listdir(folder)
        ]
    return [
        (entry.name, functools.partial(entry.read_text, "utf-8"))
        for entry in resources.files(__package__).joinpath(backend).iterdir()
    ]


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def current_version(conn: sqlite3.Connection) -> int:
    """The newest version applied to this database; 0 for an empty one.

    Raises `NotAWaystationDatabase` for a file that is not SQLite or holds other tables.
    """
    try:
        tables = {
            row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
    except sqlite3.DatabaseError as exc:
        if not _is_foreign(exc):
            raise StoreError(f"cannot read the database: {exc}") from exc
        raise NotAWaystationDatabase(f"not a waystation database (not SQLite?): {exc}") from exc
    if "schema_migrations" not in tables:
        if tables:
            raise NotAWaystationDatabase(
                "not a waystation database: it has tables "
                f"({', '.join(sorted(tables)[:5])}) but no schema_migrations; "
                "point waystation at a new or waystation-owned file"
            )
        return 0
    row = conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
    return int(row[0] or 0)


def apply(conn: sqlite3.Connection, backend: str = "sqlite", *, verify_only: bool = False) -> int:
    """Bring the database up to date; returns the number of migrations applied.

    `conn` must be in autocommit mode (isolation_level=None): each migration runs between its
    own BEGIN IMMEDIATE and COMMIT, so a failing one leaves the previous state intact. With
    `verify_only`, nothing is applied and a database that is behind raises `StoreError`.
    """
    known = migrations(backend)
    latest = known[-1].version if known else 0
    version = current_version(conn)
    if version > latest:
        raise SchemaTooNew(
            f"database schema is version {version}, newer than this waystation knows "
            f"({latest}); upgrade waystation to open it"
        )
    pending = [m for m in known if m.version > version]
    if verify_only:
        if pending:
            raise StoreError(
                f"database schema is version {version}, {len(pending)} migration(s) behind; "
                "run `waystation migrate`"
            )
        return 0
    for migration in pending:
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Someone may have migrated between our check and our lock.
            if current_version(conn) >= migration.version:
                conn.execute("ROLLBACK")
                continue
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
            )
            for statement in _statements(migration.sql):
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) "
                "VALUES (?, ?, datetime('now'))",
                (migration.version, migration.name),
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return len(pending)


def _is_foreign(exc: sqlite3.DatabaseError) -> bool:
    """True when SQLite says the file is not a database at all (as opposed to I/O trouble:
    a read-only file system, a missing directory, a full disk)."""
    text = str(exc).lower()
    return "not a database" in text or "encrypted" in text or "malformed" in text


def _statements(script: str) -> list[str]:
    """Split a script into complete statements with SQLite's own parser (no naive `;` split)."""
    out: list[str] = []
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            if buffer.strip():
                out.append(buffer.strip())
            buffer = ""
    if buffer.strip() and not buffer.strip().startswith("--"):
        out.append(buffer.strip())
    return out
