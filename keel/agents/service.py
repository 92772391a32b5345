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
from keel.agents.mandate import parse_mandate
from keel.agents.mcp_client import McpClients
from keel.agents.store import AgentStore
from keel.agents.tools import ToolParts
from keel.core.errors import ConfigError, KeelError
from keel.core.outbound import Outbound
from keel.identity.principal import Principal
from keel.workflows.effects import Egress, Mailer
from keel.workflows.steps import StepParts

log = logging.getLogger("keel.agents")
__all__ = ["Agents", "attach", "check_dir"]
DEFAULT_DIR = Path("agents")


def attach(app: Any, settings: Any, store: Any, gateway: Any, knowledge: Any) -> Agents:
    """Wire agents into the app, after workflows (they share its DBOS launch and its approvals)."""
    workflows = app.state.workflows
    agent_store = AgentStore(store, audit=app.state.audit)
    egress = Egress(outbound=Outbound.from_settings(settings))
    mcp = McpClients(settings.mcp_commands, outbound=egress.outbound)
    flush = app.state.observe.ledger.flush
    approval_parts = StepParts(runs=workflows.run_store, gateway=gateway, knowledge=knowledge, vault=app.state.vault,
                               egress=egress, mailer=Mailer(None), model_slots=asyncio.Semaphore(1),
                               flush_ledger=flush)
    AgentEngine(agent_store, gateway, ToolParts(store=agent_store, knowledge=knowledge, vault=app.state.vault,
                                                egress=egress, mcp=mcp, workflows=workflows), approval_parts, flush,
                model_slots=settings.workflow_model_concurrency, tracing=app.state.observe.tracing)
    svc = Agents(agent_store, workflows.durable, app.state.vault, mcp=mcp)
    system = Principal(key_id="system", role="admin")
    folder: Path | None = settings.agents_dir
    if folder is not None:  # defined now: a broken or refused mandate stops the start before the port binds
        define_all(svc, check_dir(folder), system)

    async def start() -> None:
        if folder is None and DEFAULT_DIR.is_dir():  # unset: ./agents of the start directory, a broken file skipped
            await asyncio.to_thread(svc.load_dir, DEFAULT_DIR, system)
        if settings.role != "api" and await asyncio.to_thread(agent_store.unfinished):  # api: workers run them
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


def check_dir(folder: Path) -> list[tuple[Path, str]]:
    """Each `*.yaml` in the `agents_dir` folder with its text, every one a valid mandate; the first that is not
    raises ConfigError naming the file, and the line, column and field of its first problem."""
    files = []
    for f in sorted(folder.glob("*.yaml")):
        try:
            text = f.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"agent mandate {f} cannot be read: {exc}", fix="make it a readable UTF-8 file",
                              file=str(f)) from None
        try:
            parse_mandate(text)
        except KeelError as exc:
            raise ConfigError(f"agent mandate {f}: {exc.detail}", fix=f"correct the file ({exc.fix}) or move it out "
                              f"of agents_dir {folder}", file=str(f), errors=exc.ids.get("errors")) from None
        files.append((f, text))
    return files


def define_all(svc: Agents, files: list[tuple[Path, str]], owner: Principal) -> None:
    """Define the checked mandates of `agents_dir`; one refused now (e.g. a secret not granted) stops the start."""
    for f, text in files:
        try:
            svc.define(text, owner)
        except KeelError as exc:
            raise ConfigError(f"agent mandate {f}: {exc.detail}", fix=exc.fix, file=str(f)) from None
