"""Agents wired into the app: the store, the loop and the API object built from their parts, the routes
mounted, mandate files loaded and unfinished runs resumed with the server."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from keel.agents import routes
from keel.agents.loop import AgentEngine
from keel.agents.manager import Agents
from keel.agents.store import AgentStore
from keel.agents.tools import ToolParts
from keel.core.outbound import Outbound
from keel.identity.principal import Principal
from keel.workflows.effects import Egress, Mailer
from keel.workflows.steps import StepParts

log = logging.getLogger("keel.agents")
__all__ = ["Agents", "attach"]


def attach(app: Any, settings: Any, store: Any, gateway: Any, knowledge: Any) -> Agents:
    """Wire agents into the app, after workflows (they share its DBOS launch and its approvals)."""
    workflows = app.state.workflows
    agent_store = AgentStore(store, audit=app.state.audit)
    egress = Egress(outbound=Outbound.from_settings(settings))
    flush = app.state.observe.ledger.flush
    approval_parts = StepParts(runs=workflows.run_store, gateway=gateway, knowledge=knowledge, vault=app.state.vault,
                               egress=egress, mailer=Mailer(None), model_slots=asyncio.Semaphore(1),
                               flush_ledger=flush)
    AgentEngine(agent_store, gateway, ToolParts(store=agent_store, knowledge=knowledge, vault=app.state.vault,
                                                egress=egress), approval_parts, flush,
                model_slots=settings.workflow_model_concurrency, tracing=app.state.observe.tracing)
    svc = Agents(agent_store, workflows.durable, app.state.vault)
    system = Principal(key_id="system", role="admin")
    folder = getattr(settings, "agents_dir", Path("agents"))

    async def start() -> None:
        if folder and Path(folder).is_dir():
            await asyncio.to_thread(svc.load_dir, Path(folder), system)
        if await asyncio.to_thread(agent_store.unfinished):
            await workflows.durable.ensure_launched()  # recovers unfinished runs
            n = await svc.relaunch_orphans()
            if n:
                log.warning("relaunched acknowledged agent runs that had no durable workflow", extra={"count": n})

    async def stop() -> None:
        await egress.close()

    app.state.agents = svc
    app.state.lifecycle.startup.append(start)
    app.state.lifecycle.shutdown.append(stop)
    app.include_router(routes.router)
    return svc
