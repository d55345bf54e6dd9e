"""The `waystation` command: inspect, start, resume, retry, replay, cancel and prune runs.

    waystation --db runs.db runs [--status paused] [--pipeline NAME] [--limit N] [--json]
    waystation --db runs.db show RUN_ID [--json]
    waystation --db runs.db history RUN_ID [--json]
    waystation --db runs.db start --app MODULE:ATTR PIPELINE --input JSON [--wait] [--json]
    waystation --db runs.db resume RUN_ID --input JSON [--app MODULE:ATTR] [--json]
    waystation --db runs.db retry RUN_ID --app MODULE:ATTR [--json]
    waystation --db runs.db replay RUN_ID --app MODULE:ATTR [--from STAGE] [--input JSON]
    waystation --db runs.db cancel RUN_ID [--json]
    waystation --db runs.db prune --older-than 30d [--status succeeded,cancelled] [--json]
    waystation --db runs.db migrate [--json]
    waystation plan --app MODULE:ATTR PIPELINE [--input JSON] [--json]

`--db` defaults to $WAYSTATION_DB, else `runs.db`. The reading commands never create the
database, never migrate it and never take over runs (the engine is opened with
`recover=False`), so they are safe to point at the database of a live service. `plan` opens no
database at all: it checks a pipeline, its input and its child pipelines without running
anything. The commands
that run stages (`start`, `retry`, `replay`, `resume --app`) drive only the runs they start
or continue, in this process, until those pause or finish (a parent woken by its child
included): they never close the engine on a stage in flight, unless `--timeout` expires or
the command is interrupted, and then the run stays `running` for a worker engine
(`Engine.open` with `recover=True`) to take over. `resume` without `--app` records the
answer and leaves the run to a worker engine that has its pipeline.

Exit status: 0 done (the run succeeded; for `start` without `--wait`: it started); 1 the run
failed, or a waystation error (unknown run, not a database, run not paused, ...); 2 bad usage
or bad input (invalid JSON, an input or answer that does not match its fields or schema, an
`--app` that cannot be imported): then nothing was changed; 3 the run is paused, waiting for
an answer; 4 the run was cancelled. `plan` exits 0 when the plan found no problem, 2 when it
found some (or on bad usage).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import os
import re
import shlex
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import anyio
import msgspec

from . import __version__
from .engine.engine import Engine
from .engine.models import Run, RunTree, StageError, Transition
from .engine.pipeline import Pipeline
from .engine.plan import make_plan
from .errors import InvalidInput, InvalidResumeInput, StoreError, WaystationError
from .migrations import current_version
from .store.sqlite import SQLiteStore

EXIT_OK = 0
EXIT_ERROR = 1
"""A waystation error, or (start, retry, replay) the run failed."""
EXIT_USAGE = 2
EXIT_PAUSED = 3
EXIT_CANCELLED = 4

STATUSES = ("pending", "running", "paused", "succeeded", "failed", "cancelled")
FINISHED = ("succeeded", "failed", "cancelled")
OUTCOME_EXIT = {
    "succeeded": EXIT_OK,
    "failed": EXIT_ERROR,
    "paused": EXIT_PAUSED,
    "cancelled": EXIT_CANCELLED,
}
"""The exit status of a command that ran a run, by the status the run settled in."""


class UsageError(Exception):
    """The command line or its input is wrong; nothing was done (exit status 2)."""


class StageSpan(msgspec.Struct, kw_only=True):
    """One stage of a run as its journal tells it (the rows of `show`'s timeline)."""

    stage_index: int
    stage: str | None
    started_at: datetime | None = None
    """When the stage was first entered."""
    ended_at: datetime | None = None
    """When it succeeded, was skipped, failed or was cancelled; None while open."""
    duration: float | None = None
    """Seconds from start to end, time spent paused included."""
    attempts: int = 0
    """Attempts started (1 unless it was retried; 0 when skipped)."""
    outcome: str = "running"
    """succeeded, reused (copied by a replay), skipped, failed, paused, running or
    cancelled."""
    paused: float = 0.0
    """Seconds spent waiting for an answer (closed pauses only)."""
    pause_kind: str | None = None
    recovered: int = 0
    """How often another process took this stage over after its owner died."""
    retried: int = 0
    """How often the failed or cancelled run was retried at this stage."""
    error: StageError | None = None
    """Why it failed, or the last failed attempt before a retry."""


def timeline(history: Sequence[Transition]) -> list[StageSpan]:
    """Fold a run's journal into one `StageSpan` per stage it reached, in stage order."""
    # Branches of a parallel group (`group.branch`) get spans of their own, listed under
    # their group's, so their times can be read side by side.
    spans: dict[tuple[int, str], StageSpan] = {}
    paused_since: dict[tuple[int, str], datetime] = {}
    # `retry` of a failed run restarts a stage's attempt numbers at 1: count on from before.
    offset: dict[tuple[int, str], int] = {}
    for t in history:
        if t.stage_index is None or t.event in ("created", "completed"):
            continue
        i = (t.stage_index, t.stage_path if t.stage_path and "." in t.stage_path else "")
        span = spans.get(i)
        if span is None:
            span = spans[i] = StageSpan(stage_index=t.stage_index, stage=t.stage_path)
        if span.stage is None:
            span.stage = t.stage_path
        if span.started_at is None:
            span.started_at = t.at
        event = t.event
        attempt = offset.get(i, 0) + t.attempt
        if event == "started":
            span.attempts = max(span.attempts, attempt)
            span.outcome = "running"
        elif event == "retrying":
            span.attempts = max(span.attempts, attempt + 1)
            span.error = t.error
            span.outcome = "running"
        elif event == "retried":
            offset[i] = span.attempts
            span.retried += 1
            span.ended_at = None
            span.outcome = "running"
        elif event == "reused":
            span.ended_at = t.at
            span.outcome = "reused"
        elif event == "paused":
            span.attempts = max(span.attempts, attempt)
            pauses = _pauses(t.payload)
            _paused(span, pauses, t.at, paused_since, i)
            # A group journals its branches' pauses on its own row, each pause naming its
            # branch: without this a paused branch would look `running`. Only a branch
            # this journal started is one (a child run's own paths are not).
            for path in dict.fromkeys(p.get("stage_path") for p in pauses):
                if not isinstance(path, str) or not path.startswith(f"{t.stage_path}."):
                    continue
                branch = (t.stage_index, path)
                if branch in spans:
                    mine = [p for p in pauses if p.get("stage_path") == path]
                    _paused(spans[branch], mine, t.at, paused_since, branch)
        elif event == "resumed":
            since = paused_since.pop(i, None)
            if since is not None:
                span.paused += (t.at - since).total_seconds()
            span.outcome = "running"
        elif event == "recovered":
            span.recovered += 1
            span.outcome = "running"
        elif event in ("succeeded", "skipped", "failed", "cancelled"):
            span.ended_at = t.at
            span.outcome = event
            if event == "succeeded":
                span.attempts = max(span.attempts, attempt)
            elif event == "skipped":
                span.attempts = 0
            elif event == "failed":
                span.attempts = max(span.attempts, attempt)
                span.error = t.error
    for span in spans.values():
        if span.started_at is not None and span.ended_at is not None:
            span.duration = (span.ended_at - span.started_at).total_seconds()
    return [spans[i] for i in sorted(spans)]


def _paused(
    span: StageSpan,
    pauses: list[dict[str, Any]],
    at: datetime,
    paused_since: dict[tuple[int, str], datetime],
    key: tuple[int, str],
) -> None:
    span.outcome = "paused"
    paused_since[key] = at
    kinds = [p.get("kind") for p in pauses]
    span.pause_kind = ", ".join(k for k in kinds if isinstance(k, str)) or None


# -- formatting ---------------------------------------------------------------------------------


def _local(at: datetime) -> datetime:
    return at.astimezone()


def _datetime(at: datetime) -> str:
    return _local(at).strftime("%Y-%m-%d %H:%M:%S")


def _clock(at: datetime | None, day: datetime) -> str:
    """Time of day with milliseconds; with the date too when it is not `day`'s."""
    if at is None:
        return "-"
    local = _local(at)
    text = local.strftime("%H:%M:%S.%f")[:-3]
    if local.date() != _local(day).date():
        text = f"{local:%Y-%m-%d} {text}"
    return text


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(seconds, 0.0)
    if seconds < 0.01:
        return f"{seconds * 1000:.1f}ms"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.2f}s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def _json(value: Any) -> str:
    try:
        return msgspec.json.encode(value).decode()
    except (TypeError, msgspec.EncodeError):
        return repr(value)


