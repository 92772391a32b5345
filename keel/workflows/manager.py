"""Workflows as a capability: define versioned specs, start and inspect runs, cancel and retry them.

A run is acknowledged only after its row and its DBOS workflow exist; at start the engine also
re-launches any acknowledged run whose DBOS workflow is missing (a crash between the two writes).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import sqlalchemy as sa

from keel.core.clock import iso, utcnow
from keel.core.errors import BadRequest, Conflict, KeelError, NotFound
from keel.core.ids import new_id
from keel.identity import service as identity
from keel.identity.principal import Principal
from keel.observe.tables import usage_ledger
from keel.workflows.access import definition_owner, definitions_visible, require_team_for_runs, runs_visible
from keel.workflows.durable import Durable
from keel.workflows.spec import WorkflowSpec, parse_spec, secret_refs, validate_inputs
from keel.workflows.store import FINAL, STATUSES, RunStore
from keel.workflows.tables import workflow_outbox, workflow_records, workflow_runs, workflow_versions
from keel.workflows.waits import WAITING, public as public_wait

log = logging.getLogger("keel.workflows")


class Workflows:
    """The API behind `/v1/workflows…`, `/v1/approvals…` and the CLI."""

    def __init__(self, runs: RunStore, durable: Durable, vault: Any) -> None:
        self.run_store, self.durable, self.vault = runs, durable, vault
        self.store = runs.store

    # -- definitions ----------------------------------------------------------------------
    def latest(self, name: str, p: Principal | None = None) -> Any:
        return self.run_store.latest(name, p)

    def _resolve(self, name: str, p: Principal) -> WorkflowSpec | None:
        try:
            return self.run_store.spec(self.latest(name, p).id)
        except NotFound:
            return None

    @staticmethod
    def _prev(conn: sa.Connection, name: str) -> Any:
        return conn.execute(sa.select(workflow_versions).where(workflow_versions.c.name == name)
                            .order_by(workflow_versions.c.version.desc()).limit(1)).first()

    def define(self, source: str, p: Principal, *, team_id: str | None = None) -> dict[str, Any]:
        """Validate and store a new version (an unchanged spec keeps its version). Only the owner may: a
        global workflow's admins, a team's builders; every secret it names must be its owner's to use."""
        p.require("workflows.define")
        spec = parse_spec(source, resolve_workflow=lambda name: self._resolve(name, p))
        requested = identity.get_team(self.store, team_id)["id"] if team_id is not None else None
        with self.store.read() as conn:
            prev = self._prev(conn, spec.name)
        team = definition_owner(p, spec.name, prev.team_id if prev else None, prev is not None, requested)
        for secret, field, use in secret_refs(spec):
            self.vault.check(secret, team, use, field=field, workflow=spec.name)
        with self.store.engine.begin() as conn:
            prev = self._prev(conn, spec.name)
            if team != definition_owner(p, spec.name, prev.team_id if prev else None, prev is not None, requested):
                raise Conflict(f"workflow {spec.name!r} changed owner meanwhile", fix="send it again",
                               workflow=spec.name)
            if prev is not None and prev.source == source:
                return self._public_version(prev, created=False)
            row = {"id": new_id("wfv"), "name": spec.name, "version": (prev.version + 1) if prev else 1,
                   "source": source, "description": spec.description, "team_id": team, "owner": p.to_dict(),
                   "created_at": utcnow()}
            conn.execute(workflow_versions.insert().values(**row))
        self.run_store.remember(row["id"], spec)
        self._audit("workflow.defined", p, row["team_id"], workflow=spec.name, version=row["version"])
        return self._public_version(SimpleNamespace(**row), created=True)

    def _public_version(self, r: Any, *, created: bool) -> dict[str, Any]:
        spec = self.run_store.spec(r.id)
        return {"object": "workflow", "name": r.name, "version": r.version, "description": r.description,
                "team_id": r.team_id, "created": created, "created_at": iso(r.created_at),
                "inputs": spec.inputs_schema, "steps": [{"id": s.id, "type": s.type} for s in spec.steps],
                "triggers": [t.type for t in spec.triggers]}

    def any_defined(self) -> bool:
        with self.store.read() as conn:
            return conn.execute(sa.select(workflow_versions.c.id).limit(1)).first() is not None

    def list(self, p: Principal) -> list[dict[str, Any]]:
        sub = (sa.select(workflow_versions.c.name, sa.func.max(workflow_versions.c.version).label("v"))
               .group_by(workflow_versions.c.name).subquery())
        q = (sa.select(workflow_versions).join(sub, sa.and_(sub.c.name == workflow_versions.c.name,
                                                            sub.c.v == workflow_versions.c.version))
             .where(definitions_visible(p, workflow_versions.c.team_id)).order_by(workflow_versions.c.name))
        with self.store.read() as conn:
            rows = conn.execute(q).all()
        return [self._public_version(r, created=False) for r in rows]

    def get(self, name: str, p: Principal) -> dict[str, Any]:
        r = self.latest(name, p)
        out = self._public_version(r, created=False)
        out["source"] = r.source
        return out

    # -- runs -----------------------------------------------------------------------------
    async def start(self, name: str, inputs: Any, p: Principal, *, trigger: str = "api", run_id: str | None = None,
                    actor: Principal | None = None, seed: dict[str, Any] | None = None,
                    retry_of: str | None = None, version_id: str | None = None,
                    team_id: Any = ...) -> dict[str, Any]:
        """Record the run and start its durable workflow; idempotent for a given `run_id`. The run belongs to
        the workflow's team, or for a global workflow to the caller's (`team_id`: a retry keeps its run's)."""
        p.require("workflows.run")
        require_team_for_runs(p)
        ver = await asyncio.to_thread(self.latest, name, p) if version_id is None else \
            await asyncio.to_thread(self.run_store.version, version_id)
        team = team_id if team_id is not ... else ver.team_id if ver.team_id is not None else p.team_id
        spec = await asyncio.to_thread(self.run_store.spec, ver.id)
        inputs = {} if inputs is None else inputs
        validate_inputs(spec, inputs)
        run_id = run_id or new_id("run")
        now = utcnow()
        row = {"id": run_id, "workflow": spec.name, "version": ver.version, "version_id": ver.id, "status": "running",
               "current_step": None, "inputs": inputs, "outputs": None, "error": None,
               "principal": p.to_dict(), "team_id": team,
               "trigger": trigger, "parent_run": None, "retry_of": retry_of, "seed": seed,
               "created_at": now, "updated_at": now, "finished_at": None}
        await self.run_store.insert_once(workflow_runs, row, workflow_runs.c.id == run_id)
        await self.durable.start(run_id)
        await asyncio.to_thread(self._audit, "workflow.run.started", actor or p, row["team_id"], workflow=spec.name,
                                run_id=run_id, version=ver.version, trigger=trigger)
        return {"id": run_id, "object": "workflow_run", "workflow": spec.name, "version": ver.version,
                "status": "running", "trigger": trigger}

    def _run_row(self, name: str, run_id: str, p: Principal) -> Any:
        with self.store.read() as conn:
            r = conn.execute(sa.select(workflow_runs).where(workflow_runs.c.id == run_id,
                                                            workflow_runs.c.workflow == name,
                                                            runs_visible(p, workflow_runs.c.team_id))).first()
        if r is None:
            raise NotFound(f"run {run_id} of workflow {name!r} not found", fix="list runs with GET "
                           f"/v1/workflows/{name}/runs", run_id=run_id)
        return r

    def runs(self, name: str, p: Principal, status: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        self.latest(name, p)
        q = (sa.select(workflow_runs).where(workflow_runs.c.workflow == name, runs_visible(p, workflow_runs.c.team_id))
             .order_by(workflow_runs.c.created_at.desc()).limit(max(1, min(limit, 500))))
        if status:
            if status not in STATUSES:
                raise BadRequest(f"unknown status {status!r}", fix=f"use one of {', '.join(STATUSES)}")
            q = q.where(workflow_runs.c.status == status)
        with self.store.read() as conn:
            rows = conn.execute(q).all()
        return [self._public_run(r) for r in rows]

    def _public_run(self, r: Any) -> dict[str, Any]:
        return {"id": r.id, "object": "workflow_run", "workflow": r.workflow, "version": r.version,
                "status": r.status, "current_step": r.current_step, "trigger": r.trigger, "inputs": r.inputs,
                "outputs": r.outputs, "error": r.error, "parent_run": r.parent_run, "retry_of": r.retry_of,
                "created_at": iso(r.created_at), "updated_at": iso(r.updated_at),
                "finished_at": iso(r.finished_at),
                "waiting": public_wait(r.wait) if r.status == WAITING else None}

    async def detail(self, name: str, run_id: str, p: Principal) -> dict[str, Any]:
        """Status, each step's state and output, and the run's tokens and cost from the ledger."""
        r = await asyncio.to_thread(self._run_row, name, run_id, p)
        out = self._public_run(r)
        spec = self.run_store.spec(r.version_id)
        done: dict[str, dict[str, Any]] = {}
        for s in await self.durable.steps(run_id):
            res = s.get("output")
            name_ = s["function_name"]
            if name_ in spec_ids(spec):
                if s.get("error") is not None:
                    done[name_] = {"status": "failed", "error": str(s["error"])[:500]}
                elif isinstance(res, dict):
                    done[name_] = {"status": res.get("status", "completed"), "output": res.get("output")}
                done[name_]["started_at_ms"] = s.get("started_at_epoch_ms")
                done[name_]["finished_at_ms"] = s.get("completed_at_epoch_ms")
        seed = r.seed or {}
        steps = []
        for st in spec.steps:
            item = {"id": st.id, "type": st.type}
            if st.id in seed:
                item.update(status="carried_over", output=seed[st.id].get("output"))
            elif st.id in done:
                item.update(done[st.id])
                if item["status"] == WAITING:  # the last try's wait is over: the next try is under way
                    item["status"] = "running"
            elif r.current_step == st.id and r.status == "waiting_approval":
                item["status"] = "waiting_approval"
            else:
                item["status"] = "pending"
            if r.current_step == st.id and r.status == WAITING:
                item.update(status=WAITING, waiting=public_wait(r.wait))
            steps.append(item)
        out["steps"] = steps
        out["usage"] = await asyncio.to_thread(self._usage, run_id)
        return out

    def all_runs(self, p: Principal, status: str | None = None, waiting_for: str | None = None,
                 workflow: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Runs of every workflow the caller may see, newest first; `waiting_for` (a model alias or host)
        keeps the runs waiting for it: what an operator looks at during a provider outage."""
        c = workflow_runs.c
        q = sa.select(workflow_runs).where(runs_visible(p, c.team_id)).order_by(c.created_at.desc())
        if status:
            if status not in STATUSES:
                raise BadRequest(f"unknown status {status[:40]!r}", fix=f"use one of {', '.join(STATUSES)}")
            q = q.where(c.status == status)
        if waiting_for:
            q = q.where(c.waiting_for == waiting_for, c.status == WAITING)
        if workflow:
            q = q.where(c.workflow == workflow)
        with self.store.read() as conn:
            rows = conn.execute(q.limit(max(1, min(limit, 1000)))).all()
        return [self._public_run(r) for r in rows]

    async def resume(self, name: str, run_id: str, p: Principal) -> dict[str, Any]:
        """End a provider wait now: the step tries again at once (and waits again if still refused)."""
        p.require("workflows.run")
        r = await asyncio.to_thread(self._run_row, name, run_id, p)
        if r.status != WAITING or not r.wait:
            raise Conflict(f"run {run_id} is {r.status}, not waiting for a provider",
                           fix="resume only runs listed by GET /v1/runs?status=waiting_provider", run_id=run_id)
        topic = r.wait["topic"]
        await self.durable.send(run_id, {"by": p.user_id or p.key_id}, topic=topic,
                                idempotency_key=f"{run_id}.{topic}")
        await asyncio.to_thread(self._audit, "workflow.run.resumed", p, r.team_id, workflow=name, run_id=run_id,
                                step=r.current_step, waiting_for=r.waiting_for)
        out = self._public_run(r)
        out["resumed"] = True
        return out

    def _usage(self, run_id: str) -> dict[str, Any]:
        u = usage_ledger.c
        q = (sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(u.tokens_in), 0),
                       sa.func.coalesce(sa.func.sum(u.tokens_out), 0), sa.func.coalesce(sa.func.sum(u.cost), 0.0))
             .where(sa.or_(u.task_id == run_id, u.task_id.like(f"{run_id}.%"))))
        with self.store.read() as conn:
            n, tin, tout, cost = conn.execute(q).one()
        return {"calls": int(n), "prompt_tokens": int(tin), "completion_tokens": int(tout),
                "total_tokens": int(tin) + int(tout), "cost": float(cost)}

    async def cancel(self, name: str, run_id: str, p: Principal) -> dict[str, Any]:
        p.require("workflows.run")
        r = await asyncio.to_thread(self._run_row, name, run_id, p)
        if r.status in FINAL:
            raise Conflict(f"run {run_id} is already {r.status}", fix="only running or waiting runs can be cancelled",
                           run_id=run_id)
        await asyncio.to_thread(self.run_store.set_status, run_id, "cancelled")
        await self.durable.cancel(run_id)
        await asyncio.to_thread(self._audit, "workflow.run.cancelled", p, r.team_id, workflow=name, run_id=run_id)
        return self._public_run(await asyncio.to_thread(self._run_row, name, run_id, p))

    async def retry(self, name: str, run_id: str, p: Principal, from_step: str | None) -> dict[str, Any]:
        """A new run of the same version and inputs that reuses the results of the steps before `from_step`
        (default: the step that failed). It stays in the original run's team."""
        p.require("workflows.run")
        r = await asyncio.to_thread(self._run_row, name, run_id, p)
        if r.status not in ("failed", "cancelled"):
            raise Conflict(f"run {run_id} is {r.status}", fix="retry a failed or cancelled run", run_id=run_id)
        spec = self.run_store.spec(r.version_id)
        from_step = from_step or (r.error or {}).get("step") or r.current_step or spec.steps[0].id
        if from_step not in spec_ids(spec):
            raise BadRequest(f"step {from_step!r} is not in version {r.version} of {name!r}",
                             fix=f"use one of {', '.join(spec_ids(spec))}")
        detail = await self.detail(name, run_id, p)
        seed: dict[str, Any] = {}
        for item in detail["steps"]:
            if item["id"] == from_step:
                break
            if item["status"] not in ("completed", "skipped", "carried_over"):
                raise Conflict(f"step {item['id']!r} before {from_step!r} did not complete",
                               fix=f"retry from {item['id']!r}", run_id=run_id)
            seed[item["id"]] = {"status": "completed" if item["status"] == "carried_over" else item["status"],
                                "output": item.get("output")}
        return await self.start(name, r.inputs, p, trigger="retry", seed=seed, retry_of=run_id,
                                version_id=r.version_id, team_id=r.team_id)

    # -- sinks ----------------------------------------------------------------------------
    def records(self, table: str, p: Principal, limit: int = 100) -> list[dict[str, Any]]:
        q = (sa.select(workflow_records).where(workflow_records.c.table_name == table,
                                               runs_visible(p, workflow_records.c.team_id))
             .order_by(workflow_records.c.created_at.desc()).limit(max(1, min(limit, 1000))))
        with self.store.read() as conn:
            rows = conn.execute(q).all()
        return [{"id": r.id, "table": r.table_name, "key": r.key, "data": r.data, "run_id": r.run_id,
                 "step": r.step_id, "created_at": iso(r.created_at)} for r in rows]

    def outbox(self, p: Principal, run_id: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        q = (sa.select(workflow_outbox).where(runs_visible(p, workflow_outbox.c.team_id))
             .order_by(workflow_outbox.c.created_at.desc()).limit(max(1, min(limit, 1000))))
        if run_id:
            q = q.where(workflow_outbox.c.run_id == run_id)
        with self.store.read() as conn:
            rows = conn.execute(q).all()
        return [{"id": r.id, "run_id": r.run_id, "step": r.step_id, "to": r.to, "subject": r.subject,
                 "body": r.body, "message_id": f"<{r.idempotency_key}@keel>", "created_at": iso(r.created_at)}
                for r in rows]

    # -- start-up -------------------------------------------------------------------------
    def load_dir(self, path: Path, owner: Principal) -> list[str]:
        """Define every `*.yaml` in `path` (a bad file is logged with its location and skipped)."""
        loaded = []
        for f in sorted(path.glob("*.yaml")) + sorted(path.glob("*/workflow.yaml")):
            try:
                loaded.append(self.define(f.read_text(), owner)["name"])
            except KeelError as exc:
                log.error("workflow spec not loaded", extra={"file": str(f), "error": exc.detail})
        return loaded

    async def relaunch_orphans(self) -> int:
        """Start the DBOS workflow of any acknowledged run that has none (crash between the two writes)."""
        n = 0
        for run_id in await asyncio.to_thread(self.run_store.unfinished):
            if not await self.durable.exists(run_id):
                await self.durable.start(run_id)
                n += 1
        return n

    def _audit(self, action: str, p: Principal, team_id: str | None, **details: Any) -> None:
        self.run_store.audit(action, p.user_id or p.key_id, team_id, **details)


def spec_ids(spec: WorkflowSpec) -> list[str]:
    return [s.id for s in spec.steps]
