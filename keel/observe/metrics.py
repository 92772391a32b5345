"""Prometheus metrics, served at `GET /metrics` in the text format (prometheus-client).

Request metrics come from the usage ledger's rows as they are written (`Metrics.observe_row`, the
ledger's observer), so /metrics and the ledger can never disagree on what a request used. Gauges that
describe state (circuit breakers, queue depths, span export) are read when scraped.

One registry per app, not the library's global one. One process per server holds: `keel serve` runs a
single process, and replicas scale out as separate servers, each scraped as its own target (Prometheus
sums over instances). Queue depths are read from the shared store, so every replica reports the same.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from keel.core.db import Store
from keel.observe.tracing import SpanStats

log = logging.getLogger("keel.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# Refusals a caller sees as a specific error code, by reason.
REFUSALS = {"budget_exceeded": "budget", "rate_limited": "rate_limit", "policy_denied": "policy",
            "guard_blocked": "guard", "review_pending": "review"}
CIRCUIT_STATES = ("closed", "open", "half_open")


class Metrics:
    """Keel's instruments and the scrape-time readers; `render()` is the /metrics body.

    >>> m = Metrics()
    >>> m.observe_row({"kind": "chat", "alias": "a", "status": "ok", "tokens_in": 3, "tokens_out": 2,
    ...                "cost": 0.0, "latency_ms": 12.0})
    >>> b"keel_requests_total" in m.render()
    True
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("keel_requests", "Model calls metered, by outcome",
                                ["kind", "alias", "deployment", "team", "status"], registry=r)
        self.errors = Counter("keel_request_errors", "Model calls that failed, by error code",
                              ["alias", "team", "code", "http_status"], registry=r)
        self.refusals = Counter("keel_refusals", "Calls Keel refused: budget, rate_limit, policy, guard, review",
                                ["reason", "alias", "team"], registry=r)
        self.latency = Histogram("keel_request_duration_seconds", "Model call latency, end to end",
                                 ["kind", "alias"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("keel_time_to_first_token_seconds", "Streamed calls: time to the first token",
                              ["alias"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("keel_tokens", "Tokens metered, by direction (input, output)",
                              ["team", "alias", "deployment", "direction"], registry=r)
        self.cost = Counter("keel_cost_dollars", "Cost metered, in dollars", ["team", "alias", "deployment"],
                            registry=r)
        self.cache_hits = Counter("keel_cache_hits", "Calls answered from the response cache", ["alias"], registry=r)
        self.cache_saved = Counter("keel_cache_saved_dollars", "Cost the cache saved, in dollars", ["alias"],
                                   registry=r)
        self.guard_findings = Counter("keel_guard_findings", "Guard findings on metered calls, by guard and type",
                                      ["guard", "type"], registry=r)
        self._per_key: dict[tuple[Any, ...], tuple[Any, ...]] = {}
        self._failed_once = False

    # -- the ledger's observer (in its flushing thread: a dict lookup and a few increments per row) -----
    def observe_row(self, row: dict[str, Any]) -> None:
        """Count one ledger row. Never raises into the request: a failure is logged once."""
        try:
            self._observe(row)
        except Exception:
            if not self._failed_once:
                self._failed_once = True
                log.exception("a metrics update failed; the request is unaffected")

    def _observe(self, row: dict[str, Any]) -> None:
        kind, alias, status = row["kind"], row.get("alias") or "", row["status"]
        team, deployment = row.get("team_id") or "", row.get("deployment") or ""
        key = (kind, alias, deployment, team, status)
        children = self._per_key.get(key)
        if children is None:
            children = self._per_key[key] = (
                self.requests.labels(kind, alias, deployment, team, status), self.latency.labels(kind, alias),
                self.tokens.labels(team, alias, deployment, "input"),
                self.tokens.labels(team, alias, deployment, "output"), self.cost.labels(team, alias, deployment))
        requests, latency, tokens_in, tokens_out, cost = children
        requests.inc()
        latency.observe(row.get("latency_ms", 0.0) / 1000)
        if row.get("tokens_in"):
            tokens_in.inc(row["tokens_in"])
        if row.get("tokens_out"):
            tokens_out.inc(row["tokens_out"])
        if row.get("cost"):
            cost.inc(row["cost"])
        if row.get("ttft_ms") is not None:
            self.ttft.labels(alias).observe(row["ttft_ms"] / 1000)
        if row.get("cache_hit"):
            self.cache_hits.labels(alias).inc()
            if row.get("saved_cost"):
                self.cache_saved.labels(alias).inc(row["saved_cost"])
        code = row.get("error_code")
        if code is not None:
            self.errors.labels(alias, team, code, str(row.get("http_status", ""))).inc()
            reason = REFUSALS.get(code)
            if reason is not None:
                self.refusals.labels(reason, alias, team).inc()
        meta = row.get("meta")
        guards = meta.get("keel_guards") if isinstance(meta, dict) else None
        if guards:
            for name, n in guards.items():
                guard, _, kind_ = name.partition(".")
                self.guard_findings.labels(guard, kind_).inc(n)

    # -- read when scraped -------------------------------------------------------------------------------
    def watch_circuits(self, snapshot: Callable[[], dict[str, dict[str, Any]]]) -> None:
        """Report each deployment's breaker from `snapshot()` (the router's) at scrape time."""
        self.registry.register(_Circuits(snapshot))

    def watch_spans(self, stats: SpanStats) -> None:
        """Report what became of finished trace spans: exported, failed, dropped over the queue bound."""
        self.registry.register(_Spans(stats))

    def watch_queues(self, store: Store, queues: dict[str, tuple[sa.Table, tuple[str, ...]]],
                     max_age_s: float = 2.0) -> None:
        """Report `keel_queue_depth{queue, status}`: for each queue, a table with a `status` column and its
        unfinished statuses, the rows in each (zero included)."""
        self.registry.register(_Queues(store, queues, max_age_s))

    def render(self) -> bytes:
        """The text exposition of every metric; reads the store, so call it off the event loop."""
        return generate_latest(self.registry)


class _Circuits:
    def __init__(self, snapshot: Callable[[], dict[str, dict[str, Any]]]) -> None:
        self.snapshot = snapshot

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        state = GaugeMetricFamily("keel_circuit_state", "1 for each deployment's current breaker state",
                                  labels=["deployment", "state"])
        failures = GaugeMetricFamily("keel_circuit_consecutive_failures", "Consecutive failures while closed",
                                     labels=["deployment"])
        in_flight = GaugeMetricFamily("keel_deployment_in_flight", "Calls in flight per deployment",
                                      labels=["deployment"])
        snap: dict[str, dict[str, Any]] = {}
        for _ in range(3):  # the event loop may add a deployment while a scrape thread reads
            try:
                snap = self.snapshot()
                break
            except RuntimeError:
                continue
        for did, st in sorted(snap.items()):
            for s in CIRCUIT_STATES:
                state.add_metric([did, s], 1.0 if st.get("circuit") == s else 0.0)
            failures.add_metric([did], float(st.get("failures", 0)))
            in_flight.add_metric([did], float(st.get("in_flight", 0)))
        yield state
        yield failures
        yield in_flight


class _Spans:
    def __init__(self, stats: SpanStats) -> None:
        self.stats = stats

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        with s.lock:
            values = (s.exported, s.failed, s.dropped, s.queued)
        yield CounterMetricFamily("keel_trace_spans_exported", "Spans the exporter delivered", value=values[0])
        yield CounterMetricFamily("keel_trace_spans_export_failed", "Spans the exporter could not deliver",
                                  value=values[1])
        yield CounterMetricFamily("keel_trace_spans_dropped", "Spans dropped: the export queue was full",
                                  value=values[2])
        yield GaugeMetricFamily("keel_trace_spans_queued", "Spans waiting for export", value=values[3])


class _Queues:
    """Unfinished rows per status of each queue table, cached for `max_age_s` so scrapes stay cheap."""

    def __init__(self, store: Store, queues: dict[str, tuple[sa.Table, tuple[str, ...]]], max_age_s: float) -> None:
        self.store = store
        self.queues = queues
        self.max_age_s = max_age_s
        self._cached: tuple[float, list[tuple[str, str, int]]] | None = None

    def describe(self) -> list[Metric]:
        return []

    def _read(self) -> list[tuple[str, str, int]]:
        now = time.monotonic()
        if self._cached is not None and now - self._cached[0] < self.max_age_s:
            return self._cached[1]
        rows: list[tuple[str, str, int]] = []
        with self.store.engine.connect() as conn:
            for name, (table, open_) in self.queues.items():
                status = table.c.status
                counts = dict(conn.execute(sa.select(status, sa.func.count()).where(status.in_(open_))
                                           .group_by(status)).all())
                rows += [(name, s, int(counts.get(s, 0))) for s in open_]
        self._cached = (now, rows)
        return rows

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily("keel_queue_depth", "Unfinished items per queue and status "
                                  "(ingest jobs, workflow runs, pending approvals and reviews)",
                                  labels=["queue", "status"])
        try:
            rows = self._read()
        except sa.exc.SQLAlchemyError:
            log.warning("queue depths could not be read for /metrics", exc_info=True)
            rows = []
        for name, status, n in rows:
            depth.add_metric([name, status], float(n))
        yield depth
