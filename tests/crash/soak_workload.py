"""The crash soak: a mixed workload, its worker and answerer processes, and the harness.

`tests/crash/test_soak.py` runs a short soak (about 20 kills), `benchmarks/soak.py` a long
one (hundreds). Both call `soak()` below, which:

1. starts two *answerer* processes (`python -m tests.crash.soak_workload answerer ...`). Each
   opens an engine without any pipeline and with `recover=False` (like a web handler or the
   CLI), polls for paused runs and answers every open pause with a unique token
   (`{"approved": true, "by": "a-000017"}`). Both answer the same pauses, so they race; the
   loser gets `ws.NotPaused`. They record every attempt and its outcome in the answers file.
2. repeatedly starts a *worker* process (`... worker ...`): an engine with the pipelines,
   `recover=True`, that submits its share of new runs, takes over the runs of the dead
   worker before it, continues the runs the answerers left `pending`, and is SIGKILLed at a
   random moment (seeded: `--seed` reproduces the schedule of kills, not the machine's
   timing). After each kill the harness reaps it and reads the file: integrity, the runs
   rows against their journals, and which stages were committed and which were in flight.
   Now and then (`answerer_kill_share`) it also SIGKILLs an answerer, perhaps in the middle
   of a resume, and starts a new one (a new token prefix) in its place.
3. finally runs one worker without kills until every run finished (or is paused at a gate
   that is deliberately never answered), stops the answerers, and checks everything:

   - after every kill: `PRAGMA integrity_check`; each runs row agrees with its journal
     (`seq` = last row = row count); no stage path has two `succeeded` rows; every stage
     that started had its predecessor's result in the file (nothing acknowledged was lost);
   - at the end: every root run succeeded with the expected output, or is a held run still
     paused at its gate; every child succeeded, each launched once (the tree has exactly
     the expected children); every run has exactly one `succeeded` row per stage path and
     no `failed`/`cancelled` row; the flaky stage's attempts are journaled 1, 2, (3) in
     order; settled runs hold no lease;
   - executions (side file): a stage seen committed at a kill never starts again; each
     attempt executed at most once plus once per kill it was in flight at; every committed
     result of a stage with a body was produced by a recorded execution;
   - answers (answers file): every winning answer is in the journal exactly once (its
     `resumed` row and its gate's `succeeded` row), no losing answer is anywhere, each gate
     was resumed once, the stage after each gate ran with the winning answer, and every
     attempt has exactly one outcome (won or NotPaused), except an answerer's last attempt
     cut short by its kill, which must be in the journal once or not at all;
   - the totals that do not depend on the kills (runs, children, stages, answers, retries).

   Each failed check is one anomaly (a string); a sound engine yields none.

Stages record each execution in a side file outside the database (one `write` with
O_APPEND, then fsync) *before* they work: `<run_id> <stage_path> start <pid> <attempt>
[gate=token]`. Answers go to a second side file: `<run_id> <pause_id> try|won|lost|error
<token> [error]`.

The workload (every root run is one of five pipelines, by index):

- `soak-seq`: load -> scale -> flaky (`ws.Retry`, fails its first 1 or 2 attempts) -> summary
- `soak-approval`: prepare -> approval (`ws.gate`) -> apply -> wrap; some runs are *held*:
  the answerers leave them paused, and they must still be paused at the gate at the end
- `soak-nested`: load -> batch (the pipeline `soak-batch` as a stage: plan -> fan_out, which
  runs `soak-leaf` once per item with `ws.map_children` -> merge) -> tally
- `soak-parallel`: load -> enrich (`ws.parallel`: geo, credit (sync, in a thread), fraud) ->
  decide
- `soak-full`: all of it in one run: load -> scale -> flaky -> approval -> apply -> batch ->
  sign (the pipeline `soak-signoff`, whose own gate pauses the parent) -> checks
  (`ws.parallel` with a gate as one branch) -> final
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import signal
import sqlite3
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

import waystation as ws
from tests.processes import child_env, start_python

SIDE_FILE: str | None = None
"""Where the stages of this process record their executions (`configure`)."""

HANG_LIMIT = 120.0
"""A worker that is not killed exits by itself after this long (every wait is bounded)."""

STARTUP_TIMEOUT = 30.0
"""Bound for a subprocess to import, open its engine and report."""

LEASE_TTL = 5.0
"""Workers' lease time. A dead worker's runs are taken over at once (its pid is gone); the
lease only matters if a pid is reused, and then costs at most this long."""

POLL_INTERVAL = 0.1
"""How often a worker looks for runs left `pending` by an answerer."""


def configure(side_file: str | os.PathLike[str]) -> None:
    global SIDE_FILE
    SIDE_FILE = os.fspath(side_file)


def record(*words: Any) -> None:
    """Append one line to the side file in one write, and fsync it, before going on."""
    if SIDE_FILE is None:
        raise RuntimeError("soak_workload.configure(side_file) was not called")
    line = (" ".join(str(w) for w in words) + "\n").encode()
    fd = os.open(SIDE_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def delay(n: int, path: str) -> float:
    """How long a stage works: 10-90 ms, a stable function of the run and the stage."""
    return 0.01 + (zlib.crc32(f"{n}:{path}".encode()) % 9) * 0.01


SABOTAGE = os.environ.get("SOAK_SABOTAGE", "")
"""For the harness's own test: `double` makes `summary` record two executions, `forge` makes
`apply` claim an answer that no answerer gave. The soak must then report anomalies."""


async def work(ctx: ws.StageContext, n: int, *extra: Any) -> None:
    if SABOTAGE == "forge" and ctx.stage_path == "apply":
        extra = ("approval=forged",)
    record(ctx.run_id, ctx.stage_path, "start", os.getpid(), ctx.attempt, *extra)
    if SABOTAGE == "double" and ctx.stage_path == "summary":
        record(ctx.run_id, ctx.stage_path, "start", os.getpid(), ctx.attempt, *extra)
    await asyncio.sleep(delay(n, ctx.stage_path))


# -- pure functions: what each stage returns (the stages and `expected_output` share them) ---


def f_load(n: int) -> int:
    return n + 1


def f_scale(load: int) -> int:
    return load * 3


def failures(n: int) -> int:
    """How many attempts of `flaky` fail for the run with input `n` (1 or 2)."""
    return 1 + n % 2


def f_flaky(scale: int) -> int:
    return scale + 7


def width(n: int) -> int:
    """How many `soak-leaf` children the run with input `n` launches (2-4)."""
    return 2 + n % 3


def f_leaf(n: int, k: int) -> int:
    return (n * 31) % 1000 + 1 + k * k


def f_batch(n: int) -> int:
    return sum(f_leaf(n, k) for k in range(width(n)))


def f_geo(load: int) -> int:
    return load * 5 % 97


def f_credit(load: int) -> int:
    return load * 11 % 89


def f_fraud(load: int) -> int:
    return load % 7


def f_apply(n: int) -> int:
    return n * 10 + 1


def f_draft(n: int) -> int:
    return n * 2 + 3


# -- the stages --------------------------------------------------------------------------------


class Decision(msgspec.Struct):
    approved: bool
    by: str


FLAKY_RETRY = ws.Retry(attempts=4, backoff=0.05, multiplier=2.0, max_backoff=1.0)


@ws.stage
async def load(n: int, ctx: ws.StageContext) -> int:
    await work(ctx, n)
    return f_load(n)


@ws.stage
async def scale(load: int, n: int, ctx: ws.StageContext) -> int:
    await work(ctx, n)
    return f_scale(load)


@ws.stage(retry=FLAKY_RETRY)
async def flaky(scale: int, n: int, ctx: ws.StageContext) -> int:
    await work(ctx, n)
    if ctx.attempt <= failures(n):
        raise RuntimeError(f"transient failure on attempt {ctx.attempt}")
    return f_flaky(scale)


@ws.stage
async def summary(flaky: int, load: int, n: int, ctx: ws.StageContext) -> int:
    await work(ctx, n)
    return flaky + load


@ws.stage
async def prepare(n: int, ctx: ws.StageContext) -> int:
    await work(ctx, n)
    return n * 10


approval = ws.gate("approval", schema=Decision, reason="approve the soak run?")


@ws.stage
async def apply(n: int, approval: Decision, ctx: ws.StageContext) -> int:
    await work(ctx, n, f"approval={approval.by}")
    return f_apply(n) if approval.approved else 0


@ws.stage
async def wrap(prepare: int, apply: int, n: int, ctx: ws.StageContext) -> int:
    await work(ctx, n)
    return prepare + apply


# soak-leaf, launched by map_children


@ws.stage
async def measure(n: int, k: int, ctx: ws.StageContext) -> int:
    await work(ctx, n)
    return f_leaf(n, k) - k * k


@ws.stage
async def report(measure: int, k: int, n: int, ctx: ws.StageContext) -> int:
    await work(ctx, n)
    return measure + k * k


leaf = ws.Pipeline("soak-leaf", [measure, report], version="1")


# soak-batch, a pipeline used as a stage


@ws.stage
async def plan(n: int, ctx: ws.StageContext) -> int:
    await work(ctx, n)
    return width(n)


@ws.stage
async def fan_out(plan: int, n: int, ctx: ws.StageContext) -> list[int]:
    await work(ctx, n)
    items = [{"n": n, "k": k} for k in range(plan)]
    return await ws.map_children(ctx, leaf, items, max_concurrency=2)


@ws.stage
async def merge(fan_out: list[int], n: int, ctx: ws.StageContext) -> int:
    await work(ctx, n)
    return sum(fan_out)


batch_pipeline = ws.Pipeline("soak-batch", [plan, fan_out, merge], version="1")
batch = batch_pipeline.as_stage("batch")


@ws.stage
async def tally(batch: int, load: int, n: int, ctx: ws.StageContext) -> int:
    await work(ctx, n)
    return batch + load


# soak-signoff: a child pipeline whose gate pauses its parent


@ws.stage
async def draft(n: int, ctx: ws.StageContext) -> int:
    await work(ctx, n)
    return f_draft(n)


signoff = ws.gate("signoff", schema=Decision, reason="sign the draft off?")


@ws.stage
async def seal(draft: int, signoff: Decision, n: int, ctx: ws.StageContext) -> int:
    await work(ctx, n, f"signoff={signoff.by}")
    return draft + (1 if signoff.approved else 0)


signoff_pipeline = ws.Pipeline("soak-signoff", [draft, signoff, seal], version="1")
sign = signoff_pipeline.as_stage("sign")


# parallel branches


@ws.stage
async def geo(load: int, n: int, ctx: ws.StageContext) -> int:
    await work(ctx, n)
    return f_geo(load)


@ws.stage
def credit(load: int, n: int, ctx: ws.StageContext) -> int:
    """Sync: runs in a worker thread, so a kill may land while a thread works."""
    record(ctx.run_id, ctx.stage_path, "start", os.getpid(), ctx.attempt)
    time.sleep(delay(n, ctx.stage_path))
    return f_credit(load)


@ws.stage
async def fraud(load: int, n: int, ctx: ws.StageContext) -> int:
    await work(ctx, n)
    return f_fraud(load)


review = ws.gate("review", schema=Decision, reason="review the checks?")

enrich = ws.parallel(geo, credit, fraud, name="enrich", max_concurrency=2)
checks = ws.parallel(geo, credit, review, name="checks")


@ws.stage
async def decide(enrich: dict[str, Any], n: int, ctx: ws.StageContext) -> int:
    await work(ctx, n)
    return int(enrich["geo"]) + int(enrich["credit"]) + int(enrich["fraud"])


@ws.stage
async def final(
    flaky: int,
    apply: int,
    batch: int,
    sign: int,
    geo: int,
    credit: int,
    review: Decision,
    n: int,
    ctx: ws.StageContext,
) -> int:
    await work(ctx, n, f"review={review.by}")
    return flaky + apply + batch + sign + geo + credit + (1 if review.approved else 0)


seq_pipeline = ws.Pipeline("soak-seq", [load, scale, flaky, summary], version="1")
approval_pipeline = ws.Pipeline("soak-approval", [prepare, approval, apply, wrap], version="1")
nested_pipeline = ws.Pipeline("soak-nested", [load, batch, tally], version="1")
parallel_pipeline = ws.Pipeline("soak-parallel", [load, enrich, decide], version="1")
full_pipeline = ws.Pipeline(
    "soak-full",
    [load, scale, flaky, approval, apply, batch, sign, checks, final],
    version="1",
)

ROOT_PIPELINES = [
    seq_pipeline,
    approval_pipeline,
    nested_pipeline,
    parallel_pipeline,
    full_pipeline,
]
PIPELINES = [*ROOT_PIPELINES, batch_pipeline, leaf, signoff_pipeline]
BY_NAME = {p.name: p for p in PIPELINES}


def run_id_of(i: int) -> str:
    return f"soak-{i:05d}"


def planned(i: int) -> tuple[ws.Pipeline, dict[str, Any]]:
    """The pipeline and input of root run number `i`."""
    p = ROOT_PIPELINES[i % len(ROOT_PIPELINES)]
    hold = p is approval_pipeline and i % 25 == 6
    return p, {"n": i, "hold": hold}


def expected_output(pipeline: str, n: int) -> int:
    """What a root run returns (every answer approves)."""
    load_ = f_load(n)
    flaky_ = f_flaky(f_scale(load_))
    if pipeline == "soak-seq":
        return flaky_ + load_
    if pipeline == "soak-approval":
        return n * 10 + f_apply(n)
    if pipeline == "soak-nested":
        return f_batch(n) + load_
    if pipeline == "soak-parallel":
        return f_geo(load_) + f_credit(load_) + f_fraud(load_)
    if pipeline == "soak-full":
        sign_ = f_draft(n) + 1
        return flaky_ + f_apply(n) + f_batch(n) + sign_ + f_geo(load_) + f_credit(load_) + 1
    raise ValueError(pipeline)


def expected_totals(runs: int) -> dict[str, int]:
    """The soak's figures that do not depend on where the kills land."""
    out = collections.Counter({"runs": runs})
    for i in range(runs):
        p, given = planned(i)
        if given["hold"]:
            out["held_runs"] += 1
            out["stages"] += 1  # prepare
            continue
        out["stages"] += len(expected_paths(p.name))
        if p in (nested_pipeline, full_pipeline):
            out["child_runs"] += 1 + width(i)
            out["stages"] += len(expected_paths(batch_pipeline.name))
            out["stages"] += width(i) * len(expected_paths(leaf.name))
        if p is full_pipeline:
            out["child_runs"] += 1
            out["stages"] += len(expected_paths(signoff_pipeline.name))
        out["answers"] += {approval_pipeline: 1, full_pipeline: 3}.get(p, 0)
        out["retries"] += failures(i) if p in (seq_pipeline, full_pipeline) else 0
    return dict(out)


