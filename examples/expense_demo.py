"""An expense waits for approval in one process and is approved and paid in another.

    make demo     (or: .venv/bin/python examples/expense_demo.py [--db PATH])

1. This process submits an expense. The run reviews it and pauses at the approval gate; the
   engine closes, as when a web request ends or a service is redeployed. From then on the run
   exists only in the database.
2. New processes, through the command line, list the paused runs, try a malformed answer
   (refused, nothing changes), then approve: the run continues at `pay`, whose first call to
   the (fake) bank times out and is retried.
3. `waystation show` prints the run's timeline from its journal.

The database lives in a temporary directory, unless `--db PATH` says where (a file there is
replaced).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import msgspec

import waystation as ws

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # so that `expense` imports the same way here and in the CLI

from expense import Expense, expense_pipeline, pipelines  # noqa: E402

EXPENSE = Expense(
    id="EXP-1042",
    employee="ann@example.com",
    amount=2540.0,
    currency="USD",
    category="travel",
    description="flight and hotel, PyCon",
)
DECISION = {"approved": True, "by": "dana@example.com", "comment": "conference trip, fine"}


def heading(text: str) -> None:
    print(f"\n== {text}", flush=True)


async def submit(db: str) -> ws.Run:
    async with ws.Engine.open(db, pipelines=pipelines) as engine:
        run = await engine.start(expense_pipeline, {"expense": EXPENSE})
        for t in await engine.history(run.run_id):
            if t.event == "succeeded" and t.stage_path == "review":
                print(f"review:  {msgspec.json.encode(t.payload).decode()}")
        return run


async def fetch(db: str, run_id: str) -> ws.Run:
    async with ws.Engine.open(db, recover=False) as engine:
        return await engine.get(run_id)


def waystation(db: Path, *args: str) -> int:
    """Run the CLI in a new process, as a person would, and show its output."""
    print(f"$ {shlex.join(['waystation', '--db', db.name, *args])}", flush=True)
    env = dict(os.environ)
    # expense.py for --app; the repo root too, should waystation not be installed.
    paths = [str(HERE), str(HERE.parent), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    command = [sys.executable, "-m", "waystation", "--db", db.name, *args]
    done = subprocess.run(
        command, cwd=db.parent, env=env, stderr=subprocess.STDOUT, check=False, timeout=60
    )
    if done.returncode:
        print(f"(exit status {done.returncode})", flush=True)
    return done.returncode


def demo(db: Path) -> int:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)

    heading(f"1. process {os.getpid()} submits an expense")
    print(f"expense: {msgspec.json.encode(EXPENSE).decode()}")
    run = asyncio.run(submit(str(db)))
    if run.status != "paused" or run.pause is None:
        print(f"expected the run to pause for approval, but it is {run.status}")
        return 1
    print(f"run {run.run_id} is {run.status} at stage {run.pause.stage_name!r}")
    print(f"it waits for: {run.pause.reason}")
    print(f"the engine is closed; the run lives only in {db.name}")

    heading("2. later, new processes answer it with the command line")
    if waystation(db, "runs", "--status", "paused"):
        return 1
    print("\na malformed answer is refused, and the run stays paused:", flush=True)
    bad = json.dumps({"approved": "yes"})
    if waystation(db, "resume", run.run_id, "--input", bad, "--app", "expense:pipelines") != 2:
        return 1
    print("\nthe approval; the run goes on in that process:", flush=True)
    answer = json.dumps(DECISION)
    if waystation(db, "resume", run.run_id, "--input", answer, "--app", "expense:pipelines"):
        return 1

    heading("3. what happened, from the run's journal")
    if waystation(db, "show", run.run_id):
        return 1

    final = asyncio.run(fetch(str(db), run.run_id))
    if final.status != "succeeded":
        print(f"\nthe run ended {final.status}, not succeeded")
        return 1
    print(f"\nok: {final.status}, output {msgspec.json.encode(final.output).decode()}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--db", type=Path, help="keep the database here (default: a temp dir)")
    args = parser.parse_args()
    if args.db is not None:
        return demo(args.db.resolve())
    with tempfile.TemporaryDirectory(prefix="waystation-demo-") as tmp:
        return demo(Path(tmp) / "expenses.db")


if __name__ == "__main__":
    sys.exit(main())
