"""The export process sends what the in-process exporter would have sent: spans that cross the pipe encode to
the same OTLP protobuf, and the child's acknowledgements keep /metrics' span counts true."""

from __future__ import annotations

import threading

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from keel.observe.export_process import ProcessExporter, dump, load
from keel.observe.tracing import SpanStats, resource
from tests.observe.otlp_receiver import HttpReceiver

from conftest import eventually


class Keep(SpanExporter):
    def __init__(self) -> None:
        self.spans: list = []

    def export(self, spans):  # type: ignore[no-untyped-def]
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS


def finished_spans() -> list:
    kept = Keep()
    provider = TracerProvider(resource=resource())
    provider.add_span_processor(SimpleSpanProcessor(kept))
    tracer = provider.get_tracer("keel", "1.2.3")
    remote = trace.SpanContext(0xABCDEF0123456789ABCDEF0123456789, 0x1122334455667788, is_remote=True,
                               trace_flags=trace.TraceFlags(1), trace_state=trace.TraceState([("vendor", "x=1")]))
    with tracer.start_as_current_span("POST /v1/chat/completions", context=trace.set_span_in_context(
            trace.NonRecordingSpan(remote)), kind=trace.SpanKind.SERVER,
            attributes={"http.request.method": "POST", "keel.attempt": 2, "ok": True, "ratio": 0.5}) as root:
        root.add_event("retry", {"keel.deployment": "cloud-1"})
        with tracer.start_as_current_span("chat gpt", kind=trace.SpanKind.CLIENT,
                                          links=[trace.Link(remote, {"why": "batch"})]) as child:
            child.set_attribute("gen_ai.response.finish_reasons", ["stop", "length"])
            child.set_status(trace.Status(trace.StatusCode.ERROR, "upstream_timeout"))
    return kept.spans


def test_spans_through_the_pipe_encode_to_the_same_otlp_bytes() -> None:
    spans = finished_spans()
    again = load(dump(spans), resource())
    assert encode_spans(again).SerializeToString(deterministic=True) == \
        encode_spans(spans).SerializeToString(deterministic=True)
    assert again[1].parent.is_remote and not again[0].parent.is_remote  # the caller's span is remote


def test_the_child_exports_to_a_collector_and_acknowledges_what_it_delivered(monkeypatch) -> None:
    receiver = HttpReceiver()
    receiver.start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    stats = SpanStats()
    exporter = ProcessExporter(stats)
    try:
        spans = finished_spans()
        assert exporter.export(spans) == SpanExportResult.SUCCESS
        assert exporter.force_flush(20_000)
        assert stats.exported == 2 and stats.failed == 0
        names = {s["name"] for s in receiver.spans}
        assert names == {"POST /v1/chat/completions", "chat gpt"}
    finally:
        exporter.shutdown()
        receiver.stop()


def test_a_dead_collector_is_counted_as_failed_and_a_killed_child_is_replaced(monkeypatch) -> None:
    from conftest import free_port

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")
    stats = SpanStats()
    exporter = ProcessExporter(stats)
    try:
        spans = finished_spans()
        exporter.export(spans)
        eventually(lambda: stats.failed == 2 or None, timeout=30)
        first = exporter.child
        assert first is not None
        first.kill()
        first.wait()
        eventually(lambda: exporter.export(spans) == SpanExportResult.SUCCESS or None, timeout=10)
        assert exporter.child is not first and exporter.child.poll() is None
        assert threading.active_count() < 50
    finally:
        exporter.shutdown()