def expected_paths(pipeline: str) -> list[str]:
    """Every stage path of `pipeline` that has a `succeeded` row once the run succeeded."""
    p = BY_NAME[pipeline]
    paths: list[str] = []
    for s in p.stages:
        paths.append(s.name)
        if s.group is not None:
            paths.extend(f"{s.name}.{b.name}" for b in s.group.branches)
    return paths


HELD_GATE = "approval"
"""Held runs stay paused here: the answerers leave them alone."""


def is_held(i: int) -> bool:
    return bool(planned(i)[1]["hold"])


# -- the subprocesses --------------------------------------------------------------------------


def emit(**fields: Any) -> None:
    """One JSON line on stdout, flushed at once (the harness reads it live)."""
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def exists(path: str) -> bool:
    return os.path.exists(path)


def settled(db: str, total: int) -> tuple[bool, dict[str, int]]:
    """Whether all `total` root runs are done (or paused and held); counts by status."""
    conn = sqlite3.connect(db, timeout=10)
    try:
        rows = conn.execute(
            "SELECT run_id, status FROM runs WHERE parent_run_id IS NULL"
        ).fetchall()
    finally:
        conn.close()
    statuses = collections.Counter(status for _, status in rows)
    if len(rows) < total:
        return False, dict(statuses)
    held = {run_id_of(i) for i in range(total) if is_held(i)}
    for run_id, status in rows:
        if status in ("running", "pending"):
            return False, dict(statuses)
        if status == "paused" and run_id not in held:
            return False, dict(statuses)
    return True, dict(statuses)


