"""Shared pieces of the benchmarks: the 10-stage pipeline, medians, JSON lines, machine info.

Every script in this folder runs as `python benchmarks/<name>.py`, so this module is importable
as `_common` (the script's folder is first on `sys.path`). It also puts the repository root on
`sys.path`, so the scripts work from a checkout without installing waystation.
"""

from __future__ import annotations

import json
import os
import platform
import sqlite3
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import waystation as ws  # noqa: E402

N_STAGES = 10
"""Stages per run in every benchmark: each is trivial, each transition durable before the next."""

RUN_INPUT = {"n": 1}


def make_stage(k: int) -> ws.Stage:
    async def fn(n: int) -> int:
        return n + k

    fn.__name__ = fn.__qualname__ = f"s{k}"
    return ws.Stage(fn, name=f"s{k}")


PIPELINE = ws.Pipeline("bench10", [make_stage(k) for k in range(N_STAGES)], version="1")
"""10 trivial async stages; stage k returns the run input `n` plus k."""


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def emit(record: dict[str, Any]) -> dict[str, Any]:
    """Print one measurement as a JSON line (and return it, for the final table)."""
    print(json.dumps(record, sort_keys=False), flush=True)
    return record


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "loadavg": [round(x, 2) for x in load] if load else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


def fs_of(path: str) -> str:
    """The file system type holding `path` (from /proc/mounts), for the record."""
    best, fstype = "", "unknown"
    try:
        real = os.path.realpath(path)
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and real.startswith(parts[1]) and len(parts[1]) > len(best):
                    best, fstype = parts[1], f"{parts[2]} on {parts[0]}"
    except OSError:
        pass
    return fstype


def fmt_num(x: float | None, unit: str) -> str:
    if x is None:
        return "n/a"
    if unit == "ms":
        return f"{x:.3f} ms"
    if unit == "tr/s":
        return f"{x:,.0f} tr/s"
    return f"{x:g} {unit}"


# -- a pipeline that pauses: for benchmarks/resume.py ---------------------------------------


class Decision(msgspec.Struct):
    approved: bool
    by: str


@ws.stage
async def prepare(n: int) -> int:
    return n * 2


approval = ws.gate("approval", schema=Decision, reason="approve?")


@ws.stage
async def finish(prepare: int, approval: Decision) -> str:
    return f"done {prepare}" if approval.approved else "rejected"


APPROVAL = ws.Pipeline("bench_approval", [prepare, approval, finish], version="1")
"""prepare -> approval gate (pauses) -> finish: a run pauses after one stage."""


def thread_cpu() -> dict[str, float]:
    """CPU seconds (user + system) of each thread of this process, by thread name (Linux);
    the threads of aiosqlite and of `to_thread` are summed under one name."""
    tick = os.sysconf("SC_CLK_TCK")
    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        cpu = (int(fields[11]) + int(fields[12])) / tick
        name = names.get(int(tid), f"thread-{tid}")
        if name.startswith(("asyncio_", "ThreadPoolExecutor")) or name.startswith("Thread-"):
            name = "other threads (aiosqlite, to_thread)"
        out[name] = out.get(name, 0.0) + cpu
    return out
