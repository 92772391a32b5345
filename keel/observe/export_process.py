"""OTLP export in a child process, off the interpreter that serves requests.

Turning finished spans into OTLP protobuf costs ~50 µs per span in the SDK's encoder (measured here against
~25 µs for the span itself), and the export thread holds the GIL while it encodes: with every stage traced
it took a third of the serving process's Python time (py-spy, `bench/observe.py`). Here the batch
processor's thread only writes each batch as one length-prefixed JSON frame to a child process
(`python -m keel.observe.export_process`), which rebuilds the SDK's `ReadableSpan`s and exports them with
the exporter the standard `OTEL_EXPORTER_OTLP_*` variables ask for (`tracing.otlp_exporter`), acknowledging
each batch so the span counts on /metrics stay true. The child reads the same environment, so the resource
and endpoint are the parent's; it ends when its input closes (Keel stopped or was killed).

    parent ─ frame [span, …] ─► child: ReadableSpans → OTLPSpanExporter.export → "ok N" / "fail N"
           ─ frame {"flush": n} ─► child: "flushed n" once every earlier frame is exported
"""

from __future__ import annotations

import itertools
import logging
import os
import struct
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import IO, Any

import orjson
from opentelemetry import trace
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

log = logging.getLogger("keel.observe")

_HEADER = struct.Struct("!I")
_KINDS = list(trace.SpanKind)
_CODES = list(trace.StatusCode)


def dump(spans: Sequence[ReadableSpan]) -> bytes:
    """Finished spans as one JSON frame body: what `load` needs to rebuild them, nothing else."""
    out = []
    for s in spans:
        ctx, parent, scope = s.context, s.parent, s.instrumentation_scope
        out.append((
            s.name, format(ctx.trace_id, "032x"), format(ctx.span_id, "016x"), int(ctx.trace_flags),
            ctx.trace_state.to_header() if ctx.trace_state else "",
            (format(parent.span_id, "016x"), parent.is_remote) if parent is not None else None,
            s.kind.value, s.start_time, s.end_time, dict(s.attributes or {}),
            (s.status.status_code.value, s.status.description),
            [(e.name, e.timestamp, dict(e.attributes or {})) for e in s.events],
            [(format(lk.context.trace_id, "032x"), format(lk.context.span_id, "016x"), int(lk.context.trace_flags),
              dict(lk.attributes or {})) for lk in s.links],
            (scope.name, scope.version) if scope is not None else None,
        ))
    return orjson.dumps(out, default=str)


def load(body: bytes, resource: Any) -> list[ReadableSpan]:
    """The spans of one frame, as the SDK's `ReadableSpan`s under `resource`."""
    spans = []
    for (name, tid, sid, flags, state, parent, kind, start, end, attrs, status, events, links,
         scope) in orjson.loads(body):
        trace_id = int(tid, 16)
        ctx = trace.SpanContext(trace_id, int(sid, 16), is_remote=False, trace_flags=trace.TraceFlags(flags),
                                trace_state=trace.TraceState.from_header([state]) if state else None)
        parent_ctx = None
        if parent is not None:
            parent_ctx = trace.SpanContext(trace_id, int(parent[0], 16), is_remote=parent[1],
                                           trace_flags=trace.TraceFlags(flags))
        spans.append(ReadableSpan(
            name, ctx, parent_ctx, resource, attrs,
            events=[Event(n, a, timestamp=ts) for n, ts, a in events],
            links=[trace.Link(trace.SpanContext(int(t, 16), int(p, 16), is_remote=True,
                                                trace_flags=trace.TraceFlags(f)), a) for t, p, f, a in links],
            kind=_KINDS[kind], status=trace.Status(_CODES[status[0]], status[1]), start_time=start,
            end_time=end, instrumentation_scope=InstrumentationScope(*scope) if scope else None))
    return spans


