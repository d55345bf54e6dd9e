"""Run ids: UUIDv7 strings, so ids sort by creation time (index locality, readable order)."""

from __future__ import annotations

import os
import re
import threading
import time

from .errors import WaystationError

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$")


_lock = threading.Lock()
_last = 0

# Random bits are read from the OS a page at a time: one getrandom call per id cost more
# than the rest of making it. A forked child must not hand out its parent's next bits.
_POOL_IDS = 400
_pool = b""
_pos = 0


def _after_fork_in_child() -> None:
    """A forked child starts afresh: its own random bits (not its parent's next ones), its
    own monotonic sequence (else parent and child ids of one millisecond would differ only
    by a 16-bit step), and a fresh lock (the parent may have forked while holding it)."""
    global _lock, _last, _pool, _pos
    _lock = threading.Lock()
    _last = 0
    _pool, _pos = b"", 0


os.register_at_fork(after_in_child=_after_fork_in_child)


def new_run_id() -> str:
    """A new UUIDv7 (RFC 9562): 48-bit millisecond time, then random bits.

    Monotonic within the process (RFC 9562, 6.2 method 2): an id made in the same
    millisecond as the previous one is that one plus a random step, so ids sort in
    creation order, which listing and paging rely on.
    """
    global _last, _pool, _pos
    ms = time.time_ns() // 1_000_000
    with _lock:
        if _pos >= len(_pool):
            _pool, _pos = os.urandom(10 * _POOL_IDS), 0
        rand = int.from_bytes(_pool[_pos : _pos + 10], "big")
        _pos += 10
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
    h = f"{value:032x}"  # uuid.UUID(int=value) formats the same, three times slower
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def check_run_id(run_id: str) -> str:
    """Reject run ids that are not short printable tokens (they end up in paths and logs)."""
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
        raise WaystationError(
            f"invalid run id {run_id!r}: use 1-128 characters from letters, digits and ._:-"
        )
    return run_id
