"""CPU work per run, counted in instructions: a measure the shared machine's noise does not move.

    .venv/bin/python benchmarks/instructions.py                 # B and D, this checkout
    .venv/bin/python benchmarks/instructions.py --base HEAD~3   # D here against a revision

Wall-clock figures on this machine move by ±25% from minute to minute; the number of
instructions a piece of work executes moves by well under 1%. Each figure here is counted
by `perf stat -e instructions:u` (user space, every thread of the process: the event loop,
the writer thread, SQLite) around a fresh process doing `--waves` waves of 1,000 concurrent
runs, minus the same process doing 2 waves, divided by the extra runs: start-up, imports
and warm-up cancel out. What it measures:

- B: throughput.py's raw group commit (10 rows per run, nothing else): the floor.
- D10: throughput.py's D (runs of 10 trivial stages through the engine).
- D1: the same with 1-stage runs. D10 - D1 over 9 stages is the work per stage; D1 minus
  one stage is the work per run that does not depend on its length (create, driver, finish,
  submit, wait).
- D10, no GC: D10 with the garbage collector off: what collections cost.

Under the GIL the loop and the writer mostly take turns (overlap.py), so D's throughput
follows its total instructions per transition; D/B >= 40% needs D10 within 2.5x of B's.
Needs Linux `perf` with access to the counters; without it, says so and measures nothing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import emit, machine

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RUNS = 1000

CHILD = """
import asyncio, gc, os, sys, tempfile
sys.path.insert(0, {tree!r})
import waystation as ws  # from the tree under test, before _common puts this checkout first
assert ws.__file__.startswith({tree!r}), ws.__file__
sys.path.insert(0, {bench!r})
from _common import RUN_INPUT, make_stage
import throughput

what, waves = {what!r}, {waves}
if what.endswith("-nogc"):
    gc.disable()
    what = what[: -len("-nogc")]

async def main():
    d = tempfile.mkdtemp()
    if what == "B":
        await throughput.bench_b(os.path.join(d, "b.db"), {runs}, waves)
        return
    stages = int(what[1:])
    p = ws.Pipeline("p", [make_stage(k) for k in range(stages)], version="1")
    async with ws.Engine.open(
        os.path.join(d, "d.db"), pipelines=[p], max_concurrent_runs={runs}
    ) as engine:
        for _ in range(waves):
            runs = await asyncio.gather(*(engine.submit(p, RUN_INPUT) for _ in range({runs})))
            done = await asyncio.gather(*(engine.wait(r.run_id) for r in runs))
            assert all(r.status == "succeeded" for r in done)

