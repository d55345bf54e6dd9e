"""A new run as the store tests create it: running, at its first stage."""

from __future__ import annotations

from typing import Any

from waystation.store.base import NewRun, NewTransition


def new_run(run_id: str, **kw: Any) -> NewRun:
    return NewRun(
        run_id=run_id,
        pipeline="p",
        pipeline_version="1",
        fingerprint="f",
        status="running",
        input="{}",
        root_run_id=run_id,
        transitions=[NewTransition("created"), NewTransition("started", 0, "a", 1)],
        **kw,
    )