def _short(text: str, width: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _error(err: StageError) -> str:
    return f"{err.type}: {err.message}"


_FRAME = re.compile(r'^  File "(.+?)", line \d+')
_INTERNAL_FRAME = re.compile(
    r"[\\/](?:waystation[\\/](?:engine|store)|anyio|tenacity|asyncio|concurrent)[\\/]"
)


def _user_traceback(text: str) -> list[str]:
    """A stored traceback without the frames of the engine, anyio, tenacity and asyncio."""
    out: list[str] = []
    hidden = 0
    skipping = False
    for line in text.rstrip().splitlines():
        frame = _FRAME.match(line)
        if frame is not None:
            skipping = _INTERNAL_FRAME.search(frame[1]) is not None
            hidden += skipping
        elif not (skipping and line.startswith("    ")):
            skipping = False
        if not skipping:
            out.append(line)
    if hidden:
        out.append(f"({hidden} frames of waystation, anyio, tenacity or asyncio not shown)")
    return out


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "") -> list[str]:
    widths = [len(h) for h in header]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = []
    for row in (header, *rows):
        cells = [cell.ljust(w) for cell, w in zip(row, widths, strict=True)]
        lines.append((indent + "  ".join(cells)).rstrip())
    return lines


def _print_json(value: Any) -> None:
    print(msgspec.json.format(msgspec.json.encode(value), indent=2).decode())


def _stage_of(run: Run) -> str:
    if run.stage_name is not None:
        return run.stage_name
    if run.error is not None and run.error.stage_name is not None:
        return run.error.stage_name
    if run.status == "succeeded":
        return "-"
    return f"#{run.stage_index}"


# -- opening the database -----------------------------------------------------------------------


class _VerifyingStore(SQLiteStore):
    """A SQLite store that verifies the schema instead of migrating it (for reading)."""

    async def open(self, *, migrate: bool = False) -> None:
        await super().open(migrate=migrate)


def _require_database(path: str) -> None:
    if not os.path.exists(path):
        raise StoreError(
            f"{path}: no such database (pass --db PATH or set WAYSTATION_DB; "
            "`waystation migrate` creates one)"
        )
    if os.path.isdir(path):
        raise StoreError(f"{path} is a directory, not a database file")
    if os.path.getsize(path) == 0:  # SQLite would take it as a new database and write it
        raise StoreError(
            f"{path}: an empty file, not a waystation database (run `waystation migrate`)"
        )
    # Refuse a foreign file before the store opens it: opening switches it to WAL mode.
    _schema_version(path)


