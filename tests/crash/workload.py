"""Pipelines and a command line for the real-crash tests.

The tests run this module in a subprocess (`python -m tests.crash.workload MODE ...`), kill it
with SIGKILL or let it exit, and then continue the same runs in another process that imports
the same pipelines from here. Every stage appends a line to a *side file* (opened, appended,
flushed and fsynced) before doing its work, so the tests can count how often each stage really
executed, across all processes, independently of what the engine journaled.

Side file lines are `<run_id> <stage> <what> [details...]`; the `steps` stages add the pid of
the process that executed them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

import msgspec

import waystation as ws

SIDE_FILE: str | None = None
"""Where stages record their executions; set with `configure` in every process."""

HANG_LIMIT = 90.0
"""A subprocess told to stay alive exits by itself after this long, should a test not kill it."""


def configure(side_file: str | os.PathLike[str]) -> None:
    """Point the stages of this process at `side_file`."""
    global SIDE_FILE
    SIDE_FILE = os.fspath(side_file)


def record(*words: Any) -> None:
    """Append one line to the side file and make it durable before the stage goes on."""
    if SIDE_FILE is None:
        raise RuntimeError("workload.configure(side_file) was not called")
    line = " ".join(str(w) for w in words) + "\n"
    with open(SIDE_FILE, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


# -- steps: five stages, each records its start, sleeps a little, returns a derived value ----

STEP_NAMES = ("load", "scale", "combine", "square", "summary")


def step_delay(n: int, index: int) -> float:
    """How long stage `index` of the run with input `n` works: 0.05-0.20 s, varied."""
    return 0.05 + ((n * 7 + index * 3) % 6) * 0.03


async def _work(ctx: ws.StageContext, n: int) -> None:
    record(ctx.run_id, ctx.stage_name, "start", os.getpid())
    await asyncio.sleep(step_delay(n, ctx.stage_index))


@ws.stage
async def load(n: int, ctx: ws.StageContext) -> int:
    await _work(ctx, n)
    return n + 1


@ws.stage
async def scale(load: int, n: int, ctx: ws.StageContext) -> int:
    await _work(ctx, n)
    return load * 3


@ws.stage
async def combine(scale: int, n: int, ctx: ws.StageContext) -> int:
    await _work(ctx, n)
    return scale + n * n


@ws.stage
async def square(combine: int, n: int, ctx: ws.StageContext) -> int:
    await _work(ctx, n)
    return (combine * combine) % 10007


@ws.stage
async def summary(square: int, load: int, n: int, ctx: ws.StageContext) -> str:
    await _work(ctx, n)
    return f"n={n} square={square} load={load}"


steps = ws.Pipeline("crash-steps", [load, scale, combine, square, summary], version="1")


def expected_steps(n: int) -> dict[str, Any]:
    """What each stage of `steps` returns for input `n`."""
    out: dict[str, Any] = {"load": n + 1}
    out["scale"] = out["load"] * 3
    out["combine"] = out["scale"] + n * n
    out["square"] = (out["combine"] * out["combine"]) % 10007
    out["summary"] = f"n={n} square={out['square']} load={out['load']}"
    return out


# -- approval: a gate between two recording stages -------------------------------------------


class Decision(msgspec.Struct):
    approved: bool
    by: str


@ws.stage
async def prepare(n: int, ctx: ws.StageContext) -> int:
    record(ctx.run_id, "prepare", "start")
    return n * 10


approval = ws.gate("approval", schema=Decision, reason="approve the prepared amount?")


@ws.stage
async def finish(prepare: int, approval: Decision, ctx: ws.StageContext) -> str:
    record(ctx.run_id, "finish", "start", approval.by)
    verdict = "approved" if approval.approved else "rejected"
    return f"{prepare} {verdict} by {approval.by}"


approvals = ws.Pipeline("crash-approval", [prepare, approval, finish], version="1")


# -- flaky: a stage that fails twice, with a long backoff to be killed in --------------------

FLAKY_BACKOFF = 1.5
FLAKY_MULTIPLIER = 2.0
FLAKY_ATTEMPTS = 4
FLAKY_SUCCEEDS_AT = 3


@ws.stage(
    retry=ws.Retry(
        attempts=FLAKY_ATTEMPTS,
        backoff=FLAKY_BACKOFF,
        multiplier=FLAKY_MULTIPLIER,
        max_backoff=30.0,
    )
)
async def flaky(n: int, ctx: ws.StageContext) -> int:
    record(ctx.run_id, "flaky", "attempt", ctx.attempt)
    if ctx.attempt < FLAKY_SUCCEEDS_AT:
        raise RuntimeError(f"transient failure on attempt {ctx.attempt}")
    return n + 100


@ws.stage
async def settle(flaky: int, ctx: ws.StageContext) -> int:
    record(ctx.run_id, "settle", "start")
    return flaky * 2


flakies = ws.Pipeline("crash-flaky", [flaky, settle], version="1")


# -- interview: one stage that pauses twice with ctx.pause -----------------------------------


class Answer(msgspec.Struct):
    text: str


@ws.stage
async def interview(n: int, ctx: ws.StageContext, linger: float = 0.0) -> str:
    record(ctx.run_id, "interview", "enter")
    first = await ctx.pause("first", schema=Answer, reason="first question")
    record(ctx.run_id, "interview", "after-first", first.text)
    await asyncio.sleep(linger)  # a window to be killed in between the two pauses
    second = await ctx.pause("second", schema=Answer, reason="second question")
    record(ctx.run_id, "interview", "effect", first.text, second.text)
    return f"{n}:{first.text}/{second.text}"


@ws.stage
async def wrapup(interview: str, ctx: ws.StageContext) -> str:
    record(ctx.run_id, "wrapup", "start")
    return interview.upper()


interviews = ws.Pipeline("crash-interview", [interview, wrapup], version="1")

# -- fleet: a parent stage that fans out to child runs ----------------------------------------

FLEET_CHILDREN = 20
FLEET_CONCURRENCY = 5


@ws.stage
async def measure(k: int, ctx: ws.StageContext) -> int:
    record(ctx.run_id, "measure", "start", k)
    await asyncio.sleep(0.1 + (k % 3) * 0.05)
    return k * k


@ws.stage
async def report(measure: int, k: int, ctx: ws.StageContext) -> int:
    record(ctx.run_id, "report", "start", k)
    await asyncio.sleep(0.1)
    return measure + 1


probe = ws.Pipeline("crash-probe", [measure, report], version="1")


@ws.stage
async def fan_out(count: int, ctx: ws.StageContext) -> list[int]:
    record(ctx.run_id, "fan_out", "enter")
    return await ws.map_children(
        ctx, probe, [{"k": k} for k in range(count)], max_concurrency=FLEET_CONCURRENCY
    )


@ws.stage
async def tally(fan_out: list[int], ctx: ws.StageContext) -> int:
    record(ctx.run_id, "tally", "start")
    return sum(fan_out)


fleet = ws.Pipeline("crash-fleet", [fan_out, tally], version="1")


def expected_fleet(count: int) -> list[int]:
    """What `fan_out` returns: each child's `report`."""
    return [k * k + 1 for k in range(count)]


