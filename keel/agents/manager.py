"""Agents as a capability: define versioned mandates, pause and resume them, start runs and read their
action log. A run is acknowledged only after its row and its DBOS workflow exist."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace
from typing import Any

import orjson
import sqlalchemy as sa

from keel.agents.access import (definitions_visible, mandate_owner, may_change, require_agent_scope,
                                require_team_for_runs, runs_visible)
from keel.agents.errors import AgentPaused
from keel.agents.loop import agent_workflow
from keel.agents.mandate import Mandate, parse_mandate
from keel.agents.store import FINAL, STATUSES, SWITCH_TTL_S, AgentStore
from keel.agents.tables import agent_runs, agent_versions
from keel.core.clock import iso, utcnow
from keel.core.errors import BadRequest, Conflict, Forbidden, KeelError, NotFound
from keel.core.ids import new_id
from keel.identity import service as identity
from keel.identity.principal import Principal
from keel.workflows.durable import Durable
from keel.workflows.waits import WAITING, public as public_wait

log = logging.getLogger("keel.agents")
WAIT_POLL_S = 0.2  # how often a waiting caller reads the run's status (a run that waits for a person answers 202)


class Agents:
    """The API behind `/v1/agents…` and `keel agents …`."""

    def __init__(self, store: AgentStore, durable: Durable, vault: Any, mcp: Any = None, *,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.agent_store, self.durable, self.vault = store, durable, vault
        self.sleep = sleep  # how a pause waits out the replicas' trusted reads
        self.mcp = mcp  # keel.agents.mcp_client.McpClients: checks a mandate's MCP servers when it is defined
        self.store = store.store

    # -- mandates -------------------------------------------------------------------------------
    @staticmethod
    def _prev(conn: sa.Connection, name: str) -> Any:
        return conn.execute(sa.select(agent_versions).where(agent_versions.c.name == name)
                            .order_by(agent_versions.c.version.desc()).limit(1)).first()

    def define(self, source: str, p: Principal, *, team_id: str | None = None) -> dict[str, Any]:
        """Validate and store a new version (an unchanged mandate keeps its version); only its owner may, and
        every secret its tools send must be one the owner team may use as a header."""
        p.require("agents.define")
        m = parse_mandate(source)
        requested = identity.get_team(self.store, team_id)["id"] if team_id is not None else None
        with self.store.read() as conn:
            prev = self._prev(conn, m.name)
        team = mandate_owner(p, m.name, prev.team_id if prev else None, prev is not None, requested)
        for secret, field, use in m.secret_refs():
            self.vault.check(secret, team, use, field=field, agent=m.name)
        if self.mcp is not None:
            self.mcp.check(m)
        with self.store.engine.begin() as conn:
            prev = self._prev(conn, m.name)
            if team != mandate_owner(p, m.name, prev.team_id if prev else None, prev is not None, requested):
                raise Conflict(f"agent {m.name!r} changed owner meanwhile", fix="send it again", agent=m.name)
            if prev is not None and prev.source == source:
                return self._public(prev, m, created=False)
            row = {"id": new_id("agv"), "name": m.name, "version": (prev.version + 1) if prev else 1, "source": source,
                   "description": m.description, "team_id": team, "owner": p.to_dict(), "created_at": utcnow()}
            conn.execute(agent_versions.insert().values(**row))
        self.agent_store.remember(row["id"], m)
        self.agent_store.audit("agent.defined", p.user_id or p.key_id, team, agent=m.name, version=row["version"])
        return self._public(SimpleNamespace(**row), m, created=True)

    def _public(self, r: Any, m: Mandate | None = None, *, created: bool) -> dict[str, Any]:
        m = m or self.agent_store.mandate(r.id)
        return {"object": "agent", "name": r.name, "version": r.version, "description": r.description,
                "team_id": r.team_id, "created": created, "created_at": iso(r.created_at), "model": m.model,
                "goal": m.goal, "collections": list(m.collections), "tools": sorted(m.tools),
                "approvals": [a.tool for a in m.approvals],
                "budgets": {"steps": m.budgets.steps, "tokens": m.budgets.tokens, "cost": m.budgets.cost,
                            "wall_time_s": m.budgets.wall_time_s},
                "paused": self.agent_store.paused(r.name)}

    def list(self, p: Principal) -> list[dict[str, Any]]:
        sub = (sa.select(agent_versions.c.name, sa.func.max(agent_versions.c.version).label("v"))
               .group_by(agent_versions.c.name).subquery())
        q = (sa.select(agent_versions).join(sub, sa.and_(sub.c.name == agent_versions.c.name,
                                                         sub.c.v == agent_versions.c.version))
             .where(definitions_visible(p, agent_versions.c.team_id)).order_by(agent_versions.c.name))
        with self.store.read() as conn:
            rows = conn.execute(q).all()
        return [self._public(r, created=False) for r in rows if p.may_use_agent(r.name)]

    def get(self, name: str, p: Principal) -> dict[str, Any]:
        r = self.agent_store.latest(name, p)
        return dict(self._public(r, created=False), source=r.source)

    def any_defined(self) -> bool:
        with self.store.read() as conn:
            return conn.execute(sa.select(agent_versions.c.id).limit(1)).first() is not None

    def set_paused(self, name: str, p: Principal, paused: bool, reason: str | None = None) -> dict[str, Any]:
        """The kill switch: a paused agent starts no run, and its runs take no further action (each action checks
        the switch first, on every replica). A pause returns only once no replica trusts a read of the switch from
        before it (`SWITCH_TTL_S`); a resume at once."""
        r = self.agent_store.latest(name, p)
        may_change(p, name, r.team_id)
        self.agent_store.set_paused(name, paused, p.user_id or p.key_id, reason)
        committed = time.monotonic()
        self.agent_store.audit("agent.paused" if paused else "agent.resumed", p.user_id or p.key_id, r.team_id,
                               agent=name, reason=reason)
        if paused and (left := SWITCH_TTL_S - (time.monotonic() - committed)) > 0:
            self.sleep(left)  # the acknowledgement's promise; this runs in a worker thread (routes, console)
        return {"object": "agent", "name": name, "paused": paused}

    # -- runs -----------------------------------------------------------------------------------
    async def start(self, name: str, task: str, p: Principal, *, wait_s: float = 60.0,
                    user: str | None = None) -> dict[str, Any]:
        """Record the run, start its durable loop, and wait up to `wait_s` for it to end (or wait for a person).
        `user`: the end user the run is for (their thread, under `memory: {thread: user}`); a person's own key
        or session is always that person."""
        p.require("agents.run")
        require_team_for_runs(p)
        if p.user_id is not None and user not in (None, p.user_id):
            raise Forbidden(f"a run for user {user!r} cannot be started with {p.user_id}'s own credentials",
                            fix="omit `user` (the run is yours), or start it with the application's key")
        if p.user_id is None and user is not None and await asyncio.to_thread(identity.user_exists, self.store, user):
            raise Forbidden(f"{user!r} is a Keel user: a run for them is started with their own key or session only",
                            fix="name the application's own end user (not a Keel user id), or omit `user`")
        user = user or p.user_id
        ver = await asyncio.to_thread(self.agent_store.latest, name, p)
        if await asyncio.to_thread(self.agent_store.paused, name):
            raise AgentPaused(f"agent {name!r} is paused", fix=f"resume it: keel agents resume {name}", agent=name)
        now = utcnow()
        row = {"id": new_id("arun"), "agent": name, "version": ver.version, "version_id": ver.id, "status": "running",
               "task": task, "answer": None, "error": None, "principal": p.to_dict(),
               "team_id": ver.team_id if ver.team_id is not None else p.team_id, "created_at": now,
               "updated_at": now, "finished_at": None, "user_id": user}
        await asyncio.to_thread(self.agent_store.insert_run, row)
        handle = await self._launch(row["id"])
        await asyncio.to_thread(self.agent_store.audit, "agent.run.started", p.user_id or p.key_id, row["team_id"],
                                agent=name, run_id=row["id"], version=ver.version)
        await self._wait(handle, row["id"], wait_s)
        return await asyncio.to_thread(self.detail, name, row["id"], p)

    async def _wait(self, handle: Any, run_id: str, wait_s: float) -> None:
        """Until the run ends, waits for a person, or `wait_s` passes (the run itself goes on: the wait is
        shielded, and the status is read from the store, so a run executing on another worker counts too)."""
        loop = asyncio.get_running_loop()
        result = asyncio.ensure_future(asyncio.shield(handle.get_result()))
        deadline = loop.time() + wait_s
        while (left := deadline - loop.time()) > 0:
            done, _ = await asyncio.wait({result}, timeout=min(left, WAIT_POLL_S))
            if done or await asyncio.to_thread(self._status, run_id) in ("waiting_approval", WAITING, *FINAL):
                break
        if not result.done():
            result.cancel()  # only the shield's outer future: the run is not touched

    def _status(self, run_id: str) -> str | None:
        with self.store.read() as conn:
            return conn.execute(sa.select(agent_runs.c.status).where(agent_runs.c.id == run_id)).scalar()

    async def _launch(self, run_id: str) -> Any:
        return await self.durable.begin(agent_workflow(), run_id)  # here, or queued for a worker (role api)

    def _run_row(self, name: str, run_id: str, p: Principal) -> Any:
        require_agent_scope(p, name)
        with self.store.read() as conn:
            r = conn.execute(sa.select(agent_runs).where(agent_runs.c.id == run_id, agent_runs.c.agent == name,
                                                         runs_visible(p, agent_runs.c.team_id))).first()
        if r is None:
            raise NotFound(f"run {run_id} of agent {name!r} not found",
                           fix=f"list runs with GET /v1/agents/{name}/runs", run_id=run_id)
        return r

    @staticmethod
    def _public_run(r: Any) -> dict[str, Any]:
        """The run; `waiting` is its provider wait now (status `waiting_provider`: the alias, why, the next try),
        `waits` every provider wait it made (the loop keeps both in the row's `error`, with no `code` unless failed)."""
        held = r.error if isinstance(r.error, dict) else {}
        error = {k: v for k, v in held.items() if k != "waits"} if "code" in held else None
        return {"id": r.id, "object": "agent_run", "agent": r.agent, "version": r.version, "status": r.status,
                "task": r.task, "answer": r.answer, "error": error, "team_id": r.team_id, "user": r.user_id,
                "waiting": public_wait(held.get("waiting")) if r.status == WAITING else None,
                "waits": list(held.get("waits") or []),
                "created_at": iso(r.created_at), "updated_at": iso(r.updated_at), "finished_at": iso(r.finished_at)}

    async def resume_run(self, name: str, run_id: str, p: Principal) -> dict[str, Any]:
        """End a run's provider wait now: the model call is tried again at once (and waits again if refused)."""
        p.require("agents.run")
        r = await asyncio.to_thread(self._run_row, name, run_id, p)
        wait = r.error.get("waiting") if isinstance(r.error, dict) else None
        if r.status != WAITING or not wait:
            raise Conflict(f"run {run_id} is {r.status}, not waiting for a provider",
                           fix=f"resume only runs listed by GET /v1/agents/{name}/runs?status=waiting_provider",
                           run_id=run_id)
        topic = wait["topic"]
        await self.durable.send(run_id, {"by": p.user_id or p.key_id}, topic=topic,
                                idempotency_key=f"{run_id}.{topic}")
        await asyncio.to_thread(self.agent_store.audit, "agent.run.resumed", p.user_id or p.key_id, r.team_id,
                                agent=name, run_id=run_id, waiting_for=wait.get("for"))
        return dict(self._public_run(r), resumed=True)

    def runs(self, name: str, p: Principal, status: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        self.agent_store.latest(name, p)
        q = (sa.select(agent_runs).where(agent_runs.c.agent == name, runs_visible(p, agent_runs.c.team_id))
             .order_by(agent_runs.c.created_at.desc()).limit(max(1, min(limit, 500))))
        if status:
            if status not in STATUSES:
                raise BadRequest(f"unknown status {status!r}", fix=f"use one of {', '.join(STATUSES)}")
            q = q.where(agent_runs.c.status == status)
        with self.store.read() as conn:
            return [self._public_run(r) for r in conn.execute(q).all()]

    def detail(self, name: str, run_id: str, p: Principal) -> dict[str, Any]:
        """The run with its action log: every action, allowed or refused, with its rule, tokens and cost."""
        out = self._public_run(self._run_row(name, run_id, p))
        actions = self.agent_store.actions(run_id)
        out["actions"] = [{"seq": a["seq"], "kind": a["kind"], "tool": a["tool"], "arguments": a["arguments"],
                           "decision": a["decision"], "rule": a["rule"], "detail": a["detail"], "result": a["result"],
                           "tokens": a["tokens"], "cost": a["cost"], "principal": a["principal"],
                           "version": a["version"], "at": iso(a["created_at"])} for a in actions]
        out["usage"] = {"steps": sum(1 for a in actions if a["kind"] == "model" and a["decision"] == "allowed"),
                        "tokens": sum(a["tokens"] for a in actions), "cost": sum(a["cost"] for a in actions)}
        return out

    async def events(self, name: str, run_id: str, p: Principal, *, wait_s: float) -> AsyncIterator[bytes]:
        """Server-sent events: `action` for each action as it is logged, then `run` (the run without its actions)
        once it ends, waits for a person, or `wait_s` passes."""
        loop = asyncio.get_running_loop()
        deadline, sent = loop.time() + wait_s, 0
        while True:
            d = await asyncio.to_thread(self.detail, name, run_id, p)
            for a in d["actions"][sent:]:
                yield b"event: action\ndata: " + orjson.dumps(a) + b"\n\n"
            sent = len(d["actions"])
            if d["status"] != "running" or loop.time() >= deadline:
                d.pop("actions")
                yield b"event: run\ndata: " + orjson.dumps(d) + b"\n\n"
                return
            await asyncio.sleep(WAIT_POLL_S)

    # -- start-up -------------------------------------------------------------------------------
    def load_dir(self, path: Path, owner: Principal) -> list[str]:
        """Define every `*.yaml` in `path` (a bad file is logged with its location and skipped)."""
        loaded = []
        for f in sorted(path.glob("*.yaml")):
            try:
                loaded.append(self.define(f.read_text(), owner)["name"])
            except KeelError as exc:
                log.error("agent mandate not loaded", extra={"file": str(f), "error": exc.detail})
        return loaded

    async def relaunch_orphans(self) -> int:
        """Start the loop of any acknowledged run that has no DBOS workflow (a crash between the two writes)."""
        n = 0
        for run_id in await asyncio.to_thread(self.agent_store.unfinished):
            if not await self.durable.exists(run_id):
                await self._launch(run_id)
                n += 1
        return n