class ProcessExporter(SpanExporter):
    """A `SpanExporter` that hands each batch to the export child (started on the first batch, restarted if
    it died) and counts what the child reports into `stats` (`exported`, `failed`); `counts_itself` tells
    the counting wrapper to leave those two counts alone. A batch that cannot be handed over is failed."""

    counts_itself = True

    def __init__(self, stats: Any, command: Sequence[str] | None = None) -> None:
        self.stats = stats
        self.command = list(command or (sys.executable, "-m", "keel.observe.export_process"))
        self._proc: subprocess.Popen[bytes] | None = None
        self._write_lock = threading.Lock()
        self._acked = threading.Condition()
        self._flushed = 0
        self._ids = itertools.count(1)
        self._closed = False

    @property
    def child(self) -> subprocess.Popen[bytes] | None:
        """The export process, once the first batch started it."""
        return self._proc

    def _child(self) -> subprocess.Popen[bytes]:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            proc = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=os.environ.copy())
            threading.Thread(target=self._read_acks, args=(proc.stdout,), name="keel-otlp-acks", daemon=True).start()
            self._proc = proc
        return proc

    def _send(self, body: bytes) -> bool:
        with self._write_lock:
            if self._closed:
                return False
            try:
                stdin = self._child().stdin
                assert stdin is not None
                stdin.write(_HEADER.pack(len(body)) + body)
                stdin.flush()
                return True
            except (OSError, ValueError) as exc:  # the child died under us: the next batch starts another
                log.warning("span export process unavailable", extra={"error": str(exc)})
                return False

    def _read_acks(self, out: IO[bytes]) -> None:
        for line in out:
            what, _, n = line.decode().partition(" ")
            if what == "flushed":
                with self._acked:
                    self._flushed = max(self._flushed, int(n))
                    self._acked.notify_all()
                continue
            with self.stats.lock:
                if what == "ok":
                    self.stats.exported += int(n)
                else:
                    self.stats.failed += int(n)
        with self._acked:  # the child is gone: nobody waits for a flush it will never report
            self._flushed = sys.maxsize
            self._acked.notify_all()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._send(dump(spans)):
            return SpanExportResult.SUCCESS
        with self.stats.lock:
            self.stats.failed += len(spans)
        return SpanExportResult.FAILURE

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Wait until the child has exported every batch handed to it so far."""
        if self._proc is None:
            return True
        n = next(self._ids)
        with self._acked:
            self._flushed = min(self._flushed, n - 1)
        if not self._send(orjson.dumps({"flush": n})):
            return False
        with self._acked:
            return self._acked.wait_for(lambda: self._flushed >= n, timeout_millis / 1000)

    def shutdown(self, timeout_millis: int = 10_000) -> None:
        """Close the child's input; it exports what it holds and exits (killed past the timeout)."""
        with self._write_lock:
            self._closed = True
            proc = self._proc
            if proc is None:
                return
            try:
                assert proc.stdin is not None
                proc.stdin.close()
            except OSError:
                pass
        try:
            proc.wait(timeout_millis / 1000)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _read_frame(stream: IO[bytes]) -> bytes | None:
    head = stream.read(_HEADER.size)
    if len(head) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(head)
    body = stream.read(size)
    return body if len(body) == size else None


def main() -> None:
    """The child: export each frame's spans, acknowledge it, until the input closes."""
    from keel.observe.tracing import otlp_exporter, resource

    exporter, res = otlp_exporter(), resource()
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    try:
        while (body := _read_frame(stdin)) is not None:
            if body[:1] == b"{":
                stdout.write(b"flushed %d\n" % orjson.loads(body)["flush"])
            else:
                spans = load(body, res)
                try:
                    ok = exporter.export(spans) == SpanExportResult.SUCCESS
                except Exception:  # an exporter that raises failed this batch; the next one is tried
                    log.exception("span export failed")
                    ok = False
                stdout.write(b"%s %d\n" % (b"ok" if ok else b"fail", len(spans)))
            stdout.flush()
    finally:
        exporter.shutdown()


if __name__ == "__main__":
    main()