PIPELINES = [steps, approvals, flakies, interviews, fleet, probe]
BY_NAME = {p.name: p for p in PIPELINES}


# -- command line ----------------------------------------------------------------------------


def emit(**fields: Any) -> None:
    """One JSON line on stdout, flushed at once (the test may be reading it live)."""
    sys.stdout.write(msgspec.json.encode(fields).decode() + "\n")
    sys.stdout.flush()


def describe(run: ws.Run) -> dict[str, Any]:
    return {
        "run_id": run.run_id,
        "status": run.status,
        "pause": run.pause.pause_id if run.pause else None,
        "output": msgspec.to_builtins(run.output),
    }


async def hang() -> None:
    """Stay alive (engine open, runs being driven) until killed; bounded all the same."""
    await asyncio.sleep(HANG_LIMIT)
    emit(error="not killed in time")
    sys.exit(3)


async def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.crash.workload")
    parser.add_argument("mode", choices=["submit-many", "recover", "start", "resume"])
    parser.add_argument("db")
    parser.add_argument("side")
    parser.add_argument("--pipeline", default=steps.name, choices=sorted(BY_NAME))
    parser.add_argument("--count", type=int, default=20, help="submit-many: how many runs")
    parser.add_argument("--concurrency", type=int, default=1000, help="max_concurrent_runs")
    parser.add_argument("--n", type=int, default=7, help="start: the run input")
    parser.add_argument("--run-id", help="start: the run id; resume: the run to resume")
    parser.add_argument("--value", help="resume: the answer, as JSON")
    parser.add_argument("--linger", type=float, help="start: the interview's linger input")
    parser.add_argument(
        "--no-wait", action="store_true", help="start, resume: do not wait for the run"
    )
    parser.add_argument("--go-file", help="resume: wait until this file exists, then resume")
    parser.add_argument("--hang", action="store_true", help="then stay alive until killed")
    parser.add_argument("--lease-ttl", type=float, default=30.0, help="the engine's lease_ttl")
    parser.add_argument("--durability", choices=["full", "normal"], default="full")
    parser.add_argument(
        "--bare", action="store_true", help="open the engine without any pipeline (like a CLI)"
    )
    args = parser.parse_args(argv)
    configure(args.side)

    async with ws.Engine.open(
        args.db,
        pipelines=[] if args.bare else PIPELINES,
        max_concurrent_runs=args.concurrency,
        lease_ttl=args.lease_ttl,
        durability=args.durability,
    ) as engine:
        if args.mode == "submit-many":
            ids = []
            for k in range(args.count):
                run = await engine.submit(steps, {"n": k}, run_id=f"run-{k:03d}")
                ids.append(run.run_id)
            emit(submitted=ids)
        elif args.mode == "recover":
            emit(recovering=list(engine.active_runs))
        elif args.mode == "start":
            pipeline = BY_NAME[args.pipeline]
            given: dict[str, Any] = {"count": args.n} if pipeline is fleet else {"n": args.n}
            if args.linger is not None:
                given["linger"] = args.linger
            run = await engine.submit(pipeline, given, run_id=args.run_id)
            if not args.no_wait:
                run = await engine.wait(run.run_id, timeout=30)
            emit(**describe(run))
        elif args.mode == "resume":
            assert args.run_id is not None and args.value is not None
            value = msgspec.json.decode(args.value)
            if args.go_file is not None:
                emit(ready=args.run_id)
                await wait_for_file(args.go_file)
            try:
                run = await engine.resume(args.run_id, value, wait=not args.no_wait, timeout=30)
            except ws.WaystationError as exc:
                emit(run_id=args.run_id, error=type(exc).__name__, message=str(exc))
            else:
                emit(**describe(run))
        if args.hang:
            await hang()


def exists(path: str) -> bool:
    return os.path.exists(path)


async def wait_for_file(path: str) -> None:
    """Spin until `path` exists, so that several processes act at (nearly) the same moment."""
    deadline = asyncio.get_running_loop().time() + 30
    while not exists(path):
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"{path} never appeared")
        await asyncio.sleep(0.001)


if __name__ == "__main__":
    # Run the copy imported under its real name, not this `__main__` one: the pipeline
    # fingerprint names the module of each annotation type (`Decision`, `Answer`), and the
    # tests' own process knows them as `tests.crash.workload`.
    from tests.crash import workload as _workload

    asyncio.run(_workload.main(sys.argv[1:]))
