"""OpenTelemetry traces with GenAI semantic conventions: one span tree per request.

Where spans go is the `trace_exporter` setting: `none` (default: no spans are made at all), `otlp` (the
company's collector, configured by the standard `OTEL_EXPORTER_OTLP_*` variables, HTTP/protobuf or gRPC),
`jsonl` (a file in the data dir, handy offline) or `console`. `OTEL_SERVICE_NAME` and
`OTEL_RESOURCE_ATTRIBUTES` name the service (default `keel`); `OTEL_TRACES_SAMPLER` (and `_ARG`) choose
which traces are kept (default `parentbased_always_on`: every request, and a caller's sampling decision
is followed). `trace_detail` is `stages` (every stage, guard scan and key check a span: about a dozen per
chat call) or `calls` (the request, the gateway call, each provider attempt, retrieval, workflow steps).

Spans leave through a `BatchSpanProcessor` behind a bounded gate (`Gate`): export runs on the processor's
own thread, so a slow or dead collector never blocks or fails a request; spans over the bound are dropped
and counted (`keel_trace_spans_dropped_total` on /metrics).

Code anywhere in a request opens a child span with `span(name)`: the server span (`TraceRequests`) and
the gateway's call span carry Keel's tracer in the OpenTelemetry context, so with tracing off `span()` is
one context lookup and makes nothing.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor, ConsoleSpanExporter, SpanExporter, SpanExportResult,
)
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from keel import __version__
from keel.core.errors import ConfigError
from keel.observe.export_process import ProcessExporter

_TRACER = otel_context.create_key("keel.tracer")  # the context value that says "this request is traced"
_FINE = otel_context.create_key("keel.trace_stages")  # set: stage, guard and auth spans too (`trace_detail`)
PROPAGATOR = TraceContextTextMapPropagator()  # W3C traceparent / tracestate
CONTENT_MAX = 16_384  # characters of prompt or completion text one span attribute may hold


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
            parent = s.parent
            lines.append(orjson.dumps({
                "name": s.name, "trace_id": f"{ctx.trace_id:032x}", "span_id": f"{ctx.span_id:016x}",
                "parent_id": f"{parent.span_id:016x}" if parent is not None else None,
                "start_ns": s.start_time, "end_ns": s.end_time, "status": s.status.status_code.name,
                "attributes": dict(s.attributes or {}),
            }, default=str))
        with self._lock, open(self.path, "ab") as fh:
            fh.write(b"\n".join(lines) + b"\n")
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


@dataclass
class SpanStats:
    """Counts of what became of finished spans, for /metrics."""

    queued: int = 0  # handed to the batch processor and not yet given to the exporter
    exported: int = 0
    failed: int = 0  # given to the exporter, which reported failure (collector down, refused)
    dropped: int = 0  # over the queue bound: never exported
    lock: threading.Lock = field(default_factory=threading.Lock)


class _CountingExporter(SpanExporter):
    """Wraps the real exporter: spans it receives leave the gate's queue; failures are counted."""

    def __init__(self, inner: SpanExporter, stats: SpanStats) -> None:
        self.inner = inner
        self.stats = stats

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        n = len(spans)
        with self.stats.lock:
            self.stats.queued -= n
        try:
            result = self.inner.export(spans)
        except Exception:  # an exporter that raises is a failed export, never a crashed export thread
            result = SpanExportResult.FAILURE
        if getattr(self.inner, "counts_itself", False):  # it reports delivery later (the export process)
            return result
        with self.stats.lock:
            if result == SpanExportResult.SUCCESS:
                self.stats.exported += n
            else:
                self.stats.failed += n
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self.inner.force_flush(timeout_millis)


