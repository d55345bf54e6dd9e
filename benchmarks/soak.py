"""Crash soak: hundreds of SIGKILLs of a worker running a mixed workload on one SQLite file.

    .venv/bin/python benchmarks/soak.py                       # 300 kills, seed 1, 600 runs
    .venv/bin/python benchmarks/soak.py --kills 20 --runs 15  # what tests/crash/test_soak.py runs

A worker process runs sequential stages, a stage with `ws.Retry` that fails its first
attempts, gates answered by two answerer processes (engines without pipelines, with
`recover=False`, racing each other), a pipeline with a child pipeline as a stage and
`ws.map_children`, and `ws.parallel` groups (one with a gate as a branch). The harness kills
the worker with SIGKILL at random moments (`--seed` makes the schedule of kills
reproducible, not the machine's timing), starts the next one, and repeats; after a final
worker run without kills it checks that every run finished (or is paused at a gate that is
never answered, as planned), each stage's result is committed exactly once, no committed
stage executed again (a side file outside the database counts executions), every answer
was applied once, and `PRAGMA integrity_check` is ok. See tests/crash/soak_workload.py.

Prints one JSON line per 25 kills (progress), then the figures as JSON lines and a table.
Exit status 0 if there was no anomaly, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import _common
from _common import emit

from tests.crash.soak_workload import Report, soak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=300, help="SIGKILLs (default 300)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the kill schedule")
    parser.add_argument("--runs", type=int, default=600, help="root runs (default 600)")
    parser.add_argument(
        "--max-after",
        type=float,
        default=1.0,
        help="a kill lands up to this many seconds after the worker is ready (default 1.0)",
    )
    parser.add_argument("--durability", choices=["full", "normal"], default="full")
    parser.add_argument("--keep", help="keep the database and side files in this directory")
    args = parser.parse_args()
    if args.kills < 1 or args.runs < 1:
        parser.error("--kills and --runs must be at least 1")

    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="soak-"))
    emit({"machine": _common.machine(), "fs": _common.fs_of(str(workdir))})
    emit(
        {
            "kills": args.kills,
            "seed": args.seed,
            "runs": args.runs,
            "durability": args.durability,
            "dir": str(workdir),
        }
    )

    def progress(report: Report) -> None:
        if report.kills % 25 == 0:
            emit({"progress": report.kills, "anomalies": len(report.anomalies)})

    try:
        report = asyncio.run(
            soak(
                workdir,
                kills=args.kills,
                seed=args.seed,
                runs=args.runs,
                max_after=args.max_after,
                durability=args.durability,
                progress=progress,
            )
        )
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    figures = report.figures()
    for name, value in figures.items():
        emit({"figure": name, "value": value})
    for text in report.anomalies:
        emit({"anomaly": text})
    print_table(figures)
    return 1 if report.anomalies else 0


def print_table(figures: dict[str, Any]) -> None:
    labels = {
        "kills_survived": "kills survived (SIGKILL, then recovered)",
        "kills_before_ready": "  of which before the worker was ready",
        "kills_mid_stage": "  of which with a stage in flight",
        "stages_in_flight_at_kills": "stage attempts in flight at the kills",
        "runs": "root runs",
        "child_runs": "child runs",
        "held_runs": "runs left paused on purpose",
        "stages": "stage results committed",
        "executions": "stage executions (side file)",
        "reexecutions": "re-executions (in flight at a kill)",
        "retries": "retried attempts (on purpose)",
        "answers": "answers applied",
        "answers_lost": "answers that lost the race (NotPaused)",
        "answerer_kills": "answerer processes SIGKILLed",
        "answers_cut": "  answers cut short by those kills",
        "anomalies": "ANOMALIES",
        "final_seconds": "seconds the last worker took to finish",
        "seconds": "seconds in all",
    }
    print()
    print(f"{'crash soak, seed ' + str(figures['seed']):<44} {'':>8}")
    for key, label in labels.items():
        print(f"{label:<44} {figures[key]:>8}")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
