"""Workflows wired into the app: the run store, the engine and the API object built from their parts,
the routes mounted, DBOS and the schedules started and stopped with the server."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from keel.core.roles import Heartbeats, executes_runs
from keel.identity.principal import Principal
from keel.workflows import routes
from keel.workflows.manager import Workflows
from keel.workflows.runtime import Engine
from keel.workflows.store import RunStore
from keel.workflows.triggers import Scheduler

log = logging.getLogger("keel.workflows")
__all__ = ["Workflows", "attach"]


def attach(app: Any, settings: Any, store: Any, gateway: Any, knowledge: Any) -> Workflows:
    """Wire workflows into the app: DBOS starts with the server (recovering unfinished runs), spec
    files load, schedules tick; on shutdown schedules stop and DBOS lets go before providers close."""
    runs = RunStore(store, audit=app.state.audit)
    engine = Engine(settings, runs, gateway, knowledge, app.state.vault, app.state.observe)
    svc = Workflows(runs, engine.durable, app.state.vault)
    scheduler = Scheduler(svc, settings.workflow_schedule_interval_s)
    system = Principal(key_id="system", role="admin")

    # Processes that execute runs on a shared PostgreSQL record heartbeats and take over dead ones' runs.
    beats = Heartbeats(store, settings.workflow_executor_id, settings.role, interval_s=settings.worker_heartbeat_s,
                       takeover_s=settings.worker_takeover_s, on_dead=engine.durable.take_over) \
        if executes_runs(settings.role) and store.dialect == "postgresql" else None

    async def start() -> None:
        if settings.workflows_dir and Path(settings.workflows_dir).is_dir():
            await asyncio.to_thread(svc.load_dir, Path(settings.workflows_dir), system)
        if not executes_runs(settings.role):
            return  # role api: runs are queued for workers, which also run the schedules
        await scheduler.start()
        if beats is not None:
            await beats.start()
        if settings.role != "worker" and not await asyncio.to_thread(svc.any_defined):
            return  # DBOS starts with the first definition (a worker's at once: it takes runs from the queue)
        await engine.durable.ensure_launched()  # recovers unfinished runs
        n = await svc.relaunch_orphans()
        if n:
            log.warning("relaunched acknowledged runs that had no durable workflow", extra={"count": n})

    async def stop() -> None:
        await scheduler.stop()
        if beats is not None:
            await beats.stop()
        await engine.close()

    app.state.workflows = svc
    app.state.lifecycle.startup.append(start)
    app.state.lifecycle.shutdown.append(stop)
    app.include_router(routes.router)
    return svc
