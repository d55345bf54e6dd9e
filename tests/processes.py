"""Child Python processes for the multi-process tests, and bounded waiting."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def child_env() -> dict[str, str]:
    """Environment for a `python -m tests....` child: the repository importable, output
    unbuffered (tests read it line by line)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


async def start_python(
    *args: str,
    env: dict[str, str] | None = None,
    stderr: Any = asyncio.subprocess.PIPE,
    cwd: Path = ROOT,
) -> asyncio.subprocess.Process:
    """`python ARGS` (in the repository unless `cwd`), stdout piped, no stdin."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        cwd=cwd,
        env=child_env() if env is None else env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=stderr,
    )


async def wait_until(
    what: str, check: Callable[[], bool | Awaitable[bool]], timeout: float, poll: float = 0.01
) -> None:
    """Poll `check` until it is true; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(poll)