@contextlib.asynccontextmanager
async def _reading(path: str) -> AsyncIterator[Engine]:
    """An engine that only reads: no migration, no recovery, no pipelines."""
    _require_database(path)
    async with Engine.open(_VerifyingStore(path), recover=False) as engine:
        yield engine


# -- runs ---------------------------------------------------------------------------------------


async def _list_runs(path: str, status: str | None, pipeline: str | None, limit: int) -> list[Run]:
    async with _reading(path) as engine:
        if limit <= 0:
            return [run async for run in engine.iter_runs(status=status, pipeline=pipeline)]
        # The newest `limit` (run ids sort by creation time), shown oldest first. Read
        # from the newest end: paging through every run cost 1.3 s at 100,000 runs.
        newest = await engine.list(status=status, pipeline=pipeline, limit=limit, newest_first=True)
        return newest[::-1]


def cmd_runs(args: argparse.Namespace) -> int:
    path: str = args.db
    runs = asyncio.run(_list_runs(path, args.status, args.pipeline, args.limit))
    if args.json:
        _print_json(runs)
        return EXIT_OK
    if not runs:
        print("no runs" + (" match" if args.status or args.pipeline else ""))
        return EXIT_OK
    rows = [
        [
            run.run_id,
            run.pipeline,
            run.pipeline_version,
            run.status,
            _stage_of(run),
            run.pause.kind if run.pause is not None else "-",
            _datetime(run.updated_at),
        ]
        for run in runs
    ]
    header = ["RUN ID", "PIPELINE", "VERSION", "STATUS", "STAGE", "PAUSE", "UPDATED"]
    print("\n".join(_table(header, rows)))
    return EXIT_OK


# -- show ---------------------------------------------------------------------------------------


async def _load(path: str, run_id: str) -> tuple[Run, list[Transition], RunTree]:
    async with _reading(path) as engine:
        run = await engine.get(run_id)
        return run, await engine.history(run_id), await engine.tree(run_id)


def _describe(run: Run, path: str) -> list[str]:
    """The run's fields, one per line: status, input, output or error, the open pause."""
    out: list[str] = []

    def field(name: str, value: str) -> None:
        out.append(f"{name:<10} {value}")

    field("run", run.run_id)
    field("pipeline", f"{run.pipeline} (version {run.pipeline_version})")
    field("status", run.status + (" (cancel requested)" if run.cancel_requested else ""))
    field("created", _datetime(run.created_at))
    field("updated", _datetime(run.updated_at))
    if run.parent_run_id is not None:
        field("parent", run.parent_run_id)
    replay_of = getattr(run, "replay_of", None)
    if replay_of is not None:
        field("replay of", str(replay_of))
    if run.idempotency_key is not None:
        field("key", run.idempotency_key)
    text = _json(run.input)
    if len(text) > 2000:
        text = f"{text[:2000]}… ({len(text) - 2000} more characters; see --json)"
    field("input", text)
    if run.status == "succeeded":
        field("output", _json(run.output))
    if run.error is not None:
        where = f" (stage {run.error.stage_name!r})" if run.error.stage_name else ""
        field("error", _error(run.error) + where)
        if run.error.traceback:
            out.append("traceback")
            out.extend("  " + line for line in _user_traceback(run.error.traceback))
    pause = run.pause
    if pause is not None:
        waiting = time.time() - pause.created_at if pause.created_at else None
        field(
            "pause",
            f"{pause.kind} at stage {pause.stage_name!r} (#{pause.stage_index}), "
            f"waiting {_duration(waiting)}",
        )
        if pause.reason:
            field("  reason", pause.reason)
        field("  id", pause.pause_id + ("" if pause.gate else " (ctx.pause: the stage re-runs)"))
        waiter = getattr(pause, "run_id", None)
        if waiter is not None and waiter != run.run_id:
            field("  run", f"{waiter} (the child run that waits; resuming either answers it)")
        schema = msgspec.json.format(msgspec.json.encode(pause.schema), indent=2).decode()
        lines = schema.splitlines()
        field("  schema", lines[0])
        out.extend(" " * 11 + line for line in lines[1:])
        command = shlex.join(["waystation", "--db", path, "resume", run.run_id, "--input"])
        field("  resume", f"{command} JSON [--app MODULE:ATTR]")
    return out


def _pending_outcome(history: list[Transition]) -> str:
    """Why a run is pending at its last stage: asleep until a time, or answered."""
    last = history[-1] if history else None
    if last is not None and last.event == "sleeping" and isinstance(last.payload, dict):
        wake_at = last.payload.get("wake_at")
        if isinstance(wake_at, int | float):
            when = datetime.fromtimestamp(wake_at, UTC)
            return f"sleeping until {_datetime(when)}; an engine that runs timers wakes it"
    return "pending: answered; a worker engine continues it"


