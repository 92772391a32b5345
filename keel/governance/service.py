"""Build governance and attach it to the app: stages for the gateway, the audit hook, routes, background work.

    deployments = gateway_service.deployments(settings, store, vault)
    gov = governance_service.build(settings, store, deployments)
    gateway = gateway_service.build(settings, store, deployments, obs, stages=gov.stages, allow=gov.allow)
    gov.attach(app)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from keel.core.db import Store
from keel.core.outbound import Outbound
from keel.core.settings import DeploymentConfig, Settings
from keel.gateway.deployments import Deployments
from keel.gateway.pipeline import Call
from keel.governance import routes
from keel.governance.audit import AuditLog
from keel.governance.events import GuardEventLog
from keel.governance.policy import loader
from keel.governance.policy.loader import PolicySource
from keel.governance.reviews import ReviewQueue
from keel.governance.stages import GuardStage, PolicyGuards, PolicyStage
from keel.governance.teams import TeamClassifications

log = logging.getLogger("keel.governance")

Candidates = Callable[[str], list[DeploymentConfig]]


class Governance:
    """The named singletons of governance, created once by the app factory. `candidates(alias)` gives the
    deployments behind a model alias (the policy stage and `/v1/policy/test` judge them)."""

    def __init__(self, store: Store, policy_file: Path | None, reload_interval_s: float,
                 candidates: Candidates = lambda _alias: [], *, outbound: Outbound) -> None:
        self.store = store
        self.audit = AuditLog(store)
        self.policy = PolicySource(store, policy_file, self.audit)
        self.reload_interval_s = reload_interval_s
        self.reviews = ReviewQueue(store, outbound)
        self.events = GuardEventLog(store)
        self.teams = TeamClassifications(store)
        self.candidates = candidates
        self.stages = [PolicyStage(self.policy, self.teams, candidates, self.audit),
                       GuardStage(self.policy, PolicyGuards(), os.urandom(32), self.reviews, self.events, self.audit)]
        self._tasks: list[asyncio.Task[None]] = []

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

    def attach(self, app: Any) -> None:
        """Wire into the app: audit hook, routes, start/stop with the server."""
        app.state.audit = self.audit
        app.state.governance = self
        changes = getattr(app.state, "changes", None)
        if changes is not None:  # a policy activated by another process is taken here at once
            changes.subscribe(loader.TOPIC, self.policy.refresh)
        app.include_router(routes.router)
        app.state.lifecycle.startup.append(self.start)
        app.state.lifecycle.shutdown.append(self.stop)


def build(settings: Settings, store: Store, deployments: Deployments | None = None, *,
          policy_file: Path | None = None, reload_interval_s: float | None = None,
          outbound: Outbound | None = None) -> Governance:
    """Governance for this process; a bad policy file raises ConfigError before the port is bound.
    `deployments` are the gateway's (the policy judges the deployments behind each alias); review webhooks
    go out through `outbound`, the process's one outbound HTTP stack (by default made from `settings`)."""
    path = policy_file or getattr(settings, "policy_file", None)
    interval = reload_interval_s or getattr(settings, "policy_reload_interval_s", 2.0)
    candidates: Candidates = (lambda _alias: []) if deployments is None else _candidates(deployments)
    return Governance(store, Path(path) if path else None, float(interval), candidates,
                      outbound=outbound or Outbound.from_settings(settings))


def _candidates(deployments: Deployments) -> Candidates:
    def candidates(alias: str) -> list[DeploymentConfig]:
        deployments.maybe_reload()
        return deployments.for_alias(alias)
    return candidates