class Gate(SpanProcessor):
    """A bounded queue in front of a BatchSpanProcessor: at most `max_queue` finished spans wait for
    export; a span over that is dropped and counted instead of growing memory or waiting."""

    def __init__(self, exporter: SpanExporter, max_queue: int, stats: SpanStats,
                 schedule_delay_millis: float = 500) -> None:
        self.stats = stats
        self.max_queue = max_queue
        self.exporter = _CountingExporter(exporter, stats)
        # The processor's own queue is larger than the gate's, so it never drops a span the gate let by.
        self.batch = BatchSpanProcessor(self.exporter, max_queue_size=max_queue + 1,
                                        max_export_batch_size=min(512, max_queue),
                                        schedule_delay_millis=schedule_delay_millis)

    def on_start(self, span: Span, parent_context: otel_context.Context | None = None) -> None:
        return None

    def on_end(self, span: ReadableSpan) -> None:
        with self.stats.lock:
            if self.stats.queued >= self.max_queue:
                self.stats.dropped += 1
                return
            self.stats.queued += 1
        self.batch.on_end(span)

    def shutdown(self) -> None:
        self.batch.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        # The batch processor never flushes its exporter, and an exporter may deliver after export() returns.
        return self.batch.force_flush(timeout_millis) and self.exporter.force_flush(timeout_millis)


def otlp_exporter(environ: dict[str, str] | None = None) -> SpanExporter:
    """The OTLP span exporter the standard variables ask for: `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`, else
    `OTEL_EXPORTER_OTLP_PROTOCOL` (`http/protobuf`, the default, or `grpc`). The exporter itself reads the
    endpoint, headers, timeout, compression and certificates from `OTEL_EXPORTER_OTLP_[TRACES_]*`."""
    env = os.environ if environ is None else environ
    protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf").strip().lower()
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
        except ImportError:
            raise ConfigError("OTLP over gRPC needs the grpc exporter, which is not installed",
                              fix="pip install 'opentelemetry-exporter-otlp-proto-grpc', or set "
                                  "OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf") from None
        return GrpcExporter()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
        return HttpExporter()
    raise ConfigError(f"OTLP protocol {protocol!r} is not supported",
                      fix="set OTEL_EXPORTER_OTLP_PROTOCOL (or OTEL_EXPORTER_OTLP_TRACES_PROTOCOL) to "
                          "`http/protobuf` or `grpc`")


def resource() -> Resource:
    """`service.name` keel and Keel's version, overridden by `OTEL_RESOURCE_ATTRIBUTES` and `OTEL_SERVICE_NAME`."""
    return Resource.create({"service.name": "keel", "service.version": __version__}).merge(
        OTELResourceDetector().detect())


@dataclass
class Tracing:
    """Keel's tracer (not installed globally, so tests and replicas stay independent) and its span counts."""

    tracer: trace.Tracer
    provider: TracerProvider
    stats: SpanStats
    stages: bool = True  # `trace_detail: stages`

    @property
    def enabled(self) -> bool:
        return type(self.tracer) is not trace.NoOpTracer

    def shutdown(self) -> None:
        self.provider.shutdown()

    @contextlib.contextmanager
    def root(self, name: str, **attributes: Any) -> Iterator[trace.Span | None]:
        """A span that starts a trace of its own (a workflow run), current while the block runs; with
        tracing off, nothing. Spans opened inside with `span()` are its children."""
        if not self.enabled:
            yield None
            return
        with self.tracer.start_as_current_span(name, context=otel_context.Context(), attributes=attributes,
                                               record_exception=False, set_status_on_exception=False) as s:
            token = otel_context.attach(otel_context.set_value(_FINE, self.stages or None,
                                                               otel_context.set_value(_TRACER, self.tracer)))
            try:
                yield s
            except BaseException as exc:
                fail(s, exc)
                raise
            finally:
                otel_context.detach(token)


def make_tracing(exporter: str, data_dir: Path, queue_size: int = 2048, detail: str = "stages") -> Tracing:
    """Tracing for the `trace_exporter` setting; with nowhere to send spans, a NoOpTracer, which the
    gateway takes as "make no spans". The sampler is the SDK's, from `OTEL_TRACES_SAMPLER`."""
    stats = SpanStats()
    if exporter == "none":
        return Tracing(trace.NoOpTracer(), TracerProvider(resource=resource(), sampler=ALWAYS_OFF), stats)
    provider = TracerProvider(resource=resource())
    if exporter == "jsonl":
        provider.add_span_processor(Gate(JSONLSpanExporter(data_dir / "traces.jsonl"), queue_size, stats,
                                         schedule_delay_millis=200))
    elif exporter == "console":
        provider.add_span_processor(Gate(ConsoleSpanExporter(), queue_size, stats))
    elif exporter == "otlp":
        otlp_exporter().shutdown()  # a bad protocol or a missing exporter package fails here, at start
        provider.add_span_processor(Gate(ProcessExporter(stats), queue_size, stats))
    else:
        raise ConfigError(f"trace exporter {exporter!r} is unknown", fix="use none, otlp, jsonl or console")
    return Tracing(provider.get_tracer("keel", __version__), provider, stats, stages=detail == "stages")