def _timeline_lines(run: Run, spans: list[StageSpan], history: list[Transition]) -> list[str]:
    rows = []
    for span in spans:
        outcome = span.outcome
        if outcome == "running" and run.status == "pending" and span is spans[-1]:
            outcome = _pending_outcome(history)
        elif outcome == "paused":
            outcome = f"paused: waiting for {span.pause_kind or 'an answer'}"
        elif outcome == "failed" and span.error is not None:
            outcome = f"failed: {_short(_error(span.error), 60)}"
        notes = []
        if span.paused:
            notes.append(f"waited {_duration(span.paused)} for {span.pause_kind or 'an answer'}")
        if span.attempts > 1 and span.outcome != "failed" and span.error is not None:
            notes.append(f"after {_short(_error(span.error), 40)}")
        if span.recovered:
            notes.append(f"recovered {span.recovered}x after a crash")
        if span.retried:
            notes.append(f"run retried {span.retried}x here")
        if notes:
            outcome += f" ({'; '.join(notes)})"
        rows.append(
            [
                str(span.stage_index),
                span.stage or "-",
                _clock(span.started_at, run.created_at),
                _clock(span.ended_at, run.created_at),
                _duration(span.duration),
                str(span.attempts) if span.attempts else "-",
                outcome,
            ]
        )
    header = ["#", "STAGE", "STARTED", "ENDED", "DURATION", "ATTEMPTS", "OUTCOME"]
    out = ["timeline", *_table(header, rows, indent="  ")]
    if run.done and history:
        total = (history[-1].at - history[0].at).total_seconds()
        out.append(f"  {run.status} in {_duration(total)}")
    return out


TREE_ROWS = 200
"""`show` lists at most this many runs of a tree (all of them with --json)."""


def _tree_lines(tree: RunTree) -> list[str]:
    """The run and its descendants, one per line, each indented under its parent."""
    rows: list[list[str]] = []
    total = 0
    stack = [(tree, 0)]
    while stack:
        node, level = stack.pop()
        total += 1
        stack.extend((child, level + 1) for child in reversed(node.children))
        if len(rows) < TREE_ROWS:
            run = node.run
            rows.append(
                [
                    "  " * level + run.run_id,
                    run.pipeline,
                    run.run_kind,
                    run.status,
                    _stage_of(run),
                    run.pause.kind if run.pause is not None else "-",
                ]
            )
    header = ["RUN ID", "PIPELINE", "KIND", "STATUS", "STAGE", "PAUSE"]
    out = [f"tree ({total} runs)", *_table(header, rows, indent="  ")]
    if total > len(rows):
        out.append(f"  … and {total - len(rows)} more runs (see --json)")
    return out


def cmd_show(args: argparse.Namespace) -> int:
    path: str = args.db
    run, history, tree = asyncio.run(_load(path, args.run_id))
    spans = timeline(history)
    if args.json:
        _print_json({"run": run, "timeline": spans, "tree": tree if tree.children else None})
        return EXIT_OK
    out = _describe(run, path)
    if tree.children:
        out += ["", *_tree_lines(tree)]
    print("\n".join([*out, "", *_timeline_lines(run, spans, history)]))
    return EXIT_OK


# -- history ------------------------------------------------------------------------------------


def _pauses(payload: Any) -> list[dict[str, Any]]:
    """The pauses in a `paused` row's payload (a list; a single object in old rows)."""
    if isinstance(payload, dict):
        return [payload]
    if isinstance(payload, list):
        return [p for p in payload if isinstance(p, dict)]
    return []


def _detail(t: Transition) -> str:
    payload = t.payload
    if t.event == "paused" and _pauses(payload):
        parts = []
        for p in _pauses(payload):
            reason = p.get("reason")
            parts.append(f"{p.get('kind')}" + (f": {reason}" if reason else ""))
        return "; ".join(parts)
    if t.event == "recovered" and isinstance(payload, dict):
        return f"taken over from {payload.get('previous_owner') or 'a stopped engine'}"
    if t.event == "retrying" and t.error is not None:
        wait = payload.get("wait") if isinstance(payload, dict) else None
        suffix = f"; retry in {_duration(wait)}" if isinstance(wait, int | float) else ""
        return _short(_error(t.error), 70) + suffix
    if t.error is not None:
        return _error(t.error)
    if payload is None:
        return ""
    return _json(payload)


async def _history(path: str, run_id: str) -> list[Transition]:
    async with _reading(path) as engine:
        return await engine.history(run_id)


def cmd_history(args: argparse.Namespace) -> int:
    path: str = args.db
    history = asyncio.run(_history(path, args.run_id))
    if args.json:
        _print_json(history)
        return EXIT_OK
    day = history[0].at if history else datetime.now(UTC)
    rows = [
        [
            str(t.seq),
            _clock(t.at, day),
            t.event,
            t.stage_path or (f"#{t.stage_index}" if t.stage_index is not None else "-"),
            str(t.attempt) if t.attempt else "-",
            _short(_detail(t)),
        ]
        for t in history
    ]
    print(f"run {args.run_id} (times on {_local(day):%Y-%m-%d} unless dated)")
    print("\n".join(_table(["SEQ", "TIME", "EVENT", "STAGE", "ATTEMPT", "DETAIL"], rows)))
    return EXIT_OK


# -- input and --app ----------------------------------------------------------------------------


