"""Where the time goes in (C) one run alone and (D) 1,000 concurrent runs: pyinstrument.

    /tmp/benchvenv/bin/python benchmarks/profile_hotpath.py            # both, text
    /tmp/benchvenv/bin/python benchmarks/profile_hotpath.py --html out  # also HTML trees

pyinstrument is in the `bench` extra (so: the /tmp/benchvenv interpreter). It samples only
the main thread (the event loop: engine, drivers, stages, aiosqlite callers); the store's
writer thread is measured separately from /proc (CPU seconds of each thread of the process),
so the output says whether the loop or the writer is the bottleneck.

For each scenario: wall time, CPU time per thread, the top functions by self time (flat),
and the call tree (library frames collapsed).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
from typing import Any

from _common import N_STAGES, PIPELINE, RUN_INPUT, thread_cpu
from pyinstrument import Profiler
from pyinstrument.renderers import ConsoleRenderer

import waystation as ws


def delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: round(b.get(k, 0.0) - a.get(k, 0.0), 3) for k in b}


async def scenario_c(engine: ws.Engine, runs: int) -> None:
    for _ in range(runs):
        await engine.start(PIPELINE, RUN_INPUT)


async def scenario_d(engine: ws.Engine, runs: int, waves: int) -> None:
    for _ in range(waves):
        submitted = await asyncio.gather(*(engine.submit(PIPELINE, RUN_INPUT) for _ in range(runs)))
        await asyncio.gather(*(engine.wait(r.run_id) for r in submitted))


async def measure(
    name: str, runs: int, waves: int, profiled: bool
) -> tuple[Profiler | None, float, dict[str, float]]:
    tmp = tempfile.mkdtemp(prefix="waystation-profile-")
    path = os.path.join(tmp, f"{name}.db")
    async with ws.Engine.open(path, pipelines=[PIPELINE], max_concurrent_runs=1000) as engine:
        await scenario_c(engine, 5)  # warm-up
        profiler = Profiler(interval=0.001, async_mode="disabled") if profiled else None
        cpu0 = thread_cpu()
        t0 = time.perf_counter()
        if profiler is not None:
            profiler.start()
        if name == "C":
            await scenario_c(engine, runs)
        else:
            await scenario_d(engine, runs, waves)
        if profiler is not None:
            profiler.stop()
        wall = time.perf_counter() - t0
        cpu = delta(cpu0, thread_cpu())
    shutil.rmtree(tmp, ignore_errors=True)
    return profiler, wall, cpu


def profile(name: str, runs: int, waves: int, html: str | None) -> dict[str, Any]:
    transitions = runs * waves * N_STAGES
    _, bare_wall, bare_cpu = asyncio.run(measure(name, runs, waves, profiled=False))
    print(
        f"== {name} without the profiler: wall {bare_wall:.3f} s = "
        f"{transitions / bare_wall:,.0f} tr/s, {bare_wall / transitions * 1e6:.1f} us per "
        f"transition; CPU seconds by thread: {bare_cpu}"
    )
    profiler, wall, cpu = asyncio.run(measure(name, runs, waves, profiled=True))
    assert profiler is not None
    head = (
        f"== {name}: {'one run alone' if name == 'C' else f'{runs} concurrent runs'} "
        f"x {waves if name == 'D' else runs} ({transitions} stage transitions), "
        f"wall {wall:.3f} s under the profiler = {transitions / wall:,.0f} tr/s, "
        f"{wall / transitions * 1e6:.1f} us per transition"
    )
    print(head)
    print(f"   CPU seconds by thread: {cpu}")
    session = profiler.last_session
    assert session is not None
    flat = ConsoleRenderer(flat=True, flat_time="self", time="percent_of_total").render(session)
    lines = [ln for ln in flat.splitlines() if ln.strip()]
    body = [ln for ln in lines if "%" in ln or ln.lstrip()[:1].isdigit()]
    print("   top functions by self time (main thread):")
    for ln in body[:30]:
        print("   " + ln)
    tree = ConsoleRenderer(show_all=False, time="percent_of_total").render(session)
    print("   call tree (main thread):")
    for ln in tree.splitlines()[:120]:
        if ln.strip():
            print("   " + ln)
    if html:
        os.makedirs(html, exist_ok=True)
        with open(os.path.join(html, f"profile_{name}.html"), "w") as f:
            f.write(profiler.output_html())
    return {"name": name, "wall_s": wall, "cpu_s": cpu, "bare_wall_s": bare_wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--html", default=None, help="also write HTML profiles to this folder")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    c_runs = 50 if args.quick else 1000
    d_runs, d_waves = (100, 1) if args.quick else (1000, 5)
    profile("C", c_runs, 1, args.html)
    print()
    profile("D", d_runs, d_waves, args.html)


if __name__ == "__main__":
    main()