def make_tracer(exporter: str, data_dir: Path) -> tuple[trace.Tracer, TracerProvider]:
    """The tracer and its provider alone (see `make_tracing`)."""
    t = make_tracing(exporter, data_dir)
    return t.tracer, t.provider


# -- spans inside a request -------------------------------------------------------------------------------
def current_tracer() -> trace.Tracer | None:
    """Keel's tracer when the running code is inside a traced request or run, else None."""
    return otel_context.get_value(_TRACER)  # type: ignore[return-value]


class _Child:
    """A child span of the current one, current until the block ends (a third of the SDK's
    `start_as_current_span` cost, which stacks three generator context managers)."""

    __slots__ = ("span", "token")

    def __init__(self, tracer: trace.Tracer, name: str, attributes: dict[str, Any] | None,
                 kind: trace.SpanKind) -> None:
        self.span = tracer.start_span(name, kind=kind, attributes=attributes)
        self.token: object = None

    def __enter__(self) -> trace.Span:
        self.token = otel_context.attach(trace.set_span_in_context(self.span))
        return self.span

    def __exit__(self, _type: Any, exc: BaseException | None, _tb: Any) -> None:
        if exc is not None:
            fail(self.span, exc)
        otel_context.detach(self.token)  # type: ignore[arg-type]
        self.span.end()


_NOTHING: contextlib.nullcontext[None] = contextlib.nullcontext()


def span(name: str, attributes: dict[str, Any] | None = None, kind: trace.SpanKind = trace.SpanKind.INTERNAL,
         stage: bool = False) -> contextlib.AbstractContextManager[trace.Span | None]:
    """A child span of the current one, current inside the block; nothing (`None`) outside a traced request,
    under a span that is not recorded (sampled out), or for a `stage` span when `trace_detail` is `calls`.
    An exception leaving the block marks the span as failed with the error's code."""
    tracer = otel_context.get_value(_TRACER)
    if tracer is None or (stage and otel_context.get_value(_FINE) is None) \
            or not trace.get_current_span().is_recording():
        return _NOTHING
    return _Child(tracer, name, attributes, kind)  # type: ignore[arg-type]


@contextlib.contextmanager
def activate(s: trace.Span, tracer: trace.Tracer, stages: bool | None = None) -> Iterator[None]:
    """Make `s` the current span (and the tracer reachable by `span()`) while the block runs; `stages` sets
    whether stage spans are made inside (None: as the enclosing request or run says)."""
    ctx = otel_context.set_value(_TRACER, tracer, trace.set_span_in_context(s))
    if stages is not None:
        ctx = otel_context.set_value(_FINE, stages or None, ctx)
    token = otel_context.attach(ctx)
    try:
        yield
    finally:
        otel_context.detach(token)


def fail(s: trace.Span, exc: BaseException) -> None:
    """Mark `s` failed: `error.type` is a KeelError's stable code (a client gone: `cancelled`)."""
    code = getattr(exc, "code", None)
    if not isinstance(code, str):
        code = "cancelled" if type(exc).__name__ in ("CancelledError", "GeneratorExit") else type(exc).__name__
    s.set_attribute("error.type", code)
    s.set_status(trace.Status(trace.StatusCode.ERROR, code))


def content(messages: Any) -> str:
    """Prompt or completion content as one span attribute: JSON, cut at CONTENT_MAX characters."""
    text = orjson.dumps(messages, default=str).decode()
    return text if len(text) <= CONTENT_MAX else text[:CONTENT_MAX] + "…"


def annotate(attributes: dict[str, Any]) -> None:
    """Set `attributes` on the current span, if one is recording (None values are left out)."""
    s = trace.get_current_span()
    if s.is_recording():
        s.set_attributes({k: v for k, v in attributes.items() if v is not None})
