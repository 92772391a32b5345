"""The drift watch: runs the detectors every `drift_interval_s`; a signal that starts drifting is written to
the audit log (`drift.detected`) and POSTed to `drift_webhook_url` through Keel's one outbound HTTP stack."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from keel.core.clock import utcnow
from keel.core.http1 import WireError
from keel.core.outbound import Outbound
from keel.core.tasks import stop_task
from keel.core.webhook import post_json_once
from keel.observe.drift import DriftMonitor

log = logging.getLogger("keel.drift")


class DriftWatch:
    """The alerting loop around a `DriftMonitor`; `tick()` is one round (tests call it directly)."""

    def __init__(self, monitor: DriftMonitor, interval_s: float, *, webhook_url: str | None = None,
                 outbound: Outbound | None = None, audit: Callable[..., Any] | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.monitor, self.interval_s, self.webhook_url = monitor, interval_s, webhook_url
        self.outbound, self.audit, self.sleep = outbound, audit, sleep
        self._tls = outbound.ssl_context("drift alert webhook") if outbound is not None and webhook_url else None
        self.alerts: deque[dict[str, Any]] = deque(maxlen=100)  # the latest, newest last
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="keel-drift")

    async def stop(self) -> None:
        await stop_task(self._task)

    async def _loop(self) -> None:
        while True:
            await self.sleep(self.interval_s)
            try:
                await self.tick()
            except Exception:  # a failed round must not end the watch; the next one tries again
                log.exception("drift check failed")

    async def tick(self) -> list[dict[str, Any]]:
        """Run every detector once; alert for each signal that started drifting. Returns the new alerts."""
        statuses = await asyncio.to_thread(self.monitor.check, True)
        new = []
        for s in statuses:
            if not s.get("new"):
                continue
            event = {"type": "drift.detected", "signal": s["signal"], "test": s["test"], "statistic": s["statistic"],
                     "p_value": s["p_value"], "alpha": s["alpha"], "reference_n": s["reference_n"],
                     "recent_n": s["recent_n"], "ts": utcnow().isoformat()}
            event.update({k: s[k] for k in ("reference_rate", "recent_rate", "reference_median", "recent_median")
                          if k in s})
            log.warning("drift detected", extra={"signal": s["signal"], "p_value": s["p_value"]})
            self.alerts.append(event)
            if self.audit is not None:
                await asyncio.to_thread(self.audit, action="drift.detected", actor="keel",
                                        **{k: v for k, v in event.items() if k != "type"})
            if self.webhook_url and self.outbound is not None:
                event["delivery"] = await self._post(self.webhook_url, event)
            new.append(event)
        return new

    async def _post(self, url: str, event: dict[str, Any]) -> str:
        try:
            status = await post_json_once(self.outbound, self._tls, url, event, timeout_s=10)  # type: ignore[arg-type]
            return f"http {status}"
        except (WireError, TimeoutError, OSError, ValueError) as exc:
            log.warning("drift alert webhook failed", extra={"signal": event["signal"], "error": type(exc).__name__})
            return f"failed: {type(exc).__name__}"