def _read_input(text: str) -> Any:
    """The resume value: JSON text, `@file` for a file's content, `-` for stdin."""
    if text == "-":
        text = sys.stdin.read()
    elif text.startswith("@"):
        try:
            with open(text[1:], encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise UsageError(f"--input {text}: cannot read the file: {exc}") from exc
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError as exc:
        raise UsageError(
            f"--input is not valid JSON ({exc}): {_short(text, 60)!r}; "
            """quote it for the shell, e.g. --input '{"approved": true}'"""
        ) from exc


def load_app(spec: str) -> list[Pipeline]:
    """Import `module:attr` (attr may be dotted): a Pipeline or a list/tuple of Pipelines.

    The current directory is importable, as with `python -m`.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"--app {spec!r}: expected MODULE:ATTR, e.g. --app myapp.flows:pipelines")
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # Only a missing app module is a usage error; a missing import inside it is a bug
        # the traceback should show.
        if exc.name is None or not (module_name + ".").startswith(exc.name + "."):
            raise
        raise UsageError(
            f"--app {spec}: no module named {exc.name!r} (is its directory on PYTHONPATH? "
            f"the current directory is {cwd})"
        ) from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UsageError(f"--app {spec}: {module_name} has no attribute {attr!r}") from None
    if isinstance(obj, Pipeline):
        return [obj]
    if isinstance(obj, list | tuple) and obj and all(isinstance(p, Pipeline) for p in obj):
        return list(obj)
    raise UsageError(
        f"--app {spec}: {attr} is {type(obj).__name__}, not a Pipeline or a list of Pipelines"
    )


# -- running runs: the engine that drives them --------------------------------------------------


@contextlib.asynccontextmanager
async def _driving(path: str, pipelines: Sequence[Pipeline] = ()) -> AsyncIterator[Engine]:
    """An engine on an existing database that drives only the runs this command starts or
    continues: `recover=False`, so never runs that other processes left behind."""
    _require_database(path)
    async with Engine.open(path, pipelines=pipelines, recover=False, shutdown_grace=0) as engine:
        yield engine


async def _settle(engine: Engine, run_id: str, timeout: float | None, what: str) -> Run:
    """Wait until the run pauses or finishes, then until every run this engine still drives
    has too (an ancestor that a resumed child woke, say): closing the engine would interrupt
    them. Returns the run as it settled."""
    try:
        with anyio.fail_after(timeout):
            await engine.wait(run_id)
            # The engine has no event for "drives nothing": poll (cheap, in memory).
            while engine.active_runs:  # noqa: ASYNC110
                await anyio.sleep(0.01)
    except TimeoutError:
        raise WaystationError(
            f"run {run_id} {what} but did not settle within {timeout}s; it is still running, "
            "and a worker engine (Engine.open with recover=True) continues it"
        ) from None
    return await engine.get(run_id)


def _check_app(engine: Engine, app: str, run: Run, hint: str = "") -> None:
    """Refuse, before anything is written, an `--app` without the run's pipeline."""
    if any(p.name == run.pipeline and p.version == run.pipeline_version for p in engine.pipelines):
        return
    have = ", ".join(sorted({f"{p.name} v{p.version}" for p in engine.pipelines}))
    raise UsageError(
        f"--app {app} has no pipeline {run.pipeline!r} version {run.pipeline_version!r}, "
        f"which run {run.run_id} belongs to (it has: {have}){hint}"
    )


def _outcome(run: Run, *, again: bool = False) -> list[str]:
    """How a run settled, for a person: a line, and the output if it succeeded."""
    line = f"run {run.run_id} {run.status}"
    pause = run.pause
    if run.status == "paused" and pause is not None:
        reason = f": {pause.reason}" if pause.reason else ""
        line += f"{' again,' if again else ''} at stage {pause.stage_name!r} waiting for "
        line += f"{pause.kind}{reason}"
        if pause.run_id is not None and pause.run_id != run.run_id:
            line += f" (in child run {pause.run_id}; resuming either answers it)"
    elif run.status == "failed" and run.error is not None:
        line += f" at stage {run.error.stage_name!r}: {_error(run.error)}"
    elif run.status == "cancelled" and run.error is None and run.stage_name is not None:
        line += f" at stage {run.stage_name!r}"
    out = [line]
    if run.status == "succeeded":
        out.append(f"output: {_json(run.output)}")
    return out


def _exit_status(run: Run) -> int:
    return OUTCOME_EXIT.get(run.status, EXIT_OK)


def _say(line: str) -> None:
    """Print a progress line at once, before the command goes on waiting."""
    print(line, flush=True)


# -- resume -------------------------------------------------------------------------------------


async def _resume(
    path: str,
    app: str | None,
    pipelines: list[Pipeline],
    run_id: str,
    value: Any,
    pause_id: str | None,
    timeout: float | None,
) -> Run:
    async with _driving(path, pipelines) as engine:
        if app is not None:
            hint = "; leave out --app to record the answer for a worker engine to continue"
            _check_app(engine, app, await engine.get(run_id), hint)
        run = await engine.resume(run_id, value, pause_id=pause_id, wait=False)
        if app is None:
            return run
        return await _settle(engine, run_id, timeout, "was resumed")


def cmd_resume(args: argparse.Namespace) -> int:
    path: str = args.db
    app: str | None = args.app
    value = _read_input(args.input)
    pipelines = load_app(app) if app is not None else []
    run = asyncio.run(
        _resume(path, app, pipelines, args.run_id, value, args.pause_id, args.timeout)
    )
    # As `start --wait`: the status the run settled in (a failure or a new pause is not
    # a success for a script). Without --app the answer is only recorded: that is done.
    recorded = app is None and not run.done and run.status != "paused"
    status = EXIT_OK if app is None else _exit_status(run)
    if args.json:
        _print_json(run)
        return status
    if recorded:
        print(
            f"run {run.run_id} {run.status}: the answer is recorded; a worker engine with "
            f"pipeline {run.pipeline!r} version {run.pipeline_version!r} continues the run"
        )
        return status
    print("\n".join(_outcome(run, again=True)))
    return status


# -- start --------------------------------------------------------------------------------------


def _find_pipeline(app: str, pipelines: Sequence[Pipeline], name: str) -> Pipeline:
    """The pipeline named `name` among the app's pipelines and their child pipelines (the
    engine registers those too); of several versions, the last one listed."""
    found: Pipeline | None = None
    names: dict[str, None] = {}
    stack = list(reversed(pipelines))
    while stack:
        p = stack.pop()
        names[p.name] = None
        if p.name == name:
            found = p
        stack.extend(reversed(p.children()))
    if found is None:
        raise UsageError(f"--app {app} has no pipeline {name!r} (it has: {', '.join(names)})")
    return found


async def _start(
    args: argparse.Namespace, pipelines: list[Pipeline], p: Pipeline, value: Any
) -> Run:
    async with _driving(args.db, pipelines) as engine:
        run = await engine.submit(
            p, value, run_id=args.run_id, idempotency_key=args.idempotency_key
        )
        # A new run is driven here; one that existed (same id or key) is not.
        fresh = run.run_id in engine.active_runs
        if args.json:
            if not args.wait:
                _print_json(run)
        elif fresh:
            _say(f"run {run.run_id} started ({run.pipeline} version {run.pipeline_version})")
        else:
            same = (
                f"id {run.run_id}" if args.run_id else f"idempotency key {args.idempotency_key!r}"
            )
            _say(f"run {run.run_id} exists already with this {same}: nothing was started")
        if fresh or args.wait:
            run = await _settle(engine, run.run_id, args.timeout, "was started")
        return run


def cmd_start(args: argparse.Namespace) -> int:
    app: str = args.app
    value = _read_input(args.input) if args.input is not None else None
    pipelines = load_app(app)
    pipeline = _find_pipeline(app, pipelines, args.pipeline)
    pipeline.validate_input(value)  # a bad input is refused before the database is opened
    run = asyncio.run(_start(args, pipelines, pipeline, value))
    if args.json:
        if args.wait:
            _print_json(run)
    else:
        print("\n".join(_outcome(run)))
    return _exit_status(run) if args.wait else EXIT_OK


# -- plan ---------------------------------------------------------------------------------------


def cmd_plan(args: argparse.Namespace) -> int:
    app: str = args.app
    pipeline = _find_pipeline(app, load_app(app), args.pipeline)
    if args.input is None:
        plan = make_plan(pipeline)
    else:
        value = _read_input(args.input)
        # `make_plan` reads None as "no input given"; the engine reads a null input as one
        # with no fields, and checks it so (as `start --input null` does).
        plan = make_plan(pipeline, {} if value is None else value)
    if args.json:
        _print_json(plan)
    else:
        print(plan.render())
    return EXIT_OK if plan.ok else EXIT_USAGE


# -- retry and replay ---------------------------------------------------------------------------


async def _retry(path: str, app: str, pipelines: list[Pipeline], args: argparse.Namespace) -> Run:
    run_id: str = args.run_id
    async with _driving(path, pipelines) as engine:
        _check_app(engine, app, await engine.get(run_id))
        run = await engine.retry(run_id, wait=False)
        if not args.json:
            _say(f"run {run_id} retried at stage {run.stage_name!r}")
        return await _settle(engine, run_id, args.timeout, "was retried")


def cmd_retry(args: argparse.Namespace) -> int:
    app: str = args.app
    run = asyncio.run(_retry(args.db, app, load_app(app), args))
    if args.json:
        _print_json(run)
    else:
        print("\n".join(_outcome(run)))
    return _exit_status(run)


def _stage_arg(text: str) -> str | int:
    """`--from`: a stage name, or its index."""
    return int(text) if text.isdigit() else text


async def _replay(
    path: str, app: str, pipelines: list[Pipeline], args: argparse.Namespace, value: Any
) -> Run:
    run_id: str = args.run_id
    async with _driving(path, pipelines) as engine:
        _check_app(engine, app, await engine.get(run_id))
        run = await engine.replay(run_id, from_stage=args.from_stage, input=value, wait=False)
        if not args.json:
            history = await engine.history(run.run_id)
            reused = [t.stage_path or f"#{t.stage_index}" for t in history if t.event == "reused"]
            kept = f", reusing the output of {', '.join(reused)}" if reused else ""
            _say(
                f"run {run.run_id} started: a replay of run {run_id} from stage "
                f"{run.stage_name!r}{kept}"
            )
        return await _settle(
            engine, run.run_id, args.timeout, f"(a replay of {run_id}) was started"
        )


def cmd_replay(args: argparse.Namespace) -> int:
    app: str = args.app
    value = _read_input(args.input) if args.input is not None else None
    run = asyncio.run(_replay(args.db, app, load_app(app), args, value))
    if args.json:
        _print_json(run)
    else:
        print("\n".join(_outcome(run)))
    return _exit_status(run)


# -- cancel -------------------------------------------------------------------------------------


def _descendants(tree: RunTree) -> list[Run]:
    out: list[Run] = []
    stack = list(tree.children)
    while stack:
        node = stack.pop()
        out.append(node.run)
        stack.extend(node.children)
    return out


async def _cancel(path: str, run_id: str) -> tuple[Run, int]:
    """Cancel the run; returns it and how many of its descendants this cancelled."""
    async with _driving(path) as engine:
        before = {r.run_id for r in _descendants(await engine.tree(run_id)) if not r.done}
        run = await engine.cancel(run_id)
        after = _descendants(await engine.tree(run_id))
        return run, sum(r.run_id in before and r.status == "cancelled" for r in after)


def cmd_cancel(args: argparse.Namespace) -> int:
    run, children = asyncio.run(_cancel(args.db, args.run_id))
    if args.json:
        _print_json(run)
    elif run.status == "cancelled":
        also = f", and {children} child run{'' if children == 1 else 's'}" if children else ""
        print(f"run {run.run_id} cancelled{also}")
    else:
        print(
            f"run {run.run_id} {run.status}, cancel requested: the engine that drives it "
            "cancels it when its current stage ends (discarding that stage's result), or a "
            "worker engine when it takes the run over"
        )
    return EXIT_OK


# -- prune --------------------------------------------------------------------------------------


_AGE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([smhdw]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _age(text: str) -> float:
    """A duration: `30d`, `12h`, `90m`, `3600s`, `2w` or a number of seconds."""
    match = _AGE.fullmatch(text.strip().lower())
    if match is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration (e.g. 30d, 12h, 90m, 3600s, or seconds)"
        )
    return float(match[1]) * _UNITS[match[2]]


def _age_text(seconds: float) -> str:
    """`older_than` as given: 30d, 12h, 90m, 3600s -> 1h."""
    for unit in ("w", "d", "h", "m"):
        if seconds and seconds % _UNITS[unit] == 0:
            return f"{seconds / _UNITS[unit]:g}{unit}"
    return f"{seconds:g}s"


def _finished_statuses(text: str) -> tuple[str, ...]:
    statuses = tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    wrong = [s for s in statuses if s not in FINISHED]
    if wrong or not statuses:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give finished statuses, comma-separated, of {', '.join(FINISHED)}"
        )
    return statuses


