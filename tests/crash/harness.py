"""Helpers for the real-crash tests: workload subprocesses, SIGKILL, side file, raw SQL reads.

Every wait here is bounded by a deadline; a test that times out says what it was waiting for.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

from ..processes import start_python
from ..processes import wait_until as wait_until  # the crash tests take it from here

STARTUP_TIMEOUT = 20.0
"""Bound for a workload subprocess to start and report (imports on a loaded 2-core box)."""


class Workload:
    """One `python -m tests.crash.workload ...` subprocess, stdout read line by line."""

    def __init__(self, proc: asyncio.subprocess.Process, stderr_path: Path) -> None:
        self.proc = proc
        self.stderr_path = stderr_path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text()[-4000:]
        except OSError:
            return ""

    async def message(self, timeout: float = STARTUP_TIMEOUT) -> dict[str, Any]:
        """The next JSON line the workload prints (fails with its stderr if none comes)."""
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"workload {self.pid} printed nothing in {timeout}s; stderr:\n{self.stderr()}"
            ) from None
        if not line:
            await self.exited()
            raise AssertionError(
                f"workload {self.pid} exited ({self.proc.returncode}) without output; "
                f"stderr:\n{self.stderr()}"
            )
        message: dict[str, Any] = json.loads(line)
        return message

    async def exited(self, timeout: float = STARTUP_TIMEOUT) -> int:
        """Wait for the workload to exit by itself; its return code."""
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"workload {self.pid} did not exit within {timeout}s; stderr:\n{self.stderr()}"
            ) from None

    async def sigkill(self) -> None:
        """SIGKILL the workload and reap it, so that its pid is gone when we recover."""
        assert self.proc.returncode is None, f"workload {self.pid} already exited"
        os.kill(self.proc.pid, signal.SIGKILL)
        code = await asyncio.wait_for(self.proc.wait(), 10)
        assert code == -signal.SIGKILL, f"workload {self.pid} ended with {code}, not by SIGKILL"

    async def cleanup(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await asyncio.wait_for(self.proc.wait(), 10)


async def spawn(tmp_path: Path, *args: str) -> Workload:
    """Start the workload with `args`; stderr goes to a file in `tmp_path` for diagnostics."""
    stderr_path = tmp_path / f"workload-{time.monotonic_ns()}.stderr"
    with stderr_path.open("wb") as err:
        proc = await start_python("-m", "tests.crash.workload", *args, stderr=err)
    return Workload(proc, stderr_path)


# -- the side file ---------------------------------------------------------------------------


def side_lines(path: Path) -> list[list[str]]:
    """The side file's complete lines, split into words (a missing file has none)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [line.split() for line in text.splitlines(keepends=True) if line.endswith("\n")]


def executions(lines: list[list[str]], what: str = "start") -> collections.Counter[tuple[str, str]]:
    """How often each (run_id, stage) recorded `what`."""
    return collections.Counter((w[0], w[1]) for w in lines if len(w) >= 3 and w[2] == what)


# -- raw SQL ---------------------------------------------------------------------------------


def query(db: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Read `db` directly with sqlite3 (a separate connection, as another tool would)."""
    conn = sqlite3.connect(db, timeout=10)
    try:
        conn.execute("PRAGMA query_only=ON")
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def integrity(db: Path) -> list[tuple[Any, ...]]:
    """`PRAGMA integrity_check` rows; `[("ok",)]` for a sound file."""
    return query(db, "PRAGMA integrity_check")


def committed_stages(db: Path) -> set[tuple[str, int]]:
    """(run_id, stage_index) of every `succeeded` row in the journal."""
    rows = query(db, "SELECT run_id, stage_index FROM journal WHERE event = 'succeeded'")
    return {(r, i) for r, i in rows}
