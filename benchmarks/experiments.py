"""What-if measurements for the per-run overhead in (D): measured, not estimated.

    .venv/bin/python benchmarks/experiments.py

(D) of throughput.py (1,000 concurrent runs x 5 waves, submit all then wait all) in three
variants, in interleaved rounds, median of 3:

  as is        the engine as it is (workspace_policy="remove_on_success", the default)
  keep         workspace_policy="keep": no worker-thread hop per succeeded run to remove
               a workspace (a public option; shows what that hop costs)
  no-readback  "keep", and `Engine._wait` monkeypatched to return as soon as the driver is
               done, without reading the run back (`get_run` on the reader thread) and
               decoding it (`_to_run`): an upper bound for answering `wait` from the
               driver's final state. Experiment only; it returns None instead of the Run.

If the private `Engine._wait` is gone, the last variant says so instead of a number.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from typing import Any

from _common import N_STAGES, PIPELINE, RUN_INPUT, emit, median

import waystation as ws

RUNS, WAVES, TRIALS = 1000, 5, 3


async def _wait_no_readback(self: Any, run_id: str) -> None:
    driver = self._active.get(run_id)
    if driver is not None:
        await driver.done.wait()


async def d(path: str, policy: str) -> float:
    async with ws.Engine.open(path, pipelines=[PIPELINE], workspace_policy=policy) as engine:
        t0 = time.perf_counter()
        for _ in range(WAVES):
            runs = await asyncio.gather(*(engine.submit(PIPELINE, RUN_INPUT) for _ in range(RUNS)))
            await asyncio.gather(*(engine.wait(r.run_id) for r in runs))
        return RUNS * WAVES * N_STAGES / (time.perf_counter() - t0)


def main() -> None:
    original = getattr(ws.Engine, "_wait", None)
    variants: dict[str, list[float]] = {"as is": [], "keep": [], "no-readback": []}
    tmp = tempfile.mkdtemp(prefix="waystation-experiments-")
    try:
        for t in range(TRIALS):
            for name in variants:
                if name == "no-readback":
                    if original is None:
                        continue
                    ws.Engine._wait = _wait_no_readback  # type: ignore[attr-defined]
                policy = "remove_on_success" if name == "as is" else "keep"
                try:
                    variants[name].append(
                        asyncio.run(d(os.path.join(tmp, f"{t}{name}.db"), policy))
                    )
                finally:
                    if original is not None:
                        ws.Engine._wait = original  # type: ignore[attr-defined]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base = median(variants["as is"])
    print()
    for name, values in variants.items():
        if not values:
            emit({"bench": "experiments", "name": name, "error": "Engine._wait not found"})
            print(f"{name:<12} NOT MEASURED (Engine._wait not found)")
            continue
        m = median(values)
        emit({"bench": "experiments", "name": name, "unit": "tr/s", "median": m, "trials": values})
        print(f"{name:<12} {m:>10,.0f} tr/s  {m / base:.2f}x  trials {[round(v) for v in values]}")


if __name__ == "__main__":
    main()
