"""Run a workload script in a subprocess and SIGKILL it at a chosen moment (for crash tests
written as one self-contained script in tmp_path)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest


def run_and_kill(
    script: Path,
    db: Path,
    side: Path,
    marker: Path,
    ready: Callable[[str], bool],
    what: str,
    timeout: float = 20,
) -> str:
    """Start `script db` (env SIDE_FILE, SLOW_MARKER), read the run id it prints, wait until
    `ready(run_id)`, then SIGKILL it. Returns the run id; fails the test with `what` if the
    moment never comes."""
    env = {**os.environ, "SIDE_FILE": str(side), "SLOW_MARKER": str(marker)}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(db)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        run_id = proc.stdout.readline().strip()
        deadline = time.monotonic() + timeout
        while not ready(run_id):
            if time.monotonic() > deadline:
                pytest.fail(what)
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    return run_id
