"""What the engine hands back: `Run`, `Pause`, `StageError`, `Transition` (msgspec Structs, so
they encode straight to JSON for an HTTP API)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec


class Pause(msgspec.Struct, frozen=True, kw_only=True):
    """An open pause: what the run waits for."""

    pause_id: str
    """Identifies this pause within its run (`<stage>#<n>`); pass it to `resume` if needed."""
    kind: str
    """The gate's name, or the kind given to `ctx.pause`."""
    reason: str | None
    """Why the run waits, for the person who answers."""
    stage_index: int
    stage_name: str
    schema: dict[str, Any]
    """JSON Schema of the expected answer, so a UI or the CLI can validate without Python."""
    gate: bool
    """True for a `gate` stage (nothing re-runs on resume), False for `ctx.pause`."""
    number: int = 0
    """For `ctx.pause`: how many pauses of this stage were answered before this one."""
    schema_ref: str | None = None
    """`module:qualname` of the schema type, when it is an importable class."""
    created_at: float = 0.0
    run_id: str | None = None
    """The run that waits for the answer: this run, or for a parent waiting on a child,
    the deepest paused descendant (resuming either answers it)."""
    stage_path: str | None = None
    """The stage, or `group.branch` for a branch of a parallel group, that paused."""
    origin_id: str | None = None
    """For a pause shown by a parent: the pause's id in the run that waits (`run_id`)."""
    expires_at: float | None = None
    """When the pause expires (Unix time); None: never."""


_pause_list = msgspec.json.Decoder(list[Pause])


def decode_pauses(text: str | None) -> list[Pause]:
    """The open pauses stored in a run row (a JSON list)."""
    if not text:
        return []
    return _pause_list.decode(text)


class StageError(msgspec.Struct, frozen=True, kw_only=True):
    """Why a stage (and so its run) failed."""

    type: str
    """The exception's class name (qualified by module when not a builtin)."""
    message: str
    traceback: str | None = None
    stage_index: int | None = None
    stage_name: str | None = None


class Run(msgspec.Struct, frozen=True):
    """A snapshot of one run, as committed."""

    # Not kw_only: the engine builds one for every run it hands out, and msgspec matches
    # keyword arguments to fields one by one (21 of them: ~1.7 us, against 0.1 us given in
    # order). Keep the order of the fields as `Engine._decode_run` passes them.

    run_id: str
    pipeline: str
    pipeline_version: str
    status: str
    """pending, running, paused, succeeded, failed or cancelled."""
    stage_index: int
    """The next stage to run (for a paused run: the stage that paused)."""
    stage_name: str | None
    """Name of the stage at `stage_index`; None once past the last stage."""
    input: Any
    output: Any
    """The last stage's output, once the run succeeded."""
    error: StageError | None
    pause: Pause | None
    """The first open pause (most runs have at most one)."""
    pauses: list[Pause]
    """Every open pause: several when parallel branches or child runs paused at once; each
    is answered on its own with `resume(run_id, value, pause_id=...)`."""
    parent_run_id: str | None
    root_run_id: str
    run_kind: str
    depth: int
    idempotency_key: str | None
    fingerprint: str
    cancel_requested: bool
    replay_of: str | None
    """For a replay (`run_kind == "replay"`): the run it was forked from."""
    created_at: datetime
    updated_at: datetime

    @property
    def done(self) -> bool:
        """True once the run succeeded, failed or was cancelled."""
        return self.status in ("succeeded", "failed", "cancelled")


class Failed(msgspec.Struct, frozen=True, kw_only=True, tag="failed", tag_field="outcome"):
    """The output of a `continue_on_error` stage that failed; later stages may bind it
    (`fallback(primary: ws.Failed | Report)`) and choose what to do."""

    stage: str
    type: str
    message: str


class RunTree(msgspec.Struct, frozen=True, kw_only=True):
    """A run and its child runs, recursively (`engine.tree`)."""

    run: Run
    children: list[RunTree]


class Transition(msgspec.Struct, frozen=True, kw_only=True):
    """One row of a run's journal."""

    run_id: str
    seq: int
    stage_index: int | None
    stage_path: str | None
    event: str
    """created, started, succeeded, reused (a replay's copied result), skipped, retrying,
    failed, paused, resumed, recovered, retried, cancelled or completed."""
    attempt: int
    payload: Any
    """For succeeded: the output; paused: the pause; resumed: the answer."""
    error: StageError | None
    at: datetime
