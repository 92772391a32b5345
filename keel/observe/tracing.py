"""OpenTelemetry traces with GenAI semantic conventions.

Each model call gets a span carrying the request id and token usage; where they go is a setting:
`none` (default: no spans are made at all), `jsonl` (a file in the data dir, handy offline) or `console`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import orjson
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor, ConsoleSpanExporter, SpanExporter, SpanExportResult,
)

from keel import __version__


class JSONLSpanExporter(SpanExporter):
    """Appends one JSON object per finished span to a file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = []
        for s in spans:
            ctx = s.get_span_context()
            lines.append(orjson.dumps({
                "name": s.name, "trace_id": f"{ctx.trace_id:032x}", "span_id": f"{ctx.span_id:016x}",
                "start_ns": s.start_time, "end_ns": s.end_time, "status": s.status.status_code.name,
                "attributes": dict(s.attributes or {}),
            }, default=str))
        with self._lock, open(self.path, "ab") as fh:
            fh.write(b"\n".join(lines) + b"\n")
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


def make_tracer(exporter: str, data_dir: Path) -> tuple[trace.Tracer, TracerProvider]:
    """A tracer for Keel's spans (not installed globally, so tests and replicas stay independent); with
    nowhere to send spans, a NoOpTracer, which the gateway takes as "make no spans"."""
    sampler = ALWAYS_OFF if exporter == "none" else ALWAYS_ON
    provider = TracerProvider(resource=Resource.create({"service.name": "keel", "service.version": __version__}),
                              sampler=sampler)
    if exporter == "none":
        return trace.NoOpTracer(), provider
    if exporter == "jsonl":
        provider.add_span_processor(BatchSpanProcessor(JSONLSpanExporter(data_dir / "traces.jsonl"),
                                                       schedule_delay_millis=200))
    elif exporter == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    return provider.get_tracer("keel.gateway"), provider
