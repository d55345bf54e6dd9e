"""Clocks for durable time. The engine reads the time and waits through a `Clock`, so tests
can move time forward by hand (`ManualClock`) instead of waiting for real."""

from __future__ import annotations

import time
from typing import Protocol

import anyio


class Clock(Protocol):
    """What the engine needs of a clock: the time (Unix seconds) and a way to wait."""

    def time(self) -> float:
        """Seconds since the Unix epoch."""

    async def sleep_until(self, deadline: float) -> None:
        """Return once `time()` has reached `deadline`."""


class SystemClock:
    """The real clock."""

    def time(self) -> float:
        """`time.time()`."""
        return time.time()

    async def sleep_until(self, deadline: float) -> None:
        """Sleep for real until the deadline."""
        await anyio.sleep(max(0.0, deadline - time.time()))


class ManualClock:
    """A clock that moves only when told to (`advance`, `set`): for tests of durable sleeps,
    scheduled starts and pause expiry without real waiting."""

    def __init__(self, start: float | None = None) -> None:
        self._now = time.time() if start is None else start
        self._changed = anyio.Event()

    def time(self) -> float:
        """The clock's current time."""
        return self._now

    def advance(self, seconds: float) -> None:
        """Move time forward by `seconds` and wake whoever waits for it."""
        self.set(self._now + seconds)

    def set(self, now: float) -> None:
        """Move time to `now` (never backwards) and wake whoever waits for it."""
        self._now = max(self._now, now)
        self._changed.set()
        self._changed = anyio.Event()

    async def sleep_until(self, deadline: float) -> None:
        """Wait until the clock has been moved to `deadline` or past it."""
        while self._now < deadline:
            await self._changed.wait()
