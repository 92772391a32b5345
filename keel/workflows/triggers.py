"""Triggers besides the API: signed inbound webhooks and cron schedules. Both start runs as the
workflow's owner (`trigger_principal`: the principal that defined the version, within the workflow's
team) and are recorded in the audit trail.

A webhook carries `X-Keel-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`
with the secret from the vault entry its trigger names — one the workflow's owner may use as a
`webhook` key (checked on every delivery); old timestamps are refused (replay). A
delivery id (`Idempotency-Key` header) makes a redelivered webhook return the same run.
A schedule's run id is derived from its due time, so replicas checking the same schedule start it once.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from datetime import UTC, datetime
from typing import Any

from croniter import croniter

from keel.core.errors import KeelError, NotFound, Unauthorized
from keel.core.tasks import stop_task
from keel.identity.principal import Principal
from keel.workflows.access import trigger_principal
from keel.workflows.manager import Workflows

log = logging.getLogger("keel.workflows.triggers")


def sign(secret: str, body: bytes, ts: int | None = None) -> str:
    """The signature header value a sender computes (used by tests and `keel` clients)."""
    t = int(time.time()) if ts is None else ts
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify(secret: str, body: bytes, header: str | None, tolerance_s: float) -> None:
    parts = dict(p.split("=", 1) for p in (header or "").split(",") if "=" in p)
    refuse = Unauthorized("webhook signature missing or invalid",
                          fix="send X-Keel-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, '<t>.<body>')>")
    try:
        t = int(parts["t"])
    except (KeyError, ValueError):
        raise refuse from None
    if abs(time.time() - t) > tolerance_s:
        raise Unauthorized("webhook signature is too old or from the future",
                           fix=f"sign with the current time (tolerance {int(tolerance_s)} s)")
    expected = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, parts.get("v1", "")):
        raise refuse


async def webhook(svc: Workflows, name: str, body: bytes, inputs: Any, signature: str | None,
                  delivery: str | None, tolerance_s: float) -> dict[str, Any]:
    """Check the signature against the workflow's webhook triggers and start a run."""
    not_found = Unauthorized("webhook signature missing or invalid", fix="check the workflow name and secret")
    try:
        ver = await asyncio.to_thread(svc.latest, name)
    except NotFound:
        raise not_found from None
    spec = svc.run_store.spec(ver.id)
    secrets = [t.config["secret"] for t in spec.triggers if t.type == "webhook"]
    if not secrets:
        raise not_found  # same answer as a bad signature: the endpoint does not reveal which workflows exist
    for secret_name in secrets:
        try:
            secret = await asyncio.to_thread(svc.vault.resolve, secret_name, ver.team_id, "webhook")
        except KeelError as exc:
            log.error("webhook secret not usable", extra={"workflow": name, "secret": secret_name, "error": exc.detail})
            continue
        try:
            verify(secret, body, signature, tolerance_s)
        except Unauthorized:
            continue
        owner = trigger_principal(ver)
        run_id = None
        if delivery:
            run_id = "run_hook_" + hashlib.sha256(f"{name}\0{delivery}".encode()).hexdigest()[:24]
        return await svc.start(name, inputs, owner, trigger="webhook", run_id=run_id)
    raise not_found


class Scheduler:
    """Checks cron triggers every `interval` seconds and starts the runs that fell due since the last check."""

    def __init__(self, svc: Workflows, interval: float) -> None:
        self.svc, self.interval = svc, interval
        self._last = time.time()
        self._task: asyncio.Task[None] | None = None

    async def tick(self, now: float | None = None) -> list[str]:
        now = time.time() if now is None else now
        started = []
        for wf in await asyncio.to_thread(self._scheduled):
            ver, spec = wf
            for t in (t for t in spec.triggers if t.type == "schedule"):
                it = croniter(t.config["cron"], datetime.fromtimestamp(self._last, UTC))
                due = it.get_next(float)
                if due > now:
                    continue
                while True:  # only the latest missed time runs: a long outage does not start a backlog
                    nxt = it.get_next(float)
                    if nxt > now:
                        break
                    due = nxt
                run_id = f"run_cron_{spec.name}_{int(due)}"
                try:
                    await self.svc.start(spec.name, t.config.get("inputs") or {}, trigger_principal(ver),
                                         trigger="schedule", run_id=run_id)
                    started.append(run_id)
                except KeelError as exc:
                    log.error("scheduled run not started", extra={"workflow": spec.name, "error": exc.detail})
        self._last = now
        return started

    def _scheduled(self) -> list[tuple[Any, Any]]:
        admin = Principal(key_id="system", role="admin")
        out = []
        for item in self.svc.list(admin):
            if "schedule" in item["triggers"]:
                ver = self.svc.latest(item["name"])
                out.append((ver, self.svc.run_store.spec(ver.id)))
        return out

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.tick()
            except Exception:  # supervised: a store hiccup must not end scheduling
                log.exception("schedule check failed")

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="keel-workflow-schedules")

    async def stop(self) -> None:
        await stop_task(self._task)
