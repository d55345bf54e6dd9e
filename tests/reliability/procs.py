"""Subprocess entry for the reliability tests: `python -m tests.reliability.procs MODE ...`.

fsize DB SIDE
    Run `bulky` with a file size limit (RLIMIT_FSIZE, SIGXFSZ ignored) set just before its
    big stage returns, print the run's status once the engine gave up on it, and exit.

resume DB SIDE VALUE RUN_ID... [--go FILE] [--bare]
    Open an engine (with the pipelines, or none with --bare, like the CLI), print `ready`,
    wait for the go file, resume every run at once and print one JSON line per run:
    {"run_id", "result": "won" | error class name, "status"}. Exit 0 if every resume won,
    3 if every one got NotPaused, 4 if mixed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

import msgspec

import waystation as ws


def exists(path: str) -> bool:
    return os.path.exists(path)


async def wait_for_file(path: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        await asyncio.sleep(0.001)


async def resume(args: argparse.Namespace) -> int:
    from tests.reliability import pipelines

    pipelines.configure(args.side)
    value = msgspec.json.decode(args.value)
    async with ws.Engine.open(
        args.db, pipelines=[] if args.bare else pipelines.PIPELINES, recover=False
    ) as engine:
        print("ready", flush=True)
        if args.go:
            await wait_for_file(args.go)

        async def one(run_id: str) -> dict[str, str]:
            try:
                run = await engine.resume(run_id, value, timeout=30)
            except ws.WaystationError as exc:
                return {"run_id": run_id, "result": type(exc).__name__, "status": ""}
            return {"run_id": run_id, "result": "won", "status": run.status}

        results = await asyncio.gather(*(one(r) for r in args.run_ids))
    for r in results:
        print(msgspec.json.encode(r).decode(), flush=True)
    won = sum(r["result"] == "won" for r in results)
    lost = sum(r["result"] == "NotPaused" for r in results)
    if won == len(results):
        return 0
    if lost == len(results):
        return 3
    return 4


async def fsize(args: argparse.Namespace) -> int:
    """Run `bulky` under a file size limit set just before its big stage returns: the
    commit cannot grow the WAL. Print the run's row once the driver gave up; exit."""
    import resource
    import signal
    import sqlite3

    from tests.reliability import pipelines

    pipelines.configure(args.side)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

    def limit() -> None:
        sizes = [os.path.getsize(args.db + s) for s in ("", "-wal") if exists(args.db + s)]
        resource.setrlimit(resource.RLIMIT_FSIZE, (max(sizes) + 8192, hard))

    pipelines.BEFORE_GROW_RETURNS.append(limit)
    engine = await ws.Engine.open(args.db, pipelines=pipelines.PIPELINES, poll_interval=60)
    try:
        run = await engine.submit(pipelines.bulky, {"n": 1}, run_id="bulky-1")
        for _ in range(2000):  # at most 20 s
            if run.run_id not in engine.active_runs:
                break
            await asyncio.sleep(0.01)
        conn = sqlite3.connect(args.db)
        row = conn.execute(
            "SELECT status, stage_index FROM runs WHERE run_id = ?", (run.run_id,)
        ).fetchone()
        conn.close()
        print(msgspec.json.encode({"status": row[0], "stage_index": row[1]}).decode(), flush=True)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        await engine.close()
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.reliability.procs")
    sub = parser.add_subparsers(dest="mode", required=True)
    r = sub.add_parser("resume")
    r.add_argument("db")
    r.add_argument("side")
    r.add_argument("value")
    r.add_argument("run_ids", nargs="+")
    r.add_argument("--go")
    r.add_argument("--bare", action="store_true")
    f = sub.add_parser("fsize")
    f.add_argument("db")
    f.add_argument("side")
    args = parser.parse_args(argv)
    return asyncio.run(resume(args) if args.mode == "resume" else fsize(args))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
