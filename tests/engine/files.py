"""Reading what the engine wrote, straight from the SQLite file (not through the engine)."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

JOURNAL_COLUMNS = "seq, stage_index, event, attempt, payload, error"


def journal(db: Path, run_id: str, columns: str = JOURNAL_COLUMNS) -> list[tuple[Any, ...]]:
    """The `columns` of one run's journal rows, in order."""
    with closing(sqlite3.connect(db)) as conn:
        return conn.execute(
            f"SELECT {columns} FROM journal WHERE run_id = ? ORDER BY seq", (run_id,)
        ).fetchall()


def run_row(db: Path, run_id: str) -> dict[str, Any]:
    """One run's row, by column name (with its input)."""
    with closing(sqlite3.connect(db)) as conn:
        conn.row_factory = sqlite3.Row
        row = conn.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        assert row is not None, f"no run row for {run_id}"
        found = conn.execute("SELECT input FROM run_inputs WHERE run_id = ?", (run_id,))
        stored = found.fetchone()  # the input has a table of its own (migration 5)
        return {**dict(row), "input": stored[0] if stored else None}