async def _prune(path: str, older_than: float, statuses: tuple[str, ...]) -> int:
    async with _driving(path) as engine:
        return await engine.prune(older_than=older_than, status=statuses)


def cmd_prune(args: argparse.Namespace) -> int:
    older_than: float = args.older_than
    statuses: tuple[str, ...] = args.status
    deleted = asyncio.run(_prune(args.db, older_than, statuses))
    if args.json:
        _print_json({"deleted": deleted, "older_than": older_than, "status": statuses})
    else:
        print(
            f"deleted {deleted} run{'' if deleted == 1 else 's'} ({' or '.join(statuses)}, "
            f"last changed more than {_age_text(older_than)} ago; a tree only as a whole)"
        )
    return EXIT_OK


# -- migrate ------------------------------------------------------------------------------------


def _schema_version(path: str) -> int:
    if not os.path.exists(path) or os.path.isdir(path):
        return 0
    try:
        conn = sqlite3.connect(path)
    except sqlite3.Error as exc:
        raise StoreError(f"{path}: cannot open: {exc}") from exc
    try:
        return current_version(conn)
    except StoreError as exc:
        raise type(exc)(f"{path}: {exc}") from exc
    finally:
        conn.close()


async def _migrate(path: str) -> None:
    store = SQLiteStore(path)
    await store.open()
    await store.close()


