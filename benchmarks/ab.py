"""Is a change faster? The working tree against a git revision, alternating fresh processes.

    .venv/bin/python benchmarks/ab.py [--base HEAD] [--rounds 5] [--what DC]

The machine is shared and moves by ±25% from minute to minute, so a change is measured
against its base in alternation: each round runs throughput.py's D (1,000 concurrent runs x
5 waves) and/or C (one run alone, 300 runs) once from `--base` (checked out in a temporary
git worktree) and once from the working tree, each in a fresh process, plus B and A (raw
aiosqlite) for the ratios. It prints every round and the medians. Both sides use this
checkout's benchmark code; only the `waystation` package differs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

CHILD = """
import asyncio, json, os, sys, tempfile
sys.path.insert(0, {tree!r})
import waystation  # from the tree under test, before _common puts this checkout on the path
assert waystation.__file__.startswith({tree!r}), waystation.__file__
sys.path.insert(0, {bench!r})
import throughput as t

async def main():
    d = tempfile.mkdtemp()
    out = {{}}
    if "D" in {what!r}:
        out["D"] = (await t.bench_d(os.path.join(d, "d.db"), 1000, 5))["transitions_per_s"]
    if "C" in {what!r}:
        out["C"] = (await t.bench_c(os.path.join(d, "c.db"), 300))["ms_per_stage"] * 1000
    if "B" in {what!r}:
        out["B"] = (await t.bench_b(os.path.join(d, "b.db"), 1000, 5))["transitions_per_s"]
    if "A" in {what!r}:
        out["A"] = (await t.bench_a(os.path.join(d, "a.db"), 300))["ms_per_stage"] * 1000
    print(json.dumps(out))

asyncio.run(main())
"""


def measure(tree: Path, what: str) -> dict[str, float]:
    code = CHILD.format(tree=str(tree), bench=str(HERE), what=what)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{tree}: {done.stderr}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="HEAD", help="git revision to compare against")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--what", default="DC", help="D and/or C (default both)")
    args = parser.parse_args()
    raw = ("B" if "D" in args.what else "") + ("A" if "C" in args.what else "")
    base = Path(tempfile.mkdtemp(prefix="waystation-ab-")) / "base"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(base), args.base],
        check=True,
    )
    results: dict[str, dict[str, list[float]]] = {"base": {}, "work": {}, "raw": {}}
    try:
        for r in range(args.rounds):
            for side, tree, what in (
                ("base", base, args.what),
                ("work", ROOT, args.what),
                ("raw", ROOT, raw),
            ):
                for key, value in measure(tree, what).items():
                    results[side].setdefault(key, []).append(value)
            print(
                json.dumps(
                    {"round": r + 1}
                    | {
                        f"{s}_{k}": round(v[-1], 1)
                        for s, d in results.items()
                        for k, v in d.items()
                    }
                ),
                flush=True,
            )
    finally:
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], check=False
        )
    print(f"\nmedians over {args.rounds} rounds (base = {args.base}, work = the working tree)")
    for side in ("base", "work"):
        d = results[side]
        line = [
            f"{k} {median(v):,.1f}" + (" tr/s" if k in "BD" else " us/stage") for k, v in d.items()
        ]
        if "D" in d:
            ratios = [x / b for x, b in zip(d["D"], results["raw"]["B"], strict=True)]
            line.append(f"D/B {median(ratios):.1%}")
        if "C" in d:
            ratios = [x / a for x, a in zip(d["C"], results["raw"]["A"], strict=True)]
            line.append(f"C/A {median(ratios):.2f}x")
        print(f"  {side}: " + ", ".join(line))


if __name__ == "__main__":
    main()
