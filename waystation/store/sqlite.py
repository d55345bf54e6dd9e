"""The embedded SQLite store: WAL, one writer thread with group commit, aiosqlite readers.

Group commit: every write is a small function queued to one writer thread, which takes all
that is queued, runs it in one transaction, commits once and then wakes each caller. A
caller's write is durable when its await returns. Alone, a stage pays one commit; under load,
hundreds of runs share one fsync. The writer is a thread of our own rather than an aiosqlite
connection because a batch must run as one call on the connection's thread: through
aiosqlite each statement would be a separate thread hop. The writes every run makes (create,
step, finish) are applied batch-wide with a few multi-row statements (see `batch`). Reads
use aiosqlite connections and, thanks to WAL, never wait for the writer.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any, Literal

import aiosqlite

from .. import migrations
from ..errors import NotAWaystationDatabase, StoreError
from . import batch as batched
from .base import (
    RUN_COLUMNS,
    Guard,
    JournalPage,
    NewRun,
    NewTransition,
    PrunePage,
    RunJournal,
    RunRecord,
    TransitionRecord,
)

Durability = Literal["full", "normal"]

_MAX_BATCH = 2000

_SQLITE_MAX_LENGTH = 1_000_000_000
"""SQLite's default limit on a string and on a whole row (SQLITE_MAX_LENGTH), assumed until
the store is open and the connection tells its own."""
_ROW_ROOM = 65_536
"""Bytes of a row kept for its columns other than a stage output: the limit applies to the
whole row, whose ids (up to 512 characters each) and names go with the output."""

log = logging.getLogger("waystation")

WriteOp = Callable[[sqlite3.Connection, list[tuple[Any, ...]]], Any]
"""A write: runs on the writer thread inside the batch's transaction. Journal rows it
appends to the list are inserted with one executemany for the whole batch, before COMMIT."""


def _run(row: Any) -> RunRecord:
    return RunRecord(*row)


def _transition(row: Any) -> TransitionRecord:
    return TransitionRecord(*row)


def _connect(path: str, durability: Durability) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    try:
        # Look before touching: a foreign file must be refused before it is switched to WAL.
        migrations.current_version(conn)
        conn.execute("PRAGMA journal_mode=WAL")
    except StoreError as exc:
        conn.close()
        raise type(exc)(f"{path}: {exc}") from None
    except sqlite3.DatabaseError as exc:
        conn.close()
        if migrations._is_foreign(exc):
            raise NotAWaystationDatabase(f"{path}: not a waystation database ({exc})") from exc
        raise StoreError(f"{path}: cannot use the database: {exc}") from exc
    conn.execute(f"PRAGMA synchronous={'FULL' if durability == 'full' else 'NORMAL'}")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


class _Writer:
    """One thread, one connection, one transaction per batch of queued writes."""

    def __init__(self, conn: sqlite3.Connection, path: str) -> None:
        self._conn = conn
        self._path = path
        self._identity = _identity(path)
        self._queue: queue.SimpleQueue[tuple[WriteOp, asyncio.Future[Any]] | None] = (
            queue.SimpleQueue()
        )
        self._thread = threading.Thread(target=self._main, name="waystation-writer", daemon=True)
        self._thread.start()
        self.batches = 0
        self.writes = 0

    def submit(self, op: WriteOp) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.put((op, future))
        return future

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _main(self) -> None:
        stopping = False
        while not stopping:
            item = self._queue.get()
            if item is None:
                break
            batch = [item]
            while len(batch) < _MAX_BATCH:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                    break
                batch.append(nxt)
            self._commit(batch)
        self._conn.close()

    def _commit(self, batch: list[tuple[WriteOp, asyncio.Future[Any]]]) -> None:
        conn = self._conn
        outcomes: list[tuple[asyncio.Future[Any], bool, Any]] = []
        rows: list[tuple[Any, ...]] = []
        moved = self._moved()
        if moved is not None:
            # SQLite would go on writing to the unlinked (or replaced) file, and every commit
            # would be lost with the process: refuse, loudly, instead.
            log.error("%s", moved)
            self._deliver([(f, False, StoreError(moved)) for _, f in batch], len(batch))
            return
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            # Locked by another process past busy_timeout, or unwritable: every write of
            # the batch would meet the same wall, so all of them get the error now.
            error = _store_error(exc)
            self._deliver([(f, False, error) for _, f in batch], len(batch))
            return
        try:
            try:
                results = self._apply(conn, batch, rows, grouped=True)
            except batched.GuardMissed:
                # Some batched write did not apply: roll back and redo the batch one write
                # at a time (in a new transaction, every guard checked afresh), so that each
                # caller learns its own outcome.
                conn.execute("ROLLBACK")
                conn.execute("BEGIN IMMEDIATE")
                rows = []
                results = self._apply(conn, batch, rows, grouped=False)
            batched.insert_rows(conn, rows)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            # One bad write must not sink its neighbours: redo each in its own transaction.
            for op, future in batch:
                try:
                    rows = []
                    conn.execute("BEGIN IMMEDIATE")
                    result = op(conn, rows)
                    batched.insert_rows(conn, rows)
                    conn.execute("COMMIT")
                    outcomes.append((future, True, result))
                except BaseException as exc:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    outcomes.append((future, False, _store_error(exc)))
            self._deliver(outcomes, len(batch))
            return
        self._deliver_results(batch, results)

    def _deliver_results(
        self, batch: list[tuple[WriteOp, asyncio.Future[Any]]], results: list[Any]
    ) -> None:
        """A committed batch's results: as `_deliver`, without a tuple and a dict entry per
        write when all its callers share one event loop (the usual case)."""
        loop = batch[0][1].get_loop()
        for _, future in batch:
            if future.get_loop() is not loop:
                outcomes = [(f, True, r) for (_, f), r in zip(batch, results, strict=True)]
                self._deliver(outcomes, len(batch))
                return
        self.batches += 1
        self.writes += len(batch)
        try:
            loop.call_soon_threadsafe(_settle_results, batch, results)
        except RuntimeError:  # that loop is closed: nobody is waiting any more
            pass

    @staticmethod
    def _apply(
        conn: sqlite3.Connection,
        batch: list[tuple[WriteOp, asyncio.Future[Any]]],
        rows: list[tuple[Any, ...]],
        *,
        grouped: bool,
    ) -> list[Any]:
        """Run a batch's writes in queue order; with `grouped`, each stretch of writes of
        the kinds in `batch.BATCHED` between two other writes is applied kind by kind
        with multi-row statements (a run has at most one such write in a stretch: its
        driver awaits each commit, so order inside a stretch does not matter)."""
        results: list[Any] = [None] * len(batch)
        stretch: dict[Any, list[int]] = {}
        for k, (op, _) in enumerate(batch):
            kind = type(op)
            if grouped and kind in batched.BATCHED:
                stretch.setdefault(kind, []).append(k)
                continue
            if stretch:
                _apply_stretch(conn, batch, stretch, results, rows)
                stretch = {}
            results[k] = op(conn, rows)
        if stretch:
            _apply_stretch(conn, batch, stretch, results, rows)
        return results

    def _moved(self) -> str | None:
        if self._identity is None:
            return None
        now = _identity(self._path)
        if now == self._identity:
            return None
        what = "was deleted" if now is None else "was replaced by another file"
        return (
            f"{self._path} {what} while the engine had it open; nothing more is written. "
            "Close the engine; restore the file (or open the new one) and start again"
        )

    def _deliver(self, outcomes: list[tuple[asyncio.Future[Any], bool, Any]], n: int) -> None:
        self.batches += 1
        self.writes += n
        # One wake-up per event loop per batch, not one per caller.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]] = {}
        for outcome in outcomes:
            by_loop.setdefault(outcome[0].get_loop(), []).append(outcome)
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle, items)
            except RuntimeError:  # that loop is closed: nobody is waiting any more
                pass


def _apply_stretch(
    conn: sqlite3.Connection,
    batch: list[tuple[WriteOp, asyncio.Future[Any]]],
    stretch: dict[Any, list[int]],
    results: list[Any],
    rows: list[tuple[Any, ...]],
) -> None:
    now = time.time()
    for kind, members in stretch.items():
        if len(members) == 1:  # alone (a run alone, say): its plain statement
            results[members[0]] = batch[members[0]][0](conn, rows)
            continue
        ops = [batch[k][0] for k in members]
        for k, result in zip(members, kind.apply_many(conn, ops, now, rows), strict=True):
            results[k] = result


def _identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of the database file; None if it is not there (or is in memory)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _settle(items: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for future, ok, value in items:
        if future.done():
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


def _settle_results(batch: list[tuple[WriteOp, asyncio.Future[Any]]], results: list[Any]) -> None:
    for (_, future), value in zip(batch, results, strict=True):
        if not future.done():
            future.set_result(value)


# A run ending failed or cancelled while it has unfinished children is recorded, in the
# transaction that ends it, for its children to be cancelled (`Store.open_cascades`). The
# condition is the `runs_open_children` index's, word for word, so that SQLite uses it.
_MARK_CASCADE = (
    "INSERT OR REPLACE INTO cascades (run_id, since) SELECT ?1, ?2 WHERE EXISTS "
    "(SELECT 1 FROM runs WHERE parent_run_id = ?1 AND status IN ('pending', 'running', 'paused'))"
)


_KEEP: Any = object()


def _split_input(values: dict[str, Any] | None) -> tuple[dict[str, Any] | None, Any]:
    """`values` without `input` (it lives in `run_inputs`), and the new input (or `_KEEP`)."""
    if values is None or "input" not in values:
        return values, _KEEP
    rest = dict(values)
    return rest, rest.pop("input")


def _set_input(conn: sqlite3.Connection, run_id: str, value: str | None) -> None:
    conn.execute("INSERT OR REPLACE INTO run_inputs (run_id, input) VALUES (?, ?)", (run_id, value))
    conn.execute("UPDATE runs SET input = NULL WHERE run_id = ? AND input IS NOT NULL", (run_id,))


def _ends(values: dict[str, Any] | None) -> bool:
    """True for an update that ends a run as failed or cancelled."""
    return values is not None and values.get("status") in ("failed", "cancelled")


def _store_error(exc: BaseException) -> BaseException:
    if isinstance(exc, sqlite3.Error):
        return StoreError(f"database write failed: {type(exc).__name__}: {exc}")
    return exc


class SQLiteStore:
    """The default store: one SQLite file in WAL mode.

    `durability="full"` (default) fsyncs the WAL at every commit: a committed transition
    survives power loss. `"normal"` (WAL + synchronous=NORMAL) survives a crash of the process
    but may lose the last commits (never corrupting the file) on power loss or an OS crash.
    """

    def __init__(self, path: str | os.PathLike[str], *, durability: Durability = "full") -> None:
        if durability not in ("full", "normal"):
            raise ValueError(f"durability must be 'full' or 'normal', not {durability!r}")
        self.path = os.fspath(path)
        self.durability: Durability = durability
        self._writer: _Writer | None = None
        self._reader: aiosqlite.Connection | None = None
        self._update_sql: dict[tuple[Any, ...], str] = {}
        self._read_lock = asyncio.Lock()
        self.max_payload = _SQLITE_MAX_LENGTH - _ROW_ROOM
        """The largest stage output a row can hold: the connection's SQLITE_LIMIT_LENGTH
        (read at `open`), less room for the rest of the row."""

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self, *, migrate: bool = True) -> None:
        """Open the file, apply migrations (or verify them), start the writer and a reader."""

        def prepare() -> sqlite3.Connection:
            if os.path.isdir(self.path):
                raise StoreError(f"{self.path} is a directory, not a database file")
            conn = _connect(self.path, self.durability)
            try:
                migrations.apply(conn, "sqlite", verify_only=not migrate)
            except BaseException:
                conn.close()
                raise
            return conn

        try:
            conn = await asyncio.to_thread(prepare)
        except sqlite3.DatabaseError as exc:
            if migrations._is_foreign(exc):
                raise NotAWaystationDatabase(f"{self.path}: {exc}") from exc
            raise StoreError(f"{self.path}: cannot use the database: {exc}") from exc
        self.max_payload = conn.getlimit(sqlite3.SQLITE_LIMIT_LENGTH) - _ROW_ROOM
        self._writer = _Writer(conn, self.path)
        self._reader = await aiosqlite.connect(self.path, isolation_level=None)
        await self._reader.execute("PRAGMA query_only=ON")

    async def close(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            await asyncio.to_thread(writer.stop)
        if self._reader is not None:
            reader, self._reader = self._reader, None
            await reader.close()

    @property
    def stats(self) -> dict[str, int]:
        """Commits so far (`batches`) and writes they carried (`writes`)."""
        if self._writer is None:
            return {"batches": 0, "writes": 0}
        return {"batches": self._writer.batches, "writes": self._writer.writes}

    async def _write(self, op: WriteOp) -> Any:
        if self._writer is None:
            raise StoreError("store is closed")
        return await self._writer.submit(op)

    @property
    def _r(self) -> aiosqlite.Connection:
        if self._reader is None:
            raise StoreError("store is closed")
        return self._reader

    # One reader connection serves every task. In SQLite a read sees the snapshot of the
    # read transaction it runs in, and a connection's read transaction lasts while any of
    # its statements is open: two overlapping reads would share the older snapshot, and a
    # task could miss a commit it had just awaited. So reads take turns, each from execute
    # to the closed cursor, and each starts on a fresh snapshot.

    async def _read(self, sql: str, params: Any = ()) -> list[Any]:
        # execute_fetchall: one hop to the reader's thread instead of three (execute,
        # fetch, close), and the statement is finished before the lock is let go.
        async with self._read_lock:
            return list(await self._r.execute_fetchall(sql, params))

    async def _read_one(self, sql: str, params: Any = ()) -> Any:
        rows = await self._read(sql, params)
        return rows[0] if rows else None

    # -- writes ------------------------------------------------------------------------------

    async def create_run(self, run: NewRun) -> tuple[bool, RunRecord]:
        created, row = await self._write(batched.Create(run))
        return created, _run(row)

    async def update_run(
        self,
        run_id: str,
        guard: Guard,
        transitions: Sequence[NewTransition],
        values: dict[str, Any] | None = None,
    ) -> int | None:
        values, new_input = _split_input(values)
        sql, params = self._update(run_id, guard, len(transitions), values, full=False)
        ends = _ends(values)

        def write(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> int | None:
            now = time.time()
            row = conn.execute(sql, (now, *params)).fetchone()
            if row is None:
                return None
            new_seq: int = row[0]
            batched.append(rows, run_id, new_seq - len(transitions), transitions, now)
            if ends:
                conn.execute(_MARK_CASCADE, (run_id, now))
            if new_input is not _KEEP:
                _set_input(conn, run_id, new_input)
            return new_seq

        result: int | None = await self._write(write)
        return result

    def step_run(
        self,
        run_id: str,
        owner: str,
        seq: int,
        stage_index: int,
        transitions: Sequence[NewTransition],
    ) -> Awaitable[int | None]:
        if self._writer is None:
            raise StoreError("store is closed")
        # The writer's future itself, not a coroutine around it: one frame fewer to create
        # per stage and to resume per commit.
        future: Awaitable[int | None] = self._writer.submit(
            batched.Step(run_id, owner, seq, stage_index, transitions)
        )
        return future

    async def finish_run(
        self,
        run_id: str,
        owner: str,
        seq: int,
        stage_index: int,
        transitions: Sequence[NewTransition],
        output: str | None,
    ) -> float | None:
        if self._writer is None:
            raise StoreError("store is closed")
        result: tuple[int, float] | None = await self._writer.submit(
            batched.Finish(run_id, owner, seq, stage_index, transitions, output)
        )
        return None if result is None else result[1]

    async def settle_run(
        self,
        run_id: str,
        guard: Guard,
        transitions: Sequence[NewTransition],
        values: dict[str, Any] | None = None,
    ) -> RunRecord | None:
        values, new_input = _split_input(values)
        sql, params = self._update(run_id, guard, len(transitions), values, full=True)
        ends = _ends(values)

        def write(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> Any:
            now = time.time()
            row = conn.execute(sql, (now, *params)).fetchone()
            if row is not None:
                batched.append(rows, run_id, row[6] - len(transitions), transitions, now)
                if ends:
                    conn.execute(_MARK_CASCADE, (run_id, now))
                if new_input is not _KEEP:
                    _set_input(conn, run_id, new_input)
                    row = (*row[:7], new_input, *row[8:])
            return row

        row = await self._write(write)
        return None if row is None else _run(row)

    def _update(
        self,
        run_id: str,
        guard: Guard,
        n: int,
        values: dict[str, Any] | None,
        *,
        full: bool,
    ) -> tuple[str, tuple[Any, ...]]:
        """The guarded UPDATE for `update_run` and `settle_run`, and its parameters but
        the first (`updated_at`, which the writer fills in at commit time)."""
        values = values or {}
        if not RUN_COLUMNS.issuperset(values):
            raise ValueError(f"cannot set run columns {sorted(set(values) - RUN_COLUMNS)}")
        columns = tuple(values)
        key = (
            columns,
            len(guard.statuses),
            guard.owner is not None,
            guard.seq is not None,
            guard.not_cancel_requested,
            full,
        )
        sql = self._update_sql.get(key)
        if sql is None:
            sets = "".join(f", {c} = ?" for c in columns)
            where = f"run_id = ? AND status IN ({', '.join('?' * len(guard.statuses))})"
            if guard.owner is not None:
                where += " AND lease_owner = ?"
            if guard.seq is not None:
                where += " AND seq = ?"
            if guard.not_cancel_requested:
                where += " AND cancel_requested = 0"
            returning = batched.RUN_FIELDS if full else "seq"
            sql = (
                f"UPDATE runs SET updated_at = ?, seq = seq + ?{sets} WHERE {where} "
                f"RETURNING {returning}"
            )
            self._update_sql[key] = sql
        params: list[Any] = [n]
        params += [values[c] for c in columns]
        params += [run_id, *guard.statuses]
        if guard.owner is not None:
            params.append(guard.owner)
        if guard.seq is not None:
            params.append(guard.seq)
        return sql, tuple(params)

    async def renew_leases(self, owner: str, expires: float) -> int:
        def op(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> int:
            cur = conn.execute(
                "UPDATE runs SET lease_expires = ? WHERE lease_owner = ? "
                "AND status IN ('pending', 'running')",
                (expires, owner),
            )
            return cur.rowcount

        count: int = await self._write(op)
        return count

    async def cancel_requests(self, owner: str) -> list[str]:
        rows = await self._read(
            # Through the status index: only the active runs are looked at, not the
            # paused and finished ones, however many.
            "SELECT run_id FROM runs WHERE status IN ('pending', 'running') "
            "AND cancel_requested = 1 AND lease_owner = ?",
            (owner,),
        )
        return [r[0] for r in rows]

    async def release_leases(self, owner: str) -> int:
        def op(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> int:
            cur = conn.execute(
                "UPDATE runs SET lease_owner = NULL, lease_expires = NULL "
                "WHERE status IN ('pending', 'running') AND lease_owner = ?",
                (owner,),
            )
            return cur.rowcount

        count: int = await self._write(op)
        return count

    async def spend(
        self, root_run_id: str, name: str, amount: float, limit: float | None
    ) -> float | None:
        def op(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> float | None:
            row = conn.execute(
                "SELECT spent FROM budgets WHERE root_run_id = ? AND name = ?",
                (root_run_id, name),
            ).fetchone()
            total = (row[0] if row else 0.0) + amount
            if limit is not None and total > limit:
                return None
            conn.execute(
                "INSERT INTO budgets (root_run_id, name, spent) VALUES (?, ?, ?) "
                "ON CONFLICT (root_run_id, name) DO UPDATE SET spent = excluded.spent",
                (root_run_id, name, total),
            )
            return float(total)

        result: float | None = await self._write(op)
        return result

    async def open_cascades(self, before: float, limit: int = 100) -> list[tuple[str, float]]:
        rows = await self._read(
            "SELECT run_id, since FROM cascades WHERE since < ? ORDER BY since LIMIT ?",
            (before, limit),
        )
        return [(r[0], r[1]) for r in rows]

    async def clear_cascade(self, run_id: str, upto: float | None = None) -> None:
        params: tuple[Any, ...] = (run_id,)
        if upto is None:
            sql = "DELETE FROM cascades WHERE run_id = ?"
        else:
            sql, params = "DELETE FROM cascades WHERE run_id = ? AND since <= ?", (run_id, upto)
        await self._write(lambda conn, rows: conn.execute(sql, params).rowcount)

    async def prune(
        self,
        before: float,
        statuses: tuple[str, ...],
        *,
        after: str | None = None,
        limit: int = 2000,
    ) -> PrunePage:
        # Candidates are found on the reader, a page of `runs` at a time: a scan of the
        # table under the write lock held every stage commit back (0.4 s per step with 1M
        # runs, a review measured), and a page keeps each read short for other readers.
        marks = ", ".join("?" * len(statuses))
        rows = await self._read(
            f"SELECT run_id, root_run_id = run_id AND status IN ({marks}) AND updated_at < ? "
            "FROM runs WHERE run_id > ? ORDER BY run_id LIMIT ?",
            (*statuses, before, after or "", limit),
        )
        last = rows[-1][0] if len(rows) == limit else None
        candidates = [r[0] for r in rows if r[1]]
        if not candidates:
            return PrunePage(0, [], last)
        deleted, roots = await self._write(
            lambda conn, rows: _prune(conn, candidates, before, statuses)
        )
        return PrunePage(deleted, roots, last)

    # -- reads -------------------------------------------------------------------------------

    async def get_run(self, run_id: str) -> RunRecord | None:
        row = await self._read_one(
            f"SELECT {batched.RUN_FIELDS} FROM runs WHERE run_id = ?", (run_id,)
        )
        return None if row is None else _run(row)

    async def get_run_by_key(self, idempotency_key: str) -> RunRecord | None:
        row = await self._read_one(
            f"SELECT {batched.RUN_FIELDS} FROM runs WHERE idempotency_key = ?", (idempotency_key,)
        )
        return None if row is None else _run(row)

    async def list_runs(
        self,
        *,
        status: str | None = None,
        pipeline: str | None = None,
        parent_run_id: str | None = None,
        after: str | None = None,
        limit: int = 100,
        newest_first: bool = False,
    ) -> list[RunRecord]:
        where: list[str] = []
        params: list[Any] = []
        for column, value in (
            ("status", status),
            ("pipeline", pipeline),
            ("parent_run_id", parent_run_id),
        ):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if after is not None:
            where.append("run_id < ?" if newest_first else "run_id > ?")
            params.append(after)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        params.append(int(limit))
        order = "run_id DESC" if newest_first else "run_id"
        rows = await self._read(
            f"SELECT {batched.RUN_FIELDS} FROM runs {clause} ORDER BY {order} LIMIT ?", params
        )
        return [_run(r) for r in rows]

    async def tree(self, root_run_id: str) -> list[RunRecord]:
        rows = await self._read(
            f"SELECT {batched.RUN_FIELDS} FROM runs WHERE root_run_id = ? ORDER BY depth, run_id",
            (root_run_id,),
        )
        return [_run(r) for r in rows]

    # Live events follow the journal by rowid. A row's rowid is one more than the largest in
    # the table when it was inserted, and SQLite lets one transaction write at a time, so
    # rowid order is commit order, exactly, whatever the clocks say; `_prune` never lets the
    # largest rowid go, so none is given twice. (VACUUM keeps rowids: SQLite 3.40 was checked;
    # its documentation allows a VACUUM to renumber a table without an INTEGER PRIMARY KEY.)

    async def journal_end(self) -> int:
        row = await self._read_one("SELECT MAX(rowid) FROM transitions")
        return int(row[0]) if row and row[0] is not None else 0

    async def journal_position(self, at: float) -> int:
        # A binary search over rowids, a point read per step: an index on the time would
        # cost every stage commit an entry.
        lo, hi = 0, await self.journal_end()
        while lo < hi:
            mid = (lo + hi + 1) // 2
            row = await self._read_one(
                "SELECT rowid, at FROM transitions WHERE rowid >= ? ORDER BY rowid LIMIT 1", (mid,)
            )
            if row is None:  # pruned meanwhile
                hi = mid - 1
            elif row[1] < at:
                lo = min(row[0], hi)
            else:
                hi = mid - 1
        return lo

    async def journal_after(
        self, position: int, *, root_run_id: str | None = None, limit: int = 500
    ) -> JournalPage:
        fields = f"rowid, {batched.STORED_FIELDS}"
        if root_run_id is None:
            rows = await self._read(
                f"SELECT {fields} FROM transitions WHERE rowid > ? ORDER BY rowid LIMIT ?",
                (position, limit),
            )
            if not rows:
                return JournalPage([], position, False)
            # The rowid given up by a prune is kept by a row of no run (see `_prune`).
            kept = [r[1:] for r in rows if r[1]]
            return JournalPage(batched.expand(kept), rows[-1][0], len(rows) == limit)
        # The span first, then the tree's rows in it: the span's end moves on past other
        # trees' rows, which a tree's subscriber then never reads again. A row committed
        # after the first read has a rowid above the span, so the second read misses none.
        span = await self._read_one(
            "SELECT (SELECT rowid FROM transitions WHERE rowid > ?1 ORDER BY rowid "
            "LIMIT 1 OFFSET ?2), (SELECT MAX(rowid) FROM transitions)",
            (position, limit - 1),
        )
        end = 0 if span is None or span[1] is None else int(span[1])
        last = end if span is None or span[0] is None else int(span[0])
        if last <= position:
            return JournalPage([], position, False)
        rows = await self._read(
            f"SELECT {batched.STORED_FIELDS} FROM transitions WHERE rowid > ? AND rowid <= ? "
            "AND run_id IN (SELECT run_id FROM runs WHERE root_run_id = ?) ORDER BY rowid",
            (position, last, root_run_id),
        )
        return JournalPage(batched.expand(rows), last, last < end)

    async def due_runs(
        self,
        now: float,
        limit: int = 500,
        *,
        pipelines: Collection[str] | None = None,
        after: tuple[float, str] | None = None,
    ) -> list[RunRecord]:
        # `+status`, `+pipeline`: keep SQLite from choosing the status or pipeline index,
        # which would visit every paused run or every run of a pipeline (a million of them
        # take 200 ms); runs_wake holds only the runs with a wake time.
        where = "wake_at IS NOT NULL AND wake_at <= ? AND +status IN ('pending', 'paused')"
        params: list[Any] = [now]
        if pipelines is not None:
            names = sorted(pipelines)
            if not names:
                return []
            where += f" AND +pipeline IN ({', '.join('?' * len(names))})"
            params += names
        if after is not None:
            where += " AND wake_at >= ? AND (wake_at > ? OR run_id > ?)"
            params += [after[0], after[0], after[1]]
        params.append(limit)
        rows = await self._read(
            f"SELECT {batched.RUN_FIELDS} FROM runs WHERE {where} ORDER BY wake_at, run_id LIMIT ?",
            params,
        )
        return [_run(r) for r in rows]

    async def next_wake(self) -> float | None:
        row = await self._read_one(
            "SELECT MIN(wake_at) FROM runs WHERE wake_at IS NOT NULL "
            "AND +status IN ('pending', 'paused')"  # the wake index, as in due_runs
        )
        return None if row is None or row[0] is None else float(row[0])

    async def count_stage_executions(self, root_run_id: str) -> dict[str, tuple[int, int]]:
        # A row that holds the row after it (`next_event`) holds seq + 1 as well.
        rows = await self._read(
            "SELECT run_id, SUM((event IN ('started', 'retrying')) + (next_event IS 'started')), "
            "MAX(seq + (next_event IS NOT NULL)) FROM transitions "
            "WHERE run_id IN (SELECT run_id FROM runs WHERE root_run_id = ?) GROUP BY run_id",
            (root_run_id,),
        )
        return {r[0]: (int(r[1]), int(r[2])) for r in rows}

    async def history(self, run_id: str, after_seq: int = 0) -> list[TransitionRecord]:
        return (await self.run_journal(run_id, after_seq)).rows

    async def run_journal(self, run_id: str, after_seq: int = 0) -> RunJournal:
        # From the stored row before `after_seq`: row `after_seq` may be folded into it.
        stored = await self._read(
            f"SELECT rowid, {batched.STORED_FIELDS} FROM transitions WHERE run_id = ? "
            "AND seq >= ? ORDER BY seq",
            (run_id, after_seq - 1),
        )
        holder: int | None = None
        if after_seq:
            for r in stored[:2]:  # r[2]: the row's seq; a folded row (r[10]) holds seq + 1
                if r[2] <= after_seq <= r[2] + (r[10] is not None):
                    holder = r[0]
        rows = [t for t in batched.expand([r[1:] for r in stored]) if t.seq > after_seq]
        end = stored[-1][0] if rows else None
        return RunJournal(holder, rows, end)

    async def stage_results(self, run_id: str) -> list[TransitionRecord]:
        # Of the `paused` rows only the last: each lists every pause open then, gates with
        # the expiry of their first pause, so the earlier ones add nothing but bytes (a
        # group taking in N children's answers one by one writes N of them).
        rows = await self._read(
            f"SELECT {batched.TRANSITION_FIELDS} FROM transitions WHERE run_id = ?1 "
            "AND (event IN ('created', 'succeeded', 'reused', 'skipped', 'retrying', "
            "'retried', 'resumed', 'failed', 'sleeping', 'compensating', 'compensated', "
            "'compensation_failed') OR (event = 'paused' AND seq = (SELECT MAX(seq) "
            "FROM transitions WHERE run_id = ?1 AND event = 'paused'))) "
            "ORDER BY seq",
            (run_id,),
        )
        return [_transition(r) for r in rows]

    async def active_runs(
        self, after: str | None = None, limit: int = 1000, exclude_owner: str | None = None
    ) -> list[RunRecord]:
        rows = await self._read(
            f"SELECT {batched.RUN_FIELDS} FROM runs WHERE status IN ('pending', 'running') "
            "AND run_id > ? AND (lease_owner IS NULL OR lease_owner != ?) "
            "ORDER BY run_id LIMIT ?",
            (after or "", exclude_owner or "", limit),
        )
        return [_run(r) for r in rows]


def _prune(
    conn: sqlite3.Connection, candidates: list[str], before: float, statuses: tuple[str, ...]
) -> tuple[int, list[str]]:
    """Delete the trees of those `candidates` (roots) whose every run has one of
    `statuses` and was last updated before `before`, checked again here, in the write
    transaction: a child may have been launched since the candidates were read."""
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS prune_roots (run_id TEXT PRIMARY KEY)")
    conn.execute("DELETE FROM prune_roots")
    conn.executemany("INSERT INTO prune_roots VALUES (?)", [(r,) for r in candidates])
    marks = ", ".join("?" * len(statuses))
    roots = [
        r[0]
        for r in conn.execute(
            "SELECT root_run_id FROM runs WHERE root_run_id IN (SELECT run_id FROM prune_roots) "
            f"GROUP BY root_run_id HAVING MAX(updated_at) < ? AND SUM(status NOT IN ({marks})) = 0",
            (before, *statuses),
        )
    ]
    if not roots:
        return 0, []
    # Nearly always every candidate holds: only those that do not leave the table.
    dropped = set(candidates).difference(roots)
    conn.executemany("DELETE FROM prune_roots WHERE run_id = ?", [(r,) for r in dropped])
    pruned = "SELECT run_id FROM runs WHERE root_run_id IN (SELECT run_id FROM prune_roots)"
    # The journal's largest rowid must stay taken: SQLite would give it again, and live
    # events, which follow rowids, would not see the row that got it. If a pruned run holds
    # it, its row stays as a row of no run (run id '', which no run can have), in place of
    # the one an earlier prune left.
    newest = conn.execute("SELECT MAX(rowid) FROM transitions").fetchone()[0]
    held = conn.execute(
        f"SELECT 1 FROM transitions WHERE rowid = ? AND run_id IN ({pruned})", (newest,)
    ).fetchone()
    if held:
        conn.execute("DELETE FROM transitions WHERE run_id = ''")
        conn.execute(
            "UPDATE transitions SET run_id = '', seq = 0, stage_index = NULL, stage_path = NULL, "
            "event = 'pruned', attempt = 0, payload = NULL, error = NULL, next_event = NULL, "
            "next_path = NULL, next_attempt = NULL WHERE rowid = ?",
            (newest,),
        )
    conn.execute(f"DELETE FROM transitions WHERE run_id IN ({pruned})")
    conn.execute("DELETE FROM budgets WHERE root_run_id IN (SELECT run_id FROM prune_roots)")
    for table in ("cascades", "run_inputs"):
        conn.execute(
            f"DELETE FROM {table} WHERE run_id IN "
            "(SELECT run_id FROM runs WHERE root_run_id IN (SELECT run_id FROM prune_roots))"
        )
    cur = conn.execute("DELETE FROM runs WHERE root_run_id IN (SELECT run_id FROM prune_roots)")
    return cur.rowcount, roots
