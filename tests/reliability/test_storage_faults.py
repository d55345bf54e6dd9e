"""Storage faults: the database locked by another process, the disk full, a read-only file,
the file deleted or replaced under a running engine.

The rule throughout: a transition is committed, or it fails with a clear `ws.StoreError`
and the run is left as it was (recoverable); never silently dropped, never half-written.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import waystation as ws

from . import pipelines
from .support import (
    SAFETY,
    check_all,
    check_journal,
    integrity,
    journal,
    query,
    run_row,
    spawn,
    stage_counts,
    wait_until,
)

FAULTS = collections.Counter[str]()
"""Faults injected (printed at the end, for RELIABILITY.md)."""


@pytest.fixture(scope="module", autouse=True)
def _report_faults() -> Any:
    yield
    print("\nfaults injected:", dict(FAULTS))


LOCKER = r"""
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("COMMIT")
print("released", flush=True)
"""
"""Holds an exclusive lock on the database for argv[2] seconds."""


@ws.stage
async def double(n: int) -> int:
    return n * 2


decision = ws.gate("decision", schema=int, reason="a number")


@ws.stage
async def add(double: int, decision: int) -> int:
    return double + decision


gated = ws.Pipeline("faults-gated", [double, decision, add])


@ws.stage
async def plain(n: int) -> int:
    return n + 1


simple = ws.Pipeline("faults-simple", [plain])


# -- locked by another process ----------------------------------------------------------------


async def test_commits_wait_for_a_lock_held_by_another_process(tmp_path: Path) -> None:
    """Another process holds BEGIN EXCLUSIVE for a while (within busy_timeout): reads go on
    (WAL), every write (resume, a stage's commit, a new run, opening another engine) waits
    for the lock and then commits; nothing is dropped."""
    db = tmp_path / "runs.db"
    hold = 1.5
    entered, go = anyio.Event(), anyio.Event()

    @ws.stage
    async def slow(n: int) -> int:
        entered.set()
        await go.wait()
        return n + 100

    slowly = ws.Pipeline("faults-slow", [slow])
    async with ws.Engine.open(db, pipelines=[gated, simple, slowly]) as engine:
        paused = await engine.start(gated, {"n": 4}, timeout=SAFETY)
        driven = await engine.submit(slowly, {"n": 1})
        with anyio.fail_after(SAFETY):
            await entered.wait()
        locker = await spawn("-c", LOCKER, str(db), str(hold))
        try:
            assert await locker.line() == "locked"
            FAULTS["database locked by another process"] += 1
            t0 = time.monotonic()
            with anyio.fail_after(1.0):  # reads do not wait for the writer's lock
                assert (await engine.get(paused.run_id)).status == "paused"
                assert await engine.history(paused.run_id)
            go.set()  # the stage finishes while the lock is held: its commit must wait
            resumed, started, done = await asyncio.gather(
                engine.resume(paused.run_id, 5, timeout=SAFETY),
                engine.start(simple, {"n": 1}, timeout=SAFETY),
                engine.wait(driven.run_id, timeout=SAFETY),
            )
            waited = time.monotonic() - t0
            async with ws.Engine.open(db, pipelines=[simple]) as other:  # open after release
                assert (await other.get(started.run_id)).status == "succeeded"
            code, _, err = await locker.finish()
            assert code == 0, err
        finally:
            await locker.cleanup()
    assert waited >= hold * 0.5, f"writes did not wait for the lock ({waited:.2f}s)"
    assert (resumed.status, resumed.output) == ("succeeded", 13)
    assert (started.status, started.output) == ("succeeded", 2)
    assert (done.status, done.output) == ("succeeded", 101)
    check_all(db)


async def test_engine_opens_while_another_process_holds_the_lock(tmp_path: Path) -> None:
    """Opening (migrations, recovery) waits for a lock held within busy_timeout."""
    db = tmp_path / "runs.db"
    async with ws.Engine.open(db, pipelines=[simple]) as engine:
        run = await engine.start(simple, {"n": 1}, timeout=SAFETY)
    locker = await spawn("-c", LOCKER, str(db), "1.0")
    try:
        assert await locker.line() == "locked"
        FAULTS["database locked by another process"] += 1
        async with ws.Engine.open(db, pipelines=[simple]) as engine:
            assert (await engine.get(run.run_id)).output == 2
            again = await engine.start(simple, {"n": 2}, timeout=SAFETY)
        assert again.output == 3
        assert (await locker.finish())[0] == 0
    finally:
        await locker.cleanup()
    check_all(db)


@pytest.mark.skipif(
    not os.environ.get("WAYSTATION_SLOW_TESTS"),
    reason="holds a lock for 70 s, past busy_timeout; set WAYSTATION_SLOW_TESTS=1 to run it",
)
async def test_lock_held_beyond_busy_timeout_gives_a_store_error(tmp_path: Path) -> None:
    """A lock held far longer than busy_timeout (30 s; the writer tries a failed batch once
    more, op by op, so a write may wait twice that): the write fails with a clear
    StoreError, the run is untouched (still paused), and once the lock is gone the same
    call succeeds."""
    db = tmp_path / "runs.db"
    async with ws.Engine.open(db, pipelines=[gated]) as engine:
        paused = await engine.start(gated, {"n": 4}, timeout=SAFETY)
        before = journal(db, paused.run_id)
        locker = await spawn("-c", LOCKER, str(db), "70")
        try:
            assert await locker.line() == "locked"
            FAULTS["database locked beyond busy_timeout"] += 1
            t0 = time.monotonic()
            with pytest.raises(ws.StoreError, match="locked"):
                await engine.resume(paused.run_id, 5, timeout=90)
            print(f"\nthe write gave up after {time.monotonic() - t0:.1f}s")
            assert journal(db, paused.run_id) == before
            assert (await engine.get(paused.run_id)).status == "paused"
            assert (await locker.finish(timeout=90))[0] == 0
        finally:
            await locker.cleanup()
        done = await engine.resume(paused.run_id, 5, timeout=SAFETY)
        assert done.status == "succeeded"
    check_all(db)


# -- disk full ----------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MB tmpfs mounted for the test (skipped where mounting is not permitted)."""
    mount = shutil.which("mount")
    if mount is None or os.geteuid() != 0:
        pytest.skip("needs root and mount(8) to make a small filesystem")
    target = tmp_path / "small"
    target.mkdir()
    done = subprocess.run(
        [mount, "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(target)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


def fill(directory: Path) -> Path:
    """Write a file (unbuffered) until the filesystem is full; returns it."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for size in (1 << 16, 1 << 12, 1 << 8, 1):
            chunk = b"\0" * size
            while True:
                try:
                    os.write(fd, chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
    finally:
        os.close(fd)
    assert os.statvfs(directory).f_bavail == 0
    return filler


async def test_disk_full_leaves_the_run_recoverable(
    small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The disk fills up while a stage runs: its commit fails with a clear StoreError (in
    the log: the engine does not crash), the run is left running at that stage with nothing
    of the stage written, and once space returns a new engine finishes it."""
    db = small_disk / "runs.db"
    entered, go = anyio.Event(), anyio.Event()
    calls: collections.Counter[str] = collections.Counter()

    @ws.stage
    async def first(n: int) -> int:
        calls["first"] += 1
        return n + 1

    @ws.stage
    async def big(first: int) -> str:
        calls["big"] += 1
        if calls["big"] == 1:
            entered.set()
            await go.wait()
        return str(first) * 300_000  # ~ 600 KB: the WAL must grow to commit it

    @ws.stage
    async def last(big: str) -> int:
        calls["last"] += 1
        return len(big)

    p = ws.Pipeline("faults-full", [first, big, last])
    async with ws.Engine.open(db, pipelines=[p, simple], poll_interval=60) as engine:
        witness = await engine.start(simple, {"n": 1}, timeout=SAFETY)
        run = await engine.submit(p, {"n": 41})
        with anyio.fail_after(SAFETY):
            await entered.wait()
        filler = fill(small_disk)
        FAULTS["disk full"] += 1
        try:
            before = journal(db, run.run_id)
            go.set()
            await wait_until("the driver to stop", lambda: run.run_id not in engine.active_runs)
            # Nothing of the failed commit is visible; the run is where it was.
            assert journal(db, run.run_id) == before
            row = run_row(db, run.run_id)
            assert row is not None and (row["status"], row["stage_index"]) == ("running", 1)
            assert 1 not in stage_counts(before)
            assert integrity(db) == [("ok",)]
            # Other runs still read fine.
            assert (await engine.get(witness.run_id)).output == 2
            # A new write fails clearly too.
            with pytest.raises(ws.StoreError):
                await engine.start(p, {"n": 1}, timeout=SAFETY)
        finally:
            filler.unlink()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(run.run_id in m and "full" in m for m in errors), errors
    async with ws.Engine.open(db, pipelines=[p, simple]) as engine:
        done = await engine.wait(run.run_id, timeout=SAFETY)
    assert done.status == "succeeded", done.error
    assert done.output == 600_000
    assert calls == {"first": 1, "big": 2, "last": 1}
    rows = check_journal(db, run.run_id)
    assert stage_counts(rows) == {0: 1, 1: 1, 2: 1}
    check_all(db)


# -- read-only file -----------------------------------------------------------------------------


@contextlib.contextmanager
def immutable(path: Path) -> Iterator[None]:
    """Make `path` read-only even for root (chattr +i), or skip."""
    chattr = shutil.which("chattr")
    if chattr is None:
        pytest.skip("chattr not available")
    done = subprocess.run([chattr, "+i", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot make the file immutable here: {done.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run([chattr, "-i", str(path)], check=False)


async def make_paused(db: Path) -> str:
    async with ws.Engine.open(db, pipelines=[gated]) as engine:
        run = await engine.start(gated, {"n": 4}, timeout=SAFETY)
    assert run.status == "paused"
    return run.run_id


async def test_read_only_file_gives_a_store_error_on_the_first_write(tmp_path: Path) -> None:
    """A database file that cannot be written (its directory can): reads work, each write
    fails with a clear StoreError, and the run is untouched."""
    db = tmp_path / "runs.db"
    run_id = await make_paused(db)
    before = journal(db, run_id)
    with immutable(db):
        FAULTS["read-only database file"] += 1
        engine = await ws.Engine.open(db, pipelines=[gated])
        try:
            assert (await engine.get(run_id)).status == "paused"
            for write in (
                lambda: engine.resume(run_id, 5, timeout=SAFETY),
                lambda: engine.start(gated, {"n": 1}, timeout=SAFETY),
                lambda: engine.cancel(run_id),
            ):
                with pytest.raises(ws.StoreError, match=r"readonly|read-only|read only"):
                    await write()
            assert (await engine.get(run_id)).status == "paused"
        finally:
            with contextlib.suppress(ws.StoreError):
                await engine.close()
        assert journal(db, run_id) == before


async def test_read_only_file_can_be_inspected(tmp_path: Path) -> None:
    """Reading a read-only database (a copy on read-only media, a file without write
    permission) through an engine that never writes (recover=False), and through the CLI's
    reading commands, works and closes without error."""
    db = tmp_path / "runs.db"
    run_id = await make_paused(db)
    with immutable(db):
        FAULTS["read-only database file"] += 1
        async with ws.Engine.open(db, pipelines=[gated], recover=False) as engine:
            assert (await engine.get(run_id)).status == "paused"
            assert [r.run_id for r in await engine.list()] == [run_id]
        for command in (["show", run_id], ["runs"], ["history", run_id]):
            cli = await spawn("-m", "waystation", "--db", str(db), *command)
            code, out, err = await cli.finish()
            assert code == 0, f"waystation {command[0]} on a read-only file: {err.strip()}"
            assert run_id in out


async def test_read_only_filesystem_gives_a_store_error(small_disk: Path) -> None:
    """The file on a filesystem mounted read-only: opening fails with a StoreError that
    says what is wrong (not that the file is no waystation database)."""
    db = small_disk / "runs.db"
    run_id = await make_paused(db)
    remount = await anyio.run_process(["mount", "-o", "remount,ro", str(small_disk)])
    assert remount.returncode == 0
    FAULTS["read-only filesystem"] += 1
    with pytest.raises(ws.StoreError) as caught:
        async with ws.Engine.open(db, pipelines=[gated]) as engine:
            await engine.resume(run_id, 5, timeout=SAFETY)
    assert not isinstance(caught.value, ws.NotAWaystationDatabase), (
        f"a read-only waystation database reported as not one: {caught.value}"
    )


# -- file deleted or replaced under a running engine -------------------------------------------


def remove_database(db: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{db}{suffix}")


@pytest.mark.parametrize("fault", ["deleted", "replaced"])
async def test_database_file_deleted_or_replaced_under_a_running_engine(
    tmp_path: Path, fault: str, caplog: pytest.LogCaptureFixture
) -> None:
    """What happens: SQLite keeps writing to the file it has open, which no longer has a
    name (deleted), or is no longer the file at that path (replaced by another database).
    Every later commit is then lost with the process. The engine must notice and say so:
    a write after the fault raises StoreError, or an error is logged; not silence."""
    db = tmp_path / "runs.db"
    async with ws.Engine.open(db, pipelines=[gated]) as engine:
        paused = await engine.start(gated, {"n": 4}, timeout=SAFETY)
        if fault == "deleted":
            remove_database(db)
        else:
            other = tmp_path / "other.db"
            async with ws.Engine.open(other, pipelines=[gated]) as elsewhere:
                await elsewhere.start(gated, {"n": 9}, timeout=SAFETY)
            remove_database(db)
            os.replace(other, db)
        FAULTS[f"database file {fault} under a running engine"] += 1
        raised: BaseException | None = None
        try:
            await engine.resume(paused.run_id, 5, timeout=SAFETY)
            await engine.start(gated, {"n": 1}, timeout=SAFETY)
        except ws.StoreError as exc:
            raised = exc
    # Where the writes went: nowhere that survives (deleted), or not into the file at the
    # path (replaced): the paused run is not in the database the path names now.
    if db.exists():
        assert query(db, "SELECT COUNT(*) FROM runs WHERE run_id = ?", (paused.run_id,)) == [(0,)]
    complaints = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name.startswith("waystation")
    ]
    assert raised is not None or complaints, (
        f"database file {fault} under the engine: later commits were accepted without an "
        "error or a log line, and are lost"
    )


# -- the engine keeps serving after a fault -----------------------------------------------------


async def test_a_failed_commit_does_not_stop_other_runs(small_disk: Path) -> None:
    """While the disk is full every write fails; once space returns, the same engine serves
    new runs and resumes at once, and retries the stranded run by itself."""
    db = small_disk / "runs.db"
    entered, go = anyio.Event(), anyio.Event()
    calls = 0

    @ws.stage
    async def blob(n: int) -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            entered.set()
            await go.wait()
        return "y" * 400_000

    p = ws.Pipeline("faults-blob", [blob])
    async with ws.Engine.open(db, pipelines=[p, gated], poll_interval=0.1) as engine:
        paused = await engine.start(gated, {"n": 1}, timeout=SAFETY)
        run = await engine.submit(p, {"n": 1})
        with anyio.fail_after(SAFETY):
            await entered.wait()
        filler = fill(small_disk)
        FAULTS["disk full"] += 1
        go.set()
        await wait_until("the driver to stop", lambda: run.run_id not in engine.active_runs)
        filler.unlink()
        resumed = await engine.resume(paused.run_id, 1, timeout=SAFETY)
        assert resumed.status == "succeeded"
        done = await engine.wait(run.run_id, timeout=SAFETY)
        assert done.status == "succeeded" and done.output == "y" * 400_000
    assert calls >= 2
    check_all(db)


if sys.platform != "linux":  # pragma: no cover
    pytestmark = pytest.mark.skip("storage fault injection uses Linux tools")


async def test_file_size_limit_leaves_the_run_recoverable(tmp_path: Path) -> None:
    """A process whose files may not grow (RLIMIT_FSIZE, as with a quota): the big stage's
    commit fails, the run stays `running` at that stage with nothing of it written, and a
    new engine in another process without the limit finishes it."""
    db, side = tmp_path / "runs.db", tmp_path / "side.log"
    child = await spawn("-m", "tests.reliability.procs", "fsize", str(db), str(side))
    try:
        line = await child.line()
        code, _, err = await child.finish()
    finally:
        await child.cleanup()
    FAULTS["file size limit (RLIMIT_FSIZE)"] += 1
    assert code == 0, err
    assert json.loads(line) == {"status": "running", "stage_index": 0}, err
    assert "bulky-1 stopped: database write failed" in err, err  # EFBIG: a disk I/O error
    assert stage_counts(journal(db, "bulky-1")) == {}
    assert integrity(db) == [("ok",)]
    pipelines.configure(side)
    async with ws.Engine.open(db, pipelines=pipelines.PIPELINES) as engine:
        done = await engine.wait("bulky-1", timeout=SAFETY)
    assert done.status == "succeeded" and done.output == 400_001
    assert stage_counts(check_journal(db, "bulky-1")) == {0: 1, 1: 1}
    assert pipelines.side_counts(side) == {("bulky-1", "measure"): 1}
    check_all(db)