def cmd_migrate(args: argparse.Namespace) -> int:
    path: str = args.db
    before = _schema_version(path)
    asyncio.run(_migrate(path))
    after = _schema_version(path)
    if args.json:
        _print_json({"database": path, "schema_version": after, "applied": after - before})
    elif after == before:
        print(f"{path}: schema version {after}, up to date")
    else:
        print(f"{path}: schema version {after} (migrated from {before})")
    return EXIT_OK


# -- the parser ---------------------------------------------------------------------------------


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 (no limit) or more")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `waystation` command."""
    parser = argparse.ArgumentParser(
        prog="waystation",
        description="Inspect, start, resume, retry, replay, cancel and prune waystation runs "
        "in a SQLite database, and plan a pipeline without running it.",
        epilog="Exit status: 0 ok (the run succeeded, or `start` without --wait: it started), "
        "1 the run failed or a waystation error, 2 bad usage or input (nothing changed; for "
        "`plan`: it found problems), 3 the run is paused, 4 the run was cancelled.",
    )
    db_help = "the database file (default: $WAYSTATION_DB, else runs.db)"
    parser.add_argument("--db", default=os.environ.get("WAYSTATION_DB") or "runs.db", help=db_help)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the engine does")
    parser.add_argument("--version", action="version", version=f"waystation {__version__}")
    # --db and -v are accepted after the command too (`waystation show ID --db x.db`).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--db", default=argparse.SUPPRESS, help=db_help)
    common.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, func: Callable[[argparse.Namespace], int], text: str
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[common], help=text, description=text)
        sub.set_defaults(func=func)
        return sub

    runs = command("runs", cmd_runs, "list runs, most recent last")
    runs.add_argument("--status", choices=STATUSES, help="only runs in this status")
    runs.add_argument("--pipeline", metavar="NAME", help="only runs of this pipeline")
    runs.add_argument(
        "--limit",
        type=_count,
        default=50,
        metavar="N",
        help="show the N most recent matching runs (default 50; 0 for all)",
    )
    runs.add_argument("--json", action="store_true", help="print JSON instead of text")

    show = command(
        "show", cmd_show, "a run: status, input, output or error, pause, child runs, timeline"
    )
    show.add_argument("run_id", metavar="RUN_ID")
    show.add_argument("--json", action="store_true", help="print JSON instead of text")

    history = command("history", cmd_history, "a run's journal, one line per transition")
    history.add_argument("run_id", metavar="RUN_ID")
    history.add_argument("--json", action="store_true", help="print JSON instead of text")

    resume = command(
        "resume", cmd_resume, "answer a paused run; with --app, drive it until it pauses or ends"
    )
    resume.add_argument("run_id", metavar="RUN_ID")
    resume.add_argument(
        "--input",
        required=True,
        metavar="JSON",
        help="the answer, as JSON (`@FILE` reads it from a file, `-` from stdin)",
    )
    resume.add_argument(
        "--app",
        metavar="MODULE:ATTR",
        help="the run's pipeline (a Pipeline or a list of Pipelines), to continue the run in "
        "this process; without it the answer is recorded and a worker engine continues it",
    )
    resume.add_argument("--pause-id", help="resume only if this pause is the open one")
    resume.add_argument(
        "--timeout",
        type=_seconds,
        metavar="SECONDS",
        help="stop waiting after this long (the run goes on in the next engine)",
    )
    resume.add_argument("--json", action="store_true", help="print JSON instead of text")

    app_help = "the pipelines: MODULE:ATTR, a Pipeline or a list of Pipelines"
    timeout_help = (
        "stop waiting after this long (exit 1; the run stays running for a worker engine)"
    )
    start = command(
        "start",
        cmd_start,
        "start a run and drive it here until it pauses or finishes (with --wait the exit "
        "status says how: 0 succeeded, 1 failed, 3 paused, 4 cancelled)",
    )
    start.add_argument("pipeline", metavar="PIPELINE", help="the pipeline's name")
    start.add_argument("--app", required=True, metavar="MODULE:ATTR", help=app_help)
    start.add_argument(
        "--input",
        metavar="JSON",
        help="the run input, a JSON object of the pipeline's input fields (`@FILE` reads it "
        "from a file, `-` from stdin; default {})",
    )
    start.add_argument(
        "--wait",
        action="store_true",
        help="exit with the run's outcome (without it: 0 once started; --json then prints "
        "the run as created)",
    )
    start.add_argument("--run-id", metavar="ID", help="the new run's id (default: a UUIDv7)")
    start.add_argument(
        "--idempotency-key",
        metavar="KEY",
        help="start at most one run per key: a key used before gives that run back",
    )
    start.add_argument("--timeout", type=_seconds, metavar="SECONDS", help=timeout_help)
    start.add_argument("--json", action="store_true", help="print JSON instead of text")

    retry = command(
        "retry",
        cmd_retry,
        "continue a failed or cancelled run at the stage where it stopped (same run id)",
    )
    retry.add_argument("run_id", metavar="RUN_ID")
    retry.add_argument("--app", required=True, metavar="MODULE:ATTR", help=app_help)
    retry.add_argument("--timeout", type=_seconds, metavar="SECONDS", help=timeout_help)
    retry.add_argument("--json", action="store_true", help="print JSON instead of text")

    replay = command(
        "replay",
        cmd_replay,
        "run a finished run again as a new run, reusing the outputs of the stages before "
        "--from (default: the stage that failed)",
    )
    replay.add_argument("run_id", metavar="RUN_ID")
    replay.add_argument("--app", required=True, metavar="MODULE:ATTR", help=app_help)
    replay.add_argument(
        "--from",
        dest="from_stage",
        type=_stage_arg,
        metavar="STAGE",
        help="the first stage to execute again (a name or an index); required for a run "
        "that succeeded",
    )
    replay.add_argument(
        "--input",
        metavar="JSON",
        help="a new run input (then nothing is reused unless --from says so)",
    )
    replay.add_argument("--timeout", type=_seconds, metavar="SECONDS", help=timeout_help)
    replay.add_argument("--json", action="store_true", help="print JSON instead of text")

    cancel = command(
        "cancel", cmd_cancel, "cancel a run that has not finished, and its unfinished child runs"
    )
    cancel.add_argument("run_id", metavar="RUN_ID")
    cancel.add_argument("--json", action="store_true", help="print JSON instead of text")

    prune = command(
        "prune",
        cmd_prune,
        "delete finished runs (whole trees) and their journals, last changed long enough ago",
    )
    prune.add_argument(
        "--older-than",
        required=True,
        type=_age,
        metavar="DURATION",
        help="e.g. 30d, 12h, 90m, 3600s, or seconds",
    )
    prune.add_argument(
        "--status",
        type=_finished_statuses,
        default=("succeeded", "cancelled"),
        metavar="STATUS,...",
        help="delete runs in these statuses (default: succeeded,cancelled; failed runs are "
        "kept unless named)",
    )
    prune.add_argument("--json", action="store_true", help="print JSON instead of text")

    migrate = command("migrate", cmd_migrate, "create the database or bring its schema up to date")
    migrate.add_argument("--json", action="store_true", help="print JSON instead of text")

    plan = command(
        "plan",
        cmd_plan,
        "check a pipeline, its input and its child pipelines without running anything, and "
        "print the ordered plan (exit 0: no problem found, 2: problems)",
    )
    plan.add_argument("pipeline", metavar="PIPELINE", help="the pipeline's name")
    plan.add_argument("--app", required=True, metavar="MODULE:ATTR", help=app_help)
    plan.add_argument(
        "--input",
        metavar="JSON",
        help="the run input to check, a JSON object (`@FILE` reads it from a file, `-` from "
        "stdin); without it only the definitions are checked",
    )
    plan.add_argument("--json", action="store_true", help="print JSON instead of text")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.ERROR,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (UsageError, InvalidInput, InvalidResumeInput) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except WaystationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`waystation runs | head`): stop quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
