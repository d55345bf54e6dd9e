"""Clocks for durable time. The engine reads the time and waits through a `Clock`, so tests
can move time forward by hand (`ManualClock`) instead of waiting for real."""

from __future__ import annotations

import asyncio
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
    scheduled starts and pause expiry without real waiting.

    One clock may serve engines in several event loops (a test suite that runs each test in
    a loop of its own, say): each waiter waits on a future of its own loop, and moving the
    clock wakes every waiter in its own loop.
    """

    def __init__(self, start: float | None = None) -> None:
        self._now = time.time() if start is None else start
        self._waiters: set[asyncio.Future[None]] = set()

    def time(self) -> float:
        """The clock's current time."""
        return self._now

    def advance(self, seconds: float) -> None:
        """Move time forward by `seconds` and wake whoever waits for it."""
        self.set(self._now + seconds)

    def set(self, now: float) -> None:
        """Move time to `now` (never backwards) and wake whoever waits for it."""
        self._now = max(self._now, now)
        waiters, self._waiters = self._waiters, set()
        try:
            here: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # moved from plain code, outside any loop
            here = None
        for waiter in waiters:
            loop = waiter.get_loop()
            if waiter.done() or loop.is_closed():
                continue
            if loop is here:
                waiter.set_result(None)
            else:  # another loop, perhaps in another thread: its own thread settles it
                loop.call_soon_threadsafe(_wake, waiter)

    async def sleep_until(self, deadline: float) -> None:
        """Wait until the clock has been moved to `deadline` or past it."""
        while self._now < deadline:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.add(waiter)
            try:
                await waiter
            finally:
                self._waiters.discard(waiter)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
