"""Run ids: RFC 9562 UUIDv7 text, in creation order, never repeated across a fork."""

from __future__ import annotations

import os
import signal
import time
import uuid

from waystation import _ids
from waystation._ids import new_run_id


def test_ids_are_uuid7_text_in_creation_order() -> None:
    ids = [new_run_id() for _ in range(3000)]  # several refills of the random pool
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    for text in ids[:5] + ids[-5:]:
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert parsed.version == 7
        assert parsed.variant == uuid.RFC_4122


def test_a_forked_child_does_not_reuse_the_parents_random_bits() -> None:
    new_run_id()  # the pool is now filled, with ids left in it
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next ids and leave at once
        os.close(read)
        os.write(write, " ".join(new_run_id() for _ in range(5)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as child_out:
        child = child_out.read().split()
    os.waitpid(pid, 0)
    parent = [new_run_id() for _ in range(5)]
    assert len(child) == 5
    # The time part may match (same millisecond); the random tails must not.
    assert not {c[-12:] for c in child} & {p[-12:] for p in parent}


def test_a_child_forked_while_the_lock_is_held_can_make_ids() -> None:
    # Another thread of the parent is inside new_run_id at the moment of the fork: the
    # child inherits the lock held, by a thread it does not have.
    with _ids._lock:
        pid = os.fork()
        if pid == 0:
            new_run_id()
            os._exit(0)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("the child hung on the lock it inherited")
