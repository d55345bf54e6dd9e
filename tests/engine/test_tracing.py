"""OpenTelemetry spans with the SDK's in-memory exporter: one per run drive and per stage
attempt, children nested under the stage that launched them."""

from __future__ import annotations

from pathlib import Path

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import waystation as ws


@ws.stage
async def leaf(x: int) -> int:
    return x + 1


inner = ws.Pipeline("inner", [leaf])


@ws.stage
async def launch(x: int, ctx: ws.StageContext) -> int:
    return int(await ctx.run_child(inner, {"x": x}))


@ws.stage(retry=ws.Retry(attempts=2))
async def flaky(launch: int, ctx: ws.StageContext) -> int:
    if ctx.attempt == 1:
        raise ConnectionError("once")
    return launch * 10


outer = ws.Pipeline("outer", [launch, flaky])


def _by_name(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


async def test_spans_per_run_and_stage_with_children_nested(db: Path) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("waystation-test")
    async with ws.Engine.open(db, pipelines=[outer], tracer=tracer) as engine:
        run = await engine.start(outer, {"x": 1})
        assert run.status == "succeeded" and run.output == 20
    spans = exporter.get_finished_spans()
    [outer_run] = _by_name(spans, "run outer")
    [inner_run] = _by_name(spans, "run inner")
    [launch_span] = _by_name(spans, "stage launch")
    [leaf_span] = _by_name(spans, "stage leaf")
    flaky_spans = _by_name(spans, "stage flaky")
    assert len(flaky_spans) == 2  # one per attempt
    assert sorted(s.attributes["waystation.attempt"] for s in flaky_spans) == [1, 2]  # type: ignore[index]
    assert launch_span.parent is not None and outer_run.context is not None
    assert launch_span.parent.span_id == outer_run.context.span_id
    assert inner_run.parent is not None and launch_span.context is not None
    assert inner_run.parent.span_id == launch_span.context.span_id  # the child under its stage
    assert leaf_span.parent is not None and inner_run.context is not None
    assert leaf_span.parent.span_id == inner_run.context.span_id
    assert outer_run.attributes is not None
    assert outer_run.attributes["waystation.run_id"] == run.run_id
    assert outer_run.attributes["waystation.outcome"] == "succeeded"
    assert inner_run.attributes is not None
    assert inner_run.attributes["waystation.root_run_id"] == run.run_id
