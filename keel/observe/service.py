"""Build the observability services the app factory wires in: the ledger writer and the tracer."""

from __future__ import annotations

from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from keel.core.db import Store
from keel.core.settings import Settings
from keel.observe.ledger import Ledger
from keel.observe.tracing import make_tracer


@dataclass
class Observe:
    ledger: Ledger
    tracer: trace.Tracer
    tracer_provider: TracerProvider

    async def start(self) -> None:
        await self.ledger.start()

    async def stop(self) -> None:
        await self.ledger.stop()
        self.tracer_provider.shutdown()


def build(settings: Settings, store: Store) -> Observe:
    tracer, provider = make_tracer(settings.trace_exporter, settings.data_dir)
    ledger = Ledger(store, settings.ledger_flush_interval_s, settings.ledger_batch_size)
    return Observe(ledger=ledger, tracer=tracer, tracer_provider=provider)
