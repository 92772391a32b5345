"""Build governance and attach it to the app: stages for the gateway, the audit hook, routes, background work.

    gov = governance_service.build(settings, store)
    gateway = gateway_service.build(settings, store, vault, obs, stages=gov.stages)
    gov.attach(app, gateway)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

import sqlalchemy as sa
from starlette.concurrency import run_in_threadpool

from keel.core.db import Store
from keel.core.errors import NotFound
from keel.core.settings import DeploymentConfig, Settings
from keel.gateway.pipeline import Call
from keel.governance import guards as guard_registry
from keel.governance.audit import AuditLog
from keel.governance.events import GuardEventLog
from keel.governance.guards.base import Guard
from keel.governance.policy.engine import PolicyEngine
from keel.governance.policy.loader import PolicySource
from keel.governance.reviews import ReviewQueue
from keel.governance.stages import GuardStage, PolicyStage
from keel.identity import service as identity

log = logging.getLogger("keel.governance")
TEAM_CACHE_S = 5.0


class Governance:
    """The named singletons of governance, created once by the app factory."""

    def __init__(self, store: Store, policy_file: Path | None, reload_interval_s: float) -> None:
        self.store = store
        self.audit = AuditLog(store)
        self.policy = PolicySource(store, policy_file, self.audit)
        self.reload_interval_s = reload_interval_s
        self.reviews = ReviewQueue(store)
        self.events = GuardEventLog(store)
        self.secret = os.urandom(32)  # placeholder HMAC key; placeholders never outlive one process
        self.candidates: Callable[[str], list[DeploymentConfig]] = lambda _alias: []
        self.stages = [PolicyStage(self), GuardStage(self)]
        self._guards: tuple[int, dict[str, Guard]] | None = None
        self._teams: dict[str, tuple[float, str | None]] = {}
        self._team_reads: dict[str, asyncio.Task[None]] = {}
        self._tasks: list[asyncio.Task[None]] = []

    # -- used by the stages -----------------------------------------------------------------
    def guards_for(self, engine: PolicyEngine) -> dict[str, Guard]:
        """Guard instances configured by this policy version (rebuilt when the policy changes)."""
        if self._guards is None or self._guards[0] != engine.version:
            p = engine.policy
            self._guards = (engine.version, {
                "pii": guard_registry.build("pii", entities=p.pii.entities),
                "secrets": guard_registry.build("secrets"),
                "injection": guard_registry.build("injection", threshold=p.injection.threshold),
            })
        return self._guards[1]

    async def team_classification(self, team_id: str | None) -> str | None:
        """The team's default classification, cached for TEAM_CACHE_S: an entry past half of that is
        re-read in the background while requests go on with it (a team in use never waits on the store);
        one past the whole time is never used."""
        if team_id is None:
            return None
        hit = self._teams.get(team_id)
        now = time.monotonic()
        if hit is not None and hit[0] > now:
            if hit[0] - now < TEAM_CACHE_S / 2 and team_id not in self._team_reads:
                task = asyncio.get_running_loop().create_task(self._refresh_team(team_id))
                self._team_reads[team_id] = task
                task.add_done_callback(lambda _t: self._team_reads.pop(team_id, None))
            return hit[1]
        return await self._read_team(team_id)

    async def _refresh_team(self, team_id: str) -> None:
        try:
            await self._read_team(team_id)
        except Exception:  # the entry runs out on its own; the next request past it reads the store itself
            log.exception("re-reading a team's classification failed", extra={"team_id": team_id})

    async def _read_team(self, team_id: str) -> str | None:
        started = time.monotonic()
        try:
            value = (await run_in_threadpool(identity.get_team, self.store, team_id))["classification"]
        except NotFound:
            value = None
        self._teams[team_id] = (started + TEAM_CACHE_S, value)
        return value

    async def audit_async(self, action: str, call: Call, **details: Any) -> None:
        await asyncio.to_thread(self.audit.record, action, call.principal.key_id, call.principal.team_id,
                                request_id=call.request_id, **details)

    def allow(self, call: Call, cfg: DeploymentConfig) -> bool:
        """The router's `allow` hook: may this call's data reach `cfg`? Asked for primaries and fallbacks."""
        engine = self.policy.engine
        decision = call.annotations.get("policy_decision")
        if decision is None:  # a path without the policy stage: judge by what the call itself says
            decision = engine.decide(explicit=call.metadata.get("classification"),
                                     collections=call.annotations.get("collections"))
            call.annotations["policy_decision"] = decision
        return engine.forbidding_rule(decision, cfg) is None

    def allowed_deployments(self, call: Call, candidates: list[DeploymentConfig]) -> list[DeploymentConfig]:
        """The candidates (primary or fallback) this call's data may reach."""
        return [c for c in candidates if self.allow(call, c)]

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        await self.events.start()
        self._tasks.append(asyncio.create_task(self.policy.watch(self.reload_interval_s), name="keel-policy"))
        self._tasks.append(asyncio.create_task(self._purge_loop(), name="keel-review-retention"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.reviews.close()
        await self.events.stop()

    async def _purge_loop(self) -> None:
        while True:
            try:
                n = await asyncio.to_thread(self.reviews.purge_expired)
                if n:
                    log.info("review content past retention purged", extra={"count": n})
            except sa.exc.SQLAlchemyError:  # the store may be briefly away; retention retries next hour
                log.exception("review retention purge failed")
            await asyncio.sleep(3600)

    def attach(self, app: Any, gateway: Any) -> None:
        """Wire into the app: audit hook, candidate lookup, routes, start/stop with the server."""
        from keel.governance import routes

        deployments = gateway.deployments

        def candidates(alias: str) -> list[DeploymentConfig]:
            deployments.maybe_reload()
            return deployments.for_alias(alias)

        self.candidates = candidates
        app.state.audit = self.audit
        app.state.governance = self
        app.include_router(routes.router)
        app.state.lifecycle.startup.append(self.start)
        app.state.lifecycle.shutdown.append(self.stop)


def build(settings: Settings, store: Store, *, policy_file: Path | None = None,
          reload_interval_s: float | None = None) -> Governance:
    """Governance for this process; a bad policy file raises ConfigError before the port is bound."""
    path = policy_file or getattr(settings, "policy_file", None)
    interval = reload_interval_s or getattr(settings, "policy_reload_interval_s", 2.0)
    return Governance(store, Path(path) if path else None, float(interval))
