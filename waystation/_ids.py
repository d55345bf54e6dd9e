"""Run ids: UUIDv7 strings, so ids sort by creation time (index locality, readable order)."""

from __future__ import annotations

import os
import re
import threading
import time
import uuid

from .errors import WaystationError

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$")


_lock = threading.Lock()
_last = 0


def new_run_id() -> str:
    """A new UUIDv7 (RFC 9562): 48-bit millisecond time, then random bits.

    Monotonic within the process (RFC 9562, 6.2 method 2): an id made in the same
    millisecond as the previous one is that one plus a random step, so ids sort in
    creation order, which listing and paging rely on.
    """
    global _last
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    with _lock:
        if ms <= _last >> 80:
            value = _last + 1 + (rand & 0xFFFF)
            value |= 0b10 << 62  # keep the variant bits after the carry
        else:
            value = (ms & ((1 << 48) - 1)) << 80
            value |= 0x7 << 76
            value |= ((rand >> 62) & 0xFFF) << 64
            value |= 0b10 << 62
            value |= rand & ((1 << 61) - 1)
        _last = value
    return str(uuid.UUID(int=value))


def check_run_id(run_id: str) -> str:
    """Reject run ids that are not short printable tokens (they end up in paths and logs)."""
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
        raise WaystationError(
            f"invalid run id {run_id!r}: use 1-128 characters from letters, digits and ._:-"
        )
    return run_id
