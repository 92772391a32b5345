"""Build the observability services the app factory wires in: the ledger writer, tracing and metrics."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import start_http_server

from keel.core.db import Store
from keel.core.settings import Settings
from keel.observe.drift import DriftMonitor
from keel.observe.ledger import Ledger
from keel.observe.metrics import Metrics
from keel.observe.spool import Spool
from keel.observe.tracing import Tracing, make_tracing

log = logging.getLogger("keel.observe")


@dataclass
class Observe:
    ledger: Ledger
    tracing: Tracing
    metrics: Metrics
    metrics_server: Any = None  # the unauthenticated listener of `metrics_bind`, when set
    drift: DriftMonitor = field(default_factory=DriftMonitor)  # live traffic's drift signals (keel.observe.drift)

    @property
    def tracer(self) -> trace.Tracer:
        return self.tracing.tracer

    @property
    def tracer_provider(self) -> TracerProvider:
        return self.tracing.provider

    async def start(self) -> None:
        await self.ledger.start()

    async def stop(self) -> None:
        await self.ledger.stop()
        if self.metrics_server is not None:
            await asyncio.to_thread(self.metrics_server.shutdown)
            self.metrics_server.server_close()
        # The batch processor's last export, off the event loop: bounded by the exporter's timeout.
        await asyncio.to_thread(self.tracing.shutdown)


def build(settings: Settings, store: Store) -> Observe:
    tracing = make_tracing(settings.trace_exporter, settings.data_dir, settings.trace_queue_size,
                           settings.trace_detail)
    metrics = Metrics()
    metrics.watch_spans(tracing.stats)
    drift = DriftMonitor(settings.drift_window, settings.drift_reference)

    def observe_row(row: dict[str, Any]) -> None:  # each written ledger row: metrics, then drift's signals
        metrics.observe_row(row)
        drift.observe_row(row)

    ledger = Ledger(store, settings.ledger_flush_interval_s, settings.ledger_batch_size, observer=observe_row,
                    spool=Spool(Path(settings.data_dir) / "spool" / "ledger"))
    return Observe(ledger=ledger, tracing=tracing, metrics=metrics, drift=drift)


def watch(obs: Observe, settings: Settings, store: Store, circuits: Any,
          queues: dict[str, tuple[Any, tuple[str, ...]]]) -> None:
    """What /metrics reads when scraped: `circuits()` (the router's breaker snapshot, if there is a router)
    and the queue tables; then the unauthenticated listener of `metrics_bind`, if set."""
    if circuits is not None:
        obs.metrics.watch_circuits(circuits)
    obs.metrics.watch_queues(store, queues)
    if settings.metrics_bind:
        host, _, port = settings.metrics_bind.rpartition(":")
        server, _thread = start_http_server(int(port), host.strip("[]"), registry=obs.metrics.registry)
        obs.metrics_server = server
        log.info("metrics listener started", extra={"bind": settings.metrics_bind})
