"""Optional OpenTelemetry spans: one per run (each time an engine drives it) and one per
stage attempt. Child runs nest under the stage that launched them, because a child's driver
task starts in the launching stage's context.

Nothing here imports OpenTelemetry: pass a tracer (`Engine.open(..., tracer=...)`, e.g.
`opentelemetry.trace.get_tracer("waystation")`, from the `otel` extra) to turn it on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .pipeline import Slot
    from .runner import Driver
    from .stage import Stage


class Tracing:
    """Starts spans on an OpenTelemetry tracer (anything with `start_as_current_span`)."""

    def __init__(self, tracer: Any) -> None:
        self.tracer = tracer

    @contextlib.contextmanager
    def run(self, driver: Driver) -> Iterator[None]:
        """A span around one drive of a run, from start/resume/recovery until it settles."""
        state = driver.state
        with self.tracer.start_as_current_span(
            f"run {driver.pipeline.name}",
            attributes={
                "waystation.run_id": state.run_id,
                "waystation.root_run_id": state.root_run_id,
                "waystation.pipeline": driver.pipeline.name,
                "waystation.pipeline_version": driver.pipeline.version,
                "waystation.depth": state.depth,
            },
        ) as span:
            yield
            span.set_attribute("waystation.outcome", driver.outcome or "stopped")

    @contextlib.contextmanager
    def stage(self, driver: Driver, stage: Stage, slot: Slot, attempt: int) -> Iterator[None]:
        """A span around one attempt of a stage (or of a parallel branch)."""
        with self.tracer.start_as_current_span(
            f"stage {slot.path}",
            attributes={
                "waystation.run_id": driver.run_id,
                "waystation.stage": slot.path,
                "waystation.stage_index": slot.index,
                "waystation.attempt": attempt,
            },
        ):
            yield