async def worker(args: argparse.Namespace) -> int:
    """Open an engine with the pipelines (a worker: it recovers), submit runs number
    `--first` to `--last` - 1 (idempotent: run ids are fixed), say `ready`, then hang until
    killed; with `--final`, wait until every root run settled and exit."""
    configure(args.side)
    parent = os.getppid()  # should the harness die, stop instead of waiting to be killed
    async with ws.Engine.open(
        args.db,
        pipelines=PIPELINES,
        lease_ttl=LEASE_TTL,
        poll_interval=POLL_INTERVAL,
        durability=args.durability,
    ) as engine:
        recovering = len(engine.active_runs)
        for i in range(args.first, args.last):
            p, given = planned(i)
            await engine.submit(p, given, run_id=run_id_of(i))
        emit(ready=os.getpid(), recovering=recovering, submitted=args.last - args.first)
        deadline = time.monotonic() + (args.timeout if args.final else HANG_LIMIT)
        while time.monotonic() < deadline and os.getppid() == parent:
            if args.final:
                done, statuses = await asyncio.to_thread(settled, args.db, args.last)
                if done:
                    emit(settled=statuses)
                    return 0
            await asyncio.sleep(0.1)
        if args.final:
            emit(error="not settled in time", statuses=settled(args.db, args.last)[1])
        else:
            emit(error="not killed in time")
        return 3