asyncio.run(main())
"""


def count(tree: Path, what: str, waves: int) -> int:
    """User-space instructions of a fresh process doing `waves` waves of `what`."""
    code = CHILD.format(tree=str(tree), bench=str(HERE), what=what, waves=waves, runs=RUNS)
    done = subprocess.run(
        ["perf", "stat", "-x", ",", "-e", "instructions:u", sys.executable, "-c", code],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise RuntimeError(f"{what} in {tree}: {done.stderr[-2000:]}")
    for line in done.stderr.splitlines():
        fields = line.split(",")
        if len(fields) > 2 and fields[2].startswith("instructions"):
            if not fields[0].isdigit():
                raise RuntimeError(f"perf could not count instructions: {line}")
            return int(fields[0])
    raise RuntimeError(f"no instruction count in perf's output: {done.stderr[-2000:]}")


def per_run(tree: Path, what: str, waves: int, repeat: int) -> int:
    """Instructions per run: (`waves` waves minus 2 waves) / the extra runs; min of `repeat`."""
    best = None
    for _ in range(repeat):
        extra = count(tree, what, waves) - count(tree, what, 2)
        value = extra // ((waves - 2) * RUNS)
        best = value if best is None else min(best, value)
    assert best is not None
    return best


def perf_works() -> str | None:
    """Why instructions cannot be counted here, or None if they can."""
    if shutil.which("perf") is None:
        return "the `perf` command is not installed"
    done = subprocess.run(
        ["perf", "stat", "-x", ",", "-e", "instructions:u", sys.executable, "-c", "pass"],
        capture_output=True,
        text=True,
    )
    if done.returncode or "<not supported>" in done.stderr or "<not counted>" in done.stderr:
        return f"perf cannot count instructions here: {done.stderr.strip()[-300:]}"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default=None, help="also measure D at this git revision")
    parser.add_argument("--waves", type=int, default=8, help="waves in the long process (>= 3)")
    parser.add_argument("--repeat", type=int, default=1, help="take the minimum of this many")
    parser.add_argument("--quick", action="store_true", help="3 waves, D10 and B only")
    parser.add_argument(
        "--what",
        default="D10,D1,D10-nogc",
        help="which of D10, D1, D10-nogc, D1-nogc (comma-separated)",
    )
    args = parser.parse_args()
    waves = 3 if args.quick else max(args.waves, 3)
    info = machine()
    emit({"bench": "instructions", "name": "machine", **info})
    why = perf_works()
    if why is not None:
        emit({"bench": "instructions", "name": "not_measured", "why": why})
        print(f"\nNOT MEASURED: {why}")
        return
    trees = [("work", ROOT)]
    base_dir: Path | None = None
    if args.base is not None:
        base_dir = Path(tempfile.mkdtemp(prefix="waystation-ins-")) / "base"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(base_dir), args.base],
            check=True,
        )
        trees.insert(0, (f"base {args.base}", base_dir))
    kinds = ["D10"] if args.quick else [k for k in args.what.split(",") if k]
    if "D10" not in kinds or not set(kinds) <= {"D10", "D1", "D10-nogc", "D1-nogc"}:
        parser.error("--what must include D10, and may add D1, D10-nogc and D1-nogc")
    results: dict[str, dict[str, int]] = {}
    try:
        b = per_run(ROOT, "B", waves, args.repeat)
        emit({"bench": "instructions", "name": "B", "instructions_per_run": b, "waves": waves})
        for label, tree in trees:
            got = results.setdefault(label, {})
            for kind in kinds:
                got[kind] = per_run(tree, kind, waves, args.repeat)
                emit(
                    {
                        "bench": "instructions",
                        "name": kind,
                        "tree": label,
                        "instructions_per_run": got[kind],
                        "waves": waves,
                    }
                )
    finally:
        if base_dir is not None:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_dir)],
                check=False,
            )
    print(f"\n# {info['date']}  python {info['python']}  sqlite {info['sqlite']}")
    print(f"user-space instructions per run ({RUNS:,} concurrent runs, waves {waves} minus 2)")
    print(f"  B  raw group commit, 10 rows a run           {b:>12,}")
    for label, got in results.items():
        d10 = got["D10"]
        print(f"  [{label}]")
        print(f"  D10 waystation, 10-stage runs                {d10:>12,}  = {d10 / b:.2f}x B")
        if "D1" in got:
            stage = (d10 - got["D1"]) // 9
            fixed = got["D1"] - stage
            print(f"    per stage                                  {stage:>12,}")
            print(f"    per run, fixed (create, driver, finish)    {fixed:>12,}")
        if "D10-nogc" in got:
            gc_share = 1 - got["D10-nogc"] / d10
            print(
                f"    with the GC off                            {got['D10-nogc']:>12,}  "
                f"(collections {gc_share:.0%})"
            )
        print(f"  D/B >= 40% needs D10 <= {int(b * 2.5):,} (2.5x B): {d10 / (b * 2.5):.2f}x over")
    if len(results) == 2:
        (lb, rb), (lw, rw) = results.items()
        for kind in kinds:
            print(f"  {kind} {lw} against {lb}: {rw[kind] / rb[kind] - 1:+.1%}")
    print(json.dumps({"summary": results, "B": b}))


if __name__ == "__main__":
    main()
