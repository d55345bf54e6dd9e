"""Pipelines shared by the reliability tests and their subprocesses (`procs.py`).

They live in an importable module so that a subprocess builds the same pipelines (the
fingerprint names the module of each annotation type). Stages that must be counted across
processes append a line to a *side file*, like the crash workload does.
"""

from __future__ import annotations

import os
from typing import Annotated

import msgspec

import waystation as ws

SIDE_FILE: str | None = None


def configure(side_file: str | os.PathLike[str]) -> None:
    """Point the stages of this process at `side_file`."""
    global SIDE_FILE
    SIDE_FILE = os.fspath(side_file)


def record(*words: object) -> None:
    """Append one line to the side file (flushed and fsynced) before the stage goes on."""
    if SIDE_FILE is None:
        raise RuntimeError("pipelines.configure(side_file) was not called")
    with open(SIDE_FILE, "a") as f:
        f.write(" ".join(str(w) for w in words) + "\n")
        f.flush()
        os.fsync(f.fileno())


def side_counts(path: str | os.PathLike[str]) -> dict[tuple[str, str], int]:
    """How often each (run_id, stage) was recorded in the side file."""
    counts: dict[tuple[str, str], int] = {}
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return counts
    for line in lines:
        words = line.split()
        if len(words) >= 2:
            key = (words[0], words[1])
            counts[key] = counts.get(key, 0) + 1
    return counts


class Decision(msgspec.Struct):
    approved: bool
    by: str


@ws.stage
async def prepare(n: int) -> int:
    return n * 10


approval = ws.gate("approval", schema=Decision, reason="approve the prepared amount?")


@ws.stage
async def finish(prepare: int, approval: Decision, ctx: ws.StageContext) -> str:
    record(ctx.run_id, "finish", os.getpid(), approval.by)
    return f"{prepare} {'approved' if approval.approved else 'rejected'} by {approval.by}"


approvals = ws.Pipeline("rel-approval", [prepare, approval, finish], version="1")


class Payment(msgspec.Struct, forbid_unknown_fields=True):
    """An answer with constraints that the JSON Schema states (minimum, lengths, enum)."""

    amount: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)]
    currency: Annotated[str, msgspec.Meta(min_length=3, max_length=3)]
    by: Annotated[str, msgspec.Meta(min_length=1)]


payment = ws.gate("payment", schema=Payment, reason="how much was paid?")


@ws.stage
async def book(n: int, payment: Payment, ctx: ws.StageContext) -> str:
    record(ctx.run_id, "book", os.getpid(), payment.amount)
    return f"{n}: {payment.amount} {payment.currency} by {payment.by}"


payments = ws.Pipeline("rel-payment", [payment, book], version="1")

PIPELINES = [approvals, payments]


BEFORE_GROW_RETURNS: list[object] = []
"""Callables the `grow` stage calls before it returns (a subprocess sets a file size limit)."""


@ws.stage
async def grow(n: int) -> str:
    for hook in BEFORE_GROW_RETURNS:
        hook()  # type: ignore[operator]
    return "z" * (400_000 + n)


@ws.stage
async def measure(grow: str, ctx: ws.StageContext) -> int:
    record(ctx.run_id, "measure", os.getpid())
    return len(grow)


bulky = ws.Pipeline("rel-bulky", [grow, measure], version="1")

PIPELINES.append(bulky)