async def answerer(args: argparse.Namespace) -> int:
    """Open an engine without pipelines and with `recover=False` (a web handler, the CLI):
    answer every open pause of every paused root run that is not held, until the stop file
    appears. Each answer carries a unique token; every attempt and outcome is recorded."""
    configure(args.side)
    count = 0
    deadline = time.monotonic() + args.limit
    parent = os.getppid()
    async with ws.Engine.open(args.db, pipelines=[], recover=False) as engine:
        emit(ready=os.getpid())
        while not exists(args.stop) and time.monotonic() < deadline and os.getppid() == parent:
            paused = [
                r for r in await engine.list(status="paused", limit=1000) if r.parent_run_id is None
            ]
            for run in paused:
                if run.input.get("hold"):
                    continue
                for pause in run.pauses:
                    count += 1
                    token = f"{args.name}-{count:06d}"
                    answer = {"approved": True, "by": token}
                    record(run.run_id, pause.pause_id, "try", token)
                    try:
                        await engine.resume(run.run_id, answer, pause_id=pause.pause_id)
                    except ws.NotPaused:
                        record(run.run_id, pause.pause_id, "lost", token, "NotPaused")
                    except ws.WaystationError as exc:
                        record(run.run_id, pause.pause_id, "error", token, type(exc).__name__)
                        print(f"{run.run_id} {pause.pause_id}: {exc!r}", file=sys.stderr)
                    else:
                        record(run.run_id, pause.pause_id, "won", token)
            # Both answerers wake on the same ticks, so they often race for one pause.
            await asyncio.sleep(args.poll - time.time() % args.poll)
    emit(stopped=count)
    return 0


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.crash.soak_workload")
    sub = parser.add_subparsers(dest="mode", required=True)
    w = sub.add_parser("worker")
    w.add_argument("db")
    w.add_argument("side")
    w.add_argument("--first", type=int, default=0)
    w.add_argument("--last", type=int, default=0)
    w.add_argument("--final", action="store_true")
    w.add_argument("--timeout", type=float, default=120.0)
    w.add_argument("--durability", choices=["full", "normal"], default="full")
    a = sub.add_parser("answerer")
    a.add_argument("db")
    a.add_argument("side")
    a.add_argument("--name", required=True)
    a.add_argument("--stop", required=True)
    a.add_argument("--poll", type=float, default=0.05)
    a.add_argument("--limit", type=float, default=3600.0)
    args = parser.parse_args(argv)
    return await (worker(args) if args.mode == "worker" else answerer(args))


# -- the harness -------------------------------------------------------------------------------

PREDECESSOR: dict[tuple[str, str], str | None] = {}
"""(pipeline, stage path) -> the stage whose committed result must exist before it starts."""
for _p in PIPELINES:
    for _i, _s in enumerate(_p.stages):
        _before = _p.stages[_i - 1].name if _i > 0 else None
        PREDECESSOR[(_p.name, _s.name)] = _before
        if _s.group is not None:
            for _b in _s.group.branches:
                PREDECESSOR[(_p.name, f"{_s.name}.{_b.name}")] = _before

GATE_PATHS = {"approval", "signoff", "checks.review"}
"""Stage paths of the gates: they have no body, so no side-file lines of their own."""
CONSUMED_GATE = {"apply": "approval", "seal": "signoff", "final": "checks.review"}
"""Stage path -> the gate (same run) whose answer token the stage records."""

CHILD_OUTPUT = {
    "soak-batch": lambda n: f_batch(n),
    "soak-signoff": lambda n: f_draft(n) + 1,
}


