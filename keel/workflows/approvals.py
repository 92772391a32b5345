"""Human approvals inside runs: a row people can list and decide, and the durable message that
wakes the waiting run. The decision is written first (atomically: only a pending approval can be
decided) and then sent to the run; a run that misses the message finds the decision on its next
check, so a crash between the two loses nothing.

Who may see and decide (`access.runs_visible`): a principal with `approvals.decide` whose role is among
the approval's current approvers, in the run's team; admins see and decide all; auditors read their
team's (all without a team) and decide none.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, timedelta
from typing import Any

import sqlalchemy as sa

from keel.core.clock import iso, utcnow
from keel.core.errors import BadRequest, Conflict, NotFound
from keel.identity.principal import Principal
from keel.workflows.access import runs_visible
from keel.workflows.durable import Durable
from keel.workflows.steps import StepEnv
from keel.workflows.store import RunStore
from keel.workflows.tables import workflow_approvals, workflow_runs


def public(r: Any) -> dict[str, Any]:
    return {"id": r.id, "object": "approval", "status": r.status, "run_id": r.run_id, "workflow": r.workflow,
            "step": r.step_id, "approvers": r.approvers, "escalated": bool(r.escalated), "team_id": r.team_id,
            "instructions": r.instructions, "show": r.show, "editable": r.editable, "fields": r.fields,
            "decided_by": r.decided_by, "reason": r.reason, "created_at": iso(r.created_at),
            "deadline": iso(r.deadline), "decided_at": iso(r.decided_at)}


# -- inside a run (each function is one DBOS step) ---------------------------------------------
def _audit(env: StepEnv, action: str, **details: Any) -> None:
    run = {"id": env.run_id, "workflow": env.workflow, "team_id": env.team_id, "principal": {"key_id": "system"}}
    env.parts.runs.audit_run(action, run, **details)


async def open_approval(env: StepEnv) -> dict[str, Any]:
    """Create the approval (once per run and step) and mark the run as waiting for it."""
    runs = env.parts.runs
    c = env.step.config
    approval_id = f"apr_{env.run_id}.{env.step.id}"
    show = env.render(c.get("show") or {})
    instructions = env.render(c["instructions"]) if c.get("instructions") else None
    now = utcnow()

    def do() -> dict[str, Any]:
        with runs.store.engine.begin() as conn:
            row = conn.execute(sa.select(workflow_approvals.c.deadline)
                               .where(workflow_approvals.c.id == approval_id)).first()
            if row is None:
                deadline = now + timedelta(seconds=float(c["timeout_s"]))
                conn.execute(workflow_approvals.insert().values(
                    id=approval_id, run_id=env.run_id, workflow=env.workflow, step_id=env.step.id, status="pending",
                    approvers=list(c["approvers"]), escalated=False, team_id=env.team_id,
                    instructions=None if instructions is None else str(instructions), show=show,
                    editable=list(c.get("editable") or []), fields=None, decided_by=None, reason=None,
                    created_at=now, deadline=deadline, decided_at=None))
            else:
                deadline = row.deadline if row.deadline.tzinfo else row.deadline.replace(tzinfo=UTC)
        runs.set_status(env.run_id, "waiting_approval", current_step=env.step.id)
        return {"id": approval_id, "deadline": deadline.timestamp()}

    out = await asyncio.to_thread(do)
    await asyncio.to_thread(_audit, env, "workflow.approval.requested", approval_id=approval_id, step=env.step.id)
    return out


async def escalate(env: StepEnv, approval_id: str) -> float:
    """The approval timed out: hand it to the escalation roles with a fresh deadline."""
    runs = env.parts.runs
    c = env.step.config
    deadline = utcnow() + timedelta(seconds=float(c.get("escalation_timeout_s") or c["timeout_s"]))

    def do() -> None:
        with runs.store.engine.begin() as conn:
            conn.execute(workflow_approvals.update().where(workflow_approvals.c.id == approval_id,
                                                           workflow_approvals.c.status == "pending")
                         .values(approvers=list(c["escalate_to"]), escalated=True, deadline=deadline))
    await asyncio.to_thread(do)
    await asyncio.to_thread(_audit, env, "workflow.approval.escalated", approval_id=approval_id,
                            to=list(c["escalate_to"]))
    return deadline.timestamp()


async def recorded_decision(runs: RunStore, approval_id: str) -> dict[str, Any] | None:
    def do() -> dict[str, Any] | None:
        with runs.store.read() as conn:
            r = conn.execute(sa.select(workflow_approvals).where(workflow_approvals.c.id == approval_id)).first()
        if r is None or r.status == "pending":
            return None
        return {"decision": r.status, "by": r.decided_by, "reason": r.reason, "fields": r.fields}
    return await asyncio.to_thread(do)


async def close_approval(env: StepEnv, approval_id: str, decision: dict[str, Any]) -> dict[str, Any]:
    """Record a timeout's decision (an approver's is already recorded) and resume the run."""
    runs = env.parts.runs

    def do() -> dict[str, Any]:
        with runs.store.engine.begin() as conn:
            r = conn.execute(sa.select(workflow_approvals).where(workflow_approvals.c.id == approval_id)).first()
            fields = decision.get("fields")
            if fields is None:
                fields = dict(r.show or {})
            if r.status == "pending":
                conn.execute(workflow_approvals.update().where(workflow_approvals.c.id == approval_id,
                                                               workflow_approvals.c.status == "pending")
                             .values(status=decision["decision"], decided_by=decision["by"],
                                     reason=decision.get("reason"), fields=fields, decided_at=utcnow()))
        runs.set_status(env.run_id, "running", current_step=None)
        return fields

    fields = await asyncio.to_thread(do)
    if decision["by"] == "system:timeout":
        await asyncio.to_thread(_audit, env, "workflow.approval.timed_out", approval_id=approval_id,
                                decision=decision["decision"])
    return {"status": "completed", "output": {"decision": decision["decision"], "by": decision["by"],
                                              "reason": decision.get("reason"), "fields": fields}}


# -- the people side (API and CLI) --------------------------------------------------------------
def _visible(p: Principal) -> Any:
    return runs_visible(p, workflow_approvals.c.team_id)


def list_approvals(runs: RunStore, p: Principal, status: str | None = "pending", limit: int = 100) -> list[dict]:
    """Approvals the caller may decide, or (auditors) read."""
    if not p.has("audit.read"):
        p.require("approvals.decide")
    q = sa.select(workflow_approvals).where(_visible(p)).order_by(workflow_approvals.c.created_at).limit(limit)
    if status:
        q = q.where(workflow_approvals.c.status == status)
    with runs.store.read() as conn:
        rows = conn.execute(q).all()
    return [public(r) for r in rows if p.is_admin or p.has("audit.read") or p.role in r.approvers]


def get_approval(runs: RunStore, p: Principal, approval_id: str) -> Any:
    with runs.store.read() as conn:
        r = conn.execute(sa.select(workflow_approvals).where(workflow_approvals.c.id == approval_id,
                                                             _visible(p))).first()
    if r is None or not (p.has("approvals.decide") or p.has("audit.read") or _is_requester(runs, p, r.run_id)):
        raise NotFound(f"approval {approval_id} not found", fix="list pending ones with `keel approvals list`",
                       approval_id=approval_id)
    return r


def _is_requester(runs: RunStore, p: Principal, run_id: str) -> bool:
    with runs.store.read() as conn:
        owner = conn.execute(sa.select(workflow_runs.c.principal).where(workflow_runs.c.id == run_id)).scalar()
    return bool(owner) and owner.get("key_id") == p.key_id


async def decide(runs: RunStore, durable: Durable, p: Principal, approval_id: str, verdict: str,
                 reason: str | None, edits: dict[str, Any] | None) -> dict[str, Any]:
    """Approve (optionally with edits to editable fields) or reject; the run resumes at once."""
    p.require("approvals.decide")
    r = await asyncio.to_thread(get_approval, runs, p, approval_id)
    if not (p.is_admin or p.role in r.approvers):
        raise NotFound(f"approval {approval_id} not found", fix="it waits for another role", approval_id=approval_id)
    edits = edits or {}
    if verdict == "rejected" and edits:
        raise BadRequest("edits only apply to an approval", fix="drop `edits` when rejecting")
    bad = sorted(set(edits) - set(r.editable or []))
    if bad:
        raise BadRequest(f"fields {bad} are not editable in approval {approval_id}",
                         fix=f"edit only {sorted(r.editable or [])}", approval_id=approval_id)
    fields = dict(r.show or {}, **edits)
    actor = p.user_id or p.key_id

    def do() -> int:
        with runs.store.engine.begin() as conn:
            return conn.execute(workflow_approvals.update().where(workflow_approvals.c.id == approval_id,
                                                                  workflow_approvals.c.status == "pending")
                                .values(status=verdict, decided_by=actor, reason=reason, fields=fields,
                                        decided_at=utcnow())).rowcount
    if not await asyncio.to_thread(do):
        raise Conflict(f"approval {approval_id} is already {r.status if r.status != 'pending' else 'decided'}",
                       fix="list pending ones with `keel approvals list`", approval_id=approval_id)
    message = {"decision": verdict, "by": actor, "reason": reason, "fields": fields}
    await durable.send(r.run_id, message, topic=approval_id, idempotency_key=f"{approval_id}.decision")
    await asyncio.to_thread(runs.audit_run, f"workflow.approval.{verdict}",
                            {"id": r.run_id, "workflow": r.workflow, "team_id": r.team_id,
                             "principal": {"key_id": p.key_id}},
                            approval_id=approval_id, step=r.step_id, by=actor, reason=reason, edited=sorted(edits))
    r2 = await asyncio.to_thread(get_approval, runs, p, approval_id)
    return public(r2)