class Proc:
    """A soak subprocess; stdout read line by line, every wait bounded."""

    def __init__(self, proc: asyncio.subprocess.Process, stderr: Path) -> None:
        self.proc = proc
        self.stderr_path = stderr

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    async def message(self, timeout: float = STARTUP_TIMEOUT) -> dict[str, Any]:
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"process {self.pid} printed nothing in {timeout}s; stderr:\n{self.stderr()}"
            ) from None
        if not line:
            code = await asyncio.wait_for(self.proc.wait(), timeout)
            raise AssertionError(
                f"process {self.pid} exited ({code}) without output; stderr:\n{self.stderr()}"
            )
        message: dict[str, Any] = json.loads(line)
        return message

    async def sigkill(self) -> int:
        """SIGKILL and reap (so that its pid is gone); the return code."""
        if self.proc.returncode is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        return await asyncio.wait_for(self.proc.wait(), 10)

    async def exited(self, timeout: float) -> int:
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"process {self.pid} did not exit within {timeout}s; stderr:\n{self.stderr()}"
            ) from None

    async def cleanup(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await asyncio.wait_for(self.proc.wait(), 10)


async def spawn(stderr: Path, *args: str, sabotage: str = "") -> Proc:
    env = child_env()
    env.pop("SOAK_SABOTAGE", None)
    if sabotage:
        env["SOAK_SABOTAGE"] = sabotage
    with stderr.open("ab") as err:
        proc = await start_python("-m", "tests.crash.soak_workload", *args, env=env, stderr=err)
    return Proc(proc, stderr)


def query(db: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Read `db` with a fresh sqlite3 connection, as another tool would."""
    conn = sqlite3.connect(db, timeout=10)
    try:
        conn.execute("PRAGMA query_only=ON")
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


Key = tuple[str, str, int]
"""(run_id, stage_path, attempt): one attempt of one stage of one run."""


@dataclass
class Report:
    """What a soak did and found."""

    seed: int
    kills_planned: int
    runs_planned: int
    kills: int = 0
    """Workers SIGKILLed (each one's runs then recovered by the next worker)."""
    kills_before_ready: int = 0
    """Kills that landed while the worker was still starting, recovering or submitting."""
    kills_mid_stage: int = 0
    """Kills with at least one stage attempt started but not committed."""
    stages_in_flight_at_kills: int = 0
    runs: int = 0
    child_runs: int = 0
    held_runs: int = 0
    stages: int = 0
    """Committed stage results (`succeeded` rows: stages, gates, groups, branches, children's
    stages), all runs."""
    executions: int = 0
    """Stage executions recorded in the side file (every attempt, every process)."""
    reexecutions: int = 0
    """Executions of an attempt that was in flight at a kill, again after it."""
    retries: int = 0
    """`retrying` rows: attempts that failed on purpose and were retried."""
    answers: int = 0
    """Answers applied: resumes that won, each found once in the journal."""
    answers_lost: int = 0
    """Resumes that lost the race to the other answerer (`ws.NotPaused`)."""
    answerer_kills: int = 0
    """Answerer processes SIGKILLed (and replaced), perhaps in the middle of a resume."""
    answers_cut: int = 0
    """Resumes whose answerer was killed before it could record the outcome."""
    final_seconds: float = 0.0
    """How long the last worker (not killed) took to finish what was left."""
    seconds: float = 0.0
    anomalies: list[str] = field(default_factory=list)

    def figures(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "kills_survived": self.kills,
            "kills_before_ready": self.kills_before_ready,
            "kills_mid_stage": self.kills_mid_stage,
            "stages_in_flight_at_kills": self.stages_in_flight_at_kills,
            "runs": self.runs,
            "child_runs": self.child_runs,
            "held_runs": self.held_runs,
            "stages": self.stages,
            "executions": self.executions,
            "reexecutions": self.reexecutions,
            "retries": self.retries,
            "answers": self.answers,
            "answers_lost": self.answers_lost,
            "answerer_kills": self.answerer_kills,
            "answers_cut": self.answers_cut,
            "anomalies": len(self.anomalies),
            "final_seconds": round(self.final_seconds, 1),
            "seconds": round(self.seconds, 1),
        }


class Soak:
    """The harness: kills workers, reads the file after each kill, checks everything at the end."""

    def __init__(
        self,
        workdir: Path,
        *,
        kills: int,
        seed: int,
        runs: int,
        sabotage: str = "",
        durability: str = "full",
    ) -> None:
        self.sabotage = sabotage
        self.durability = durability
        self.answerers: dict[str, Proc] = {}
        self.generation: collections.Counter[str] = collections.Counter()
        self.answerer_names: dict[int, str] = {}
        self.killed_answerers: set[str] = set()
        """Names of the answerers SIGKILLed: their last attempt may have no outcome."""
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.db = workdir / "soak.db"
        self.side = workdir / "stages.log"
        self.answers = workdir / "answers.log"
        self.stop = workdir / "stop"
        self.worker_err = workdir / "workers.stderr"
        self.rng = random.Random(seed)
        self.report = Report(seed=seed, kills_planned=kills, runs_planned=runs)
        self.kills = kills
        self.runs = runs
        self.side_offset = 0
        self.lines = 0
        self.starts: dict[Key, list[int]] = collections.defaultdict(list)
        """Side-file line numbers of each attempt's executions."""
        self.open_attempts: set[Key] = set()
        """Attempts started and not (yet seen) concluded."""
        self.inflight: collections.Counter[Key] = collections.Counter()
        """How many kills each attempt was in flight at."""
        self.committed: set[tuple[str, str]] = set()
        """(run_id, stage_path) seen committed at a kill: they must never start again."""
        self.consumed: list[tuple[str, str, str]] = []
        """(run_id, stage_path, token) of every execution of a stage that used a gate's answer."""
        self.worker_pids: set[int] = set()
        self.pipeline_of: dict[str, str] = {}
        self.reported: set[str] = set()

    def anomaly(self, text: str) -> None:
        if text not in self.reported:
            self.reported.add(text)
            self.report.anomalies.append(text)

    # -- after each kill -------------------------------------------------------------------

    def read_side(self) -> None:
        """Parse the side file's new lines: executions, and re-executions of stages seen
        committed at an earlier kill."""
        with open(self.side, "ab+") as f:
            f.seek(self.side_offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            self.anomaly(f"torn side-file line after line {self.lines}: {data[end:]!r}")
        self.side_offset += end
        for raw in data[:end].decode().splitlines():
            self.lines += 1
            words = raw.split()
            if len(words) < 5 or words[2] != "start" or not words[4].isdigit():
                self.anomaly(f"malformed side-file line {self.lines}: {raw!r}")
                continue
            run_id, path, _, pid, attempt = words[:5]
            key = (run_id, path, int(attempt))
            self.report.executions += 1
            if int(pid) not in self.worker_pids:
                self.anomaly(f"{run_id} {path} executed by pid {pid}, not a worker")
            if (run_id, path) in self.committed:
                self.anomaly(f"{run_id} {path}: committed before a kill, executed again after")
            self.starts[key].append(self.lines)
            self.open_attempts.add(key)
            for extra in words[5:]:
                _, _, token = extra.partition("=")
                self.consumed.append((run_id, path, token))

    def after_kill(self, early: bool) -> None:
        report = self.report
        report.kills += 1
        report.kills_before_ready += early
        if (ok := query(self.db, "PRAGMA integrity_check")) != [("ok",)]:
            self.anomaly(f"integrity_check after kill {report.kills}: {ok[:5]}")
        self.check_rows(f"after kill {report.kills}")
        done = query(
            self.db,
            "SELECT run_id, stage_path, attempt, event FROM journal "
            "WHERE event IN ('succeeded', 'retrying', 'failed')",
        )
        concluded = {(r, p, a) for r, p, a, _ in done}
        committed = {(r, p) for r, p, _, e in done if e == "succeeded"}
        before = self.lines
        self.read_side()
        # Every stage that started had its predecessor's result acknowledged: it is durable.
        for run_id, pipeline in query(self.db, "SELECT run_id, pipeline FROM runs"):
            self.pipeline_of[run_id] = pipeline
        for run_id, path, _ in [k for k in self.starts if self.starts[k][-1] > before]:
            pipeline = self.pipeline_of.get(run_id)
            if pipeline is None:
                self.anomaly(f"{run_id} {path} executed, but the run is not in the database")
                continue
            pred = PREDECESSOR.get((pipeline, path), "?")
            if pred == "?":
                self.anomaly(f"{run_id} {path}: not a stage of {pipeline}")
            elif pred is not None and (run_id, pred) not in committed:
                self.anomaly(
                    f"{run_id} {path} started before the kill, but the result of {pred} "
                    "is not in the database after it (an acknowledged commit was lost)"
                )
        self.open_attempts -= concluded
        for key in self.open_attempts:
            self.inflight[key] += 1
        report.stages_in_flight_at_kills += len(self.open_attempts)
        report.kills_mid_stage += bool(self.open_attempts)
        self.committed |= committed

    def check_rows(self, when: str) -> None:
        """The runs rows agree with their journals; no stage committed twice."""
        bad = query(
            self.db,
            "SELECT r.run_id, r.seq, t.top, t.n FROM runs r LEFT JOIN "
            "(SELECT run_id, max(seq) AS top, count(*) AS n FROM journal GROUP BY run_id) t "
            "ON t.run_id = r.run_id WHERE t.top IS NULL OR r.seq != t.top OR t.top != t.n",
        )
        for run_id, seq, top, n in bad:
            self.anomaly(f"{when}: {run_id} runs.seq {seq}, journal max {top} of {n} rows")
        twice = query(
            self.db,
            "SELECT run_id, stage_path, count(*) FROM journal WHERE event = 'succeeded' "
            "GROUP BY run_id, stage_path HAVING count(*) > 1",
        )
        for run_id, path, n in twice:
            self.anomaly(f"{run_id} {path}: {n} `succeeded` rows")
        orphans = query(
            self.db,
            "SELECT DISTINCT run_id FROM journal WHERE run_id NOT IN (SELECT run_id FROM runs)",
        )
        for (run_id,) in orphans:
            self.anomaly(f"{when}: journal rows for {run_id}, which has no runs row")

    # -- the loop ----------------------------------------------------------------------------

    def submitted(self) -> int:
        """Root runs in the file; they are always a prefix of the planned ones."""
        ids = sorted(
            r for (r,) in query(self.db, "SELECT run_id FROM runs") if r.startswith("soak-")
        )
        if ids != [run_id_of(i) for i in range(len(ids))]:
            self.anomaly(f"root runs are not a prefix of the plan: {ids[:3]}...")
        return len(ids)

    def target(self, cycle: int) -> int:
        """Root runs submitted by the end of kill cycle `cycle`: spread over the first 85%."""
        spread = max(1, int(self.kills * 0.85))
        return min(self.runs, -(-self.runs * (cycle + 1) // spread))

    def worker_args(self, first: int, last: int) -> list[str]:
        args = ["worker", str(self.db), str(self.side), "--first", str(first)]
        return [*args, "--last", str(last), "--durability", self.durability]

    async def start_answerer(self, letter: str) -> None:
        """Start (or restart) answerer `letter`; each generation has its own token prefix."""
        self.generation[letter] += 1
        name = f"{letter}{self.generation[letter]}"
        p = await spawn(
            self.workdir / f"answerer-{name}.stderr",
            "answerer",
            str(self.db),
            str(self.answers),
            "--name",
            name,
            "--stop",
            str(self.stop),
        )
        self.answerers[letter] = p
        self.answerer_names[p.pid] = name
        message = await p.message()
        assert "ready" in message, (message, p.stderr())

    async def kill_answerer(self, letter: str, after: float) -> None:
        """SIGKILL answerer `letter` `after` seconds from now, wherever it is (perhaps in the
        middle of a resume), and start a new one in its place."""
        await asyncio.sleep(after)
        p = self.answerers[letter]
        if (code := await p.sigkill()) != -signal.SIGKILL:
            self.anomaly(f"answerer {p.pid} ended with {code} before the kill:\n{p.stderr()}")
        self.killed_answerers.add(self.answerer_names[p.pid])
        self.report.answerer_kills += 1
        await self.start_answerer(letter)

    async def cycle(
        self, n: int, max_after: float, early_share: float, answerer_kill_share: float
    ) -> None:
        first = self.submitted() if self.db.exists() else 0
        last = max(first, self.target(n))
        early = self.rng.random() < early_share
        wait = self.rng.uniform(0.0, 0.4) if early else self.rng.uniform(0.0, max_after)
        victim = None
        if self.answerers and self.rng.random() < answerer_kill_share:
            victim = self.rng.choice(sorted(self.answerers)), self.rng.uniform(0.0, wait)
        w = await spawn(self.worker_err, *self.worker_args(first, last), sabotage=self.sabotage)
        self.worker_pids.add(w.pid)
        ready = False
        other: asyncio.Task[None] | None = None
        try:
            if early:
                # Kill at `wait` after the spawn, wherever the worker is: importing, opening
                # the file, recovering, submitting or already working.
                deadline = time.monotonic() + wait
                if victim is not None:
                    other = asyncio.create_task(self.kill_answerer(*victim))
                assert w.proc.stdout is not None
                try:
                    ready = b"ready" in await asyncio.wait_for(w.proc.stdout.readline(), wait)
                except TimeoutError:
                    pass
                await asyncio.sleep(max(0.0, deadline - time.monotonic()))
            else:
                message = await w.message()
                if "ready" not in message:
                    raise AssertionError(f"worker {w.pid} said {message}:\n{w.stderr()}")
                if victim is not None:
                    other = asyncio.create_task(self.kill_answerer(*victim))
                await asyncio.sleep(wait)
            code = await w.sigkill()
            if other is not None:
                await asyncio.wait_for(other, STARTUP_TIMEOUT)
        finally:
            await w.cleanup()
            if other is not None and not other.done():
                other.cancel()
        if code != -signal.SIGKILL:
            self.anomaly(f"worker {w.pid} ended with {code} before the kill:\n{w.stderr()}")
        self.after_kill(early and not ready)

    async def final(self, timeout: float) -> None:
        first = self.submitted()
        w = await spawn(
            self.worker_err,
            *self.worker_args(first, self.runs),
            "--final",
            "--timeout",
            str(timeout),
            sabotage=self.sabotage,
        )
        self.worker_pids.add(w.pid)
        began = time.monotonic()
        try:
            ready = await w.message()
            assert "ready" in ready, ready
            result = await w.message(timeout + STARTUP_TIMEOUT)
            code = await w.exited(STARTUP_TIMEOUT)
        finally:
            await w.cleanup()
        self.report.final_seconds = time.monotonic() - began
        if code != 0 or "settled" not in result:
            self.anomaly(f"the final worker did not settle every run: {result}")

    async def run(
        self,
        *,
        max_after: float = 1.0,
        early_share: float = 0.2,
        answerer_kill_share: float = 0.1,
        final_timeout: float = 120.0,
        answerers: int = 2,
        progress: Any = None,
    ) -> Report:
        started = time.monotonic()
        self.side.touch()
        self.answers.touch()
        try:
            # The answerers need the file to exist: the first worker creates it.
            await self.cycle(0, max_after, 0.0, 0.0)
            for k in range(answerers):
                await self.start_answerer("abcdefgh"[k])
            for n in range(1, self.kills):
                await self.cycle(n, max_after, early_share, answerer_kill_share)
                if progress is not None:
                    progress(self.report)
            await self.final(final_timeout)
            self.stop.touch()
            for p in self.answerers.values():
                await p.message(STARTUP_TIMEOUT)
                if (code := await p.exited(STARTUP_TIMEOUT)) != 0:
                    self.anomaly(f"answerer {p.pid} exited with {code}:\n{p.stderr()}")
            for path in self.workdir.glob("answerer-*.stderr"):
                if text := path.read_text(errors="replace").strip():
                    self.anomaly(f"{path.name}:\n{text[-3000:]}")
        finally:
            for p in self.answerers.values():
                await p.cleanup()
        self.read_side()
        self.check_end()
        if "Traceback" in (text := self.worker_err.read_text(errors="replace")):
            self.anomaly(f"a worker printed a traceback:\n{text[-3000:]}")
        self.report.seconds = time.monotonic() - started
        return self.report

    # -- at the end ------------------------------------------------------------------------

    def check_end(self) -> None:
        report = self.report
        if (ok := query(self.db, "PRAGMA integrity_check")) != [("ok",)]:
            self.anomaly(f"integrity_check at the end: {ok[:5]}")
        self.check_rows("at the end")
        runs = {
            row[0]: row
            for row in query(
                self.db,
                "SELECT run_id, pipeline, status, "
                "(SELECT input FROM run_inputs i WHERE i.run_id = runs.run_id), output, error, "
                "pause, parent_run_id, root_run_id, lease_owner FROM runs",
            )
        }
        journal: dict[str, list[tuple[Any, ...]]] = collections.defaultdict(list)
        for row in query(
            self.db,
            "SELECT run_id, seq, stage_index, stage_path, event, attempt, payload "
            "FROM journal ORDER BY run_id, seq",
        ):
            journal[row[0]].append(row)
        children: dict[str, list[str]] = collections.defaultdict(list)
        for run_id, row in runs.items():
            if row[7] is not None:
                children[row[7]].append(run_id)

        roots = sorted(r for r, row in runs.items() if row[7] is None)
        report.runs = len(roots)
        report.child_runs = len(runs) - len(roots)
        if roots != [run_id_of(i) for i in range(self.runs)]:
            self.anomaly(f"root runs {len(roots)}, planned {self.runs}")
        for run_id, row in runs.items():
            self.check_run(run_id, row, journal[run_id], runs, children)
        report.stages = sum(e == "succeeded" for rows in journal.values() for *_, e, _, _ in rows)
        report.retries = sum(e == "retrying" for rows in journal.values() for *_, e, _, _ in rows)
        self.check_executions(journal)
        self.check_answers(journal)
        figures = self.report.figures()
        for name, want in expected_totals(self.runs).items():
            if figures[name] != want:
                self.anomaly(f"{name}: {figures[name]}, expected {want}")

    def check_run(
        self,
        run_id: str,
        row: tuple[Any, ...],
        rows: list[tuple[Any, ...]],
        runs: dict[str, tuple[Any, ...]],
        children: dict[str, list[str]],
    ) -> None:
        _, pipeline, status, input_, output, error, pause, parent, root, owner = row
        given = json.loads(input_)
        n = given["n"]
        events = [r[4] for r in rows]
        done = collections.Counter(r[3] for r in rows if r[4] == "succeeded")
        for bad in ("failed", "cancelled", "compensating", "recovery_failed"):
            if bad in events:
                self.anomaly(f"{run_id} ({pipeline}) has a `{bad}` row; error: {error}")
        if status not in ("running", "pending") and owner is not None:
            self.anomaly(f"{run_id} is {status} but still leased by {owner}")
        held = parent is None and bool(given.get("hold"))
        if parent is None:
            i = int(run_id.removeprefix("soak-"))
            if planned(i)[0].name != pipeline or root != run_id:
                self.anomaly(f"{run_id}: pipeline {pipeline}, root {root}; planned {planned(i)}")
        if held:
            self.report.held_runs += 1
            kinds = [p["kind"] for p in json.loads(pause or "[]")]
            if status != "paused" or kinds != [HELD_GATE]:
                self.anomaly(f"held run {run_id} is {status} (pauses {kinds}), not at its gate")
            if set(done) != {"prepare"} or "resumed" in events:
                self.anomaly(f"held run {run_id} went past its gate: {events}")
            return
        if status != "succeeded":
            self.anomaly(f"{run_id} ({pipeline}) ended {status}: {error or pause}")
            return
        if events[-1] != "completed" or events.count("completed") != 1:
            self.anomaly(f"{run_id} succeeded, journal ends {events[-3:]}")
        if set(done) != set(expected_paths(pipeline)):
            self.anomaly(
                f"{run_id} ({pipeline}) results for {sorted(done)}, "
                f"expected {expected_paths(pipeline)}"
            )
        got = json.loads(output)
        if parent is None:
            want = expected_output(pipeline, n)
        elif pipeline == "soak-leaf":
            want = f_leaf(n, given["k"])
        else:
            want = CHILD_OUTPUT[pipeline](n)
        if got != want:
            self.anomaly(f"{run_id} ({pipeline}, n={n}) returned {got!r}, expected {want!r}")
        if "flaky" in done:
            tries = [r[5] for r in rows if r[3] == "flaky" and r[4] in ("retrying", "succeeded")]
            if tries != list(range(1, failures(n) + 2)):
                self.anomaly(f"{run_id}: flaky attempts journaled {tries}")
        # The tree: the children each stage should have launched, once each.
        kids = collections.Counter(runs[c][1] for c in children.get(run_id, []))
        want_kids: collections.Counter[str] = collections.Counter()
        if pipeline in ("soak-nested", "soak-full"):
            want_kids["soak-batch"] = 1
        if pipeline == "soak-full":
            want_kids["soak-signoff"] = 1
        if pipeline == "soak-batch":
            want_kids["soak-leaf"] = width(n)
            ks = sorted(json.loads(runs[c][3])["k"] for c in children.get(run_id, []))
            if ks != list(range(width(n))):
                self.anomaly(f"{run_id}: leaf children for items {ks}, expected {width(n)}")
        if kids != want_kids:
            self.anomaly(f"{run_id} ({pipeline}) has children {dict(kids)}, expected {want_kids}")
        for c in children.get(run_id, []):
            if runs[c][8] != root:
                self.anomaly(f"child {c} of {run_id} has root {runs[c][8]}, not {root}")

    def check_executions(self, journal: dict[str, list[tuple[Any, ...]]]) -> None:
        """Only an attempt in flight at a kill runs again, once per such kill; every
        committed result of a stage with a body was produced by a recorded execution."""
        for key, seen in self.starts.items():
            allowed = 1 + self.inflight[key]
            if len(seen) > allowed:
                self.anomaly(
                    f"{key[0]} {key[1]} attempt {key[2]} executed {len(seen)} times, in "
                    f"flight at {self.inflight[key]} kill(s)"
                )
            self.report.reexecutions += len(seen) - 1
        bodiless = GATE_PATHS | {"enrich", "checks", "batch", "sign"}
        for run_id, rows in journal.items():
            for r in rows:
                if (
                    r[4] == "succeeded"
                    and r[3] not in bodiless
                    and (run_id, r[3], r[5]) not in (self.starts)
                ):
                    self.anomaly(f"{run_id} {r[3]} attempt {r[5]} committed, never executed")

    def check_answers(self, journal: dict[str, list[tuple[Any, ...]]]) -> None:
        """Every answer that won is in the journal once (its `resumed` row and the gate's
        `succeeded` row); no losing answer is anywhere; the stage after each gate saw the
        winning answer; every gate of a finished run was answered exactly once."""
        outcomes: dict[str, list[str]] = collections.defaultdict(list)
        tried: dict[str, tuple[str, str]] = {}
        for raw in self.answers.read_text().splitlines():
            words = raw.split()
            if len(words) < 4:
                self.anomaly(f"malformed answers line: {raw!r}")
                continue
            run_id, pause_id, what, token = words[:4]
            if what == "try":
                tried[token] = (run_id, pause_id)
            else:
                outcomes[token].append(what if what != "error" else f"error {words[4:]}")
        won = {t for t, o in outcomes.items() if o == ["won"]}
        cut = {t for t in tried if not outcomes[t] and t.partition("-")[0] in self.killed_answerers}
        self.report.answers_cut = len(cut)
        for token in tried.keys() - cut:
            if len(outcomes[token]) != 1:
                self.anomaly(f"answer {token} {tried[token]}: outcomes {outcomes[token]}")
            elif outcomes[token][0] not in ("won", "lost"):
                self.anomaly(f"answer {token} {tried[token]}: {outcomes[token][0]}")
        self.report.answers_lost = sum(o == ["lost"] for o in outcomes.values())
        found: dict[str, list[tuple[str, str, str]]] = collections.defaultdict(list)
        gate_token: dict[tuple[str, str], str] = {}
        resumed: collections.Counter[tuple[str, str]] = collections.Counter()
        for run_id, rows in journal.items():
            for _, _, _, path, event, _, payload in rows:
                if path not in GATE_PATHS or event not in ("resumed", "succeeded"):
                    continue
                if event == "resumed":
                    resumed[(run_id, path)] += 1
                if payload is None:
                    continue
                token = json.loads(payload)["by"]
                found[token].append((run_id, path, event))
                if event == "succeeded":
                    gate_token[(run_id, path)] = token
        # An answer cut short by a kill was applied or not: once, or not at all.
        won |= {t for t in cut if t in found}
        self.report.answers = len(won)
        for token in won:
            events = sorted(e for _, _, e in found.get(token, []))
            places = {(r, p) for r, p, _ in found.get(token, [])}
            if events != ["resumed", "succeeded"] or len(places) != 1:
                self.anomaly(
                    f"winning answer {token} {tried[token]} in the journal: {found[token]}"
                )
        for token, where in found.items():
            if token not in won:
                self.anomaly(f"answer {token} is in the journal {where} but did not win")
        for (run_id, path), n in resumed.items():
            if n != 1:
                self.anomaly(f"{run_id} gate {path} resumed {n} times")
        for run_id, path in gate_token:
            if resumed[(run_id, path)] != 1:
                self.anomaly(
                    f"{run_id} gate {path} has a result but {resumed[(run_id, path)]} resumes"
                )
        for run_id, path, token in self.consumed:
            want = gate_token.get((run_id, CONSUMED_GATE[path]))
            if token != want:
                self.anomaly(f"{run_id} {path} ran with answer {token}, the gate's is {want}")


async def soak(
    workdir: Path,
    *,
    kills: int,
    seed: int,
    runs: int,
    max_after: float = 1.0,
    early_share: float = 0.2,
    final_timeout: float = 120.0,
    answerer_kill_share: float = 0.1,
    answerers: int = 2,
    durability: str = "full",
    progress: Any = None,
) -> Report:
    """Run the soak in `workdir` (empty); returns the figures and the anomalies found."""
    harness = Soak(workdir, kills=kills, seed=seed, runs=runs, durability=durability)
    return await harness.run(
        max_after=max_after,
        early_share=early_share,
        answerer_kill_share=answerer_kill_share,
        final_timeout=final_timeout,
        answerers=answerers,
        progress=progress,
    )


if __name__ == "__main__":
    # Run the copy imported under its real name, not this `__main__` one: the pipeline
    # fingerprints name the module of each annotation type (`Decision`).
    from tests.crash import soak_workload as _soak

    sys.exit(asyncio.run(_soak.main(sys.argv[1:])))
