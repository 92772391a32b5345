"""Workflows HTTP API: definitions, runs, approvals, signed webhooks, and the record/outbox sinks."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from keel.core.errors import BadRequest, MalformedJSON
from keel.core.http import json_response
from keel.identity.auth import principal
from keel.identity.principal import Principal
from keel.workflows import approvals, triggers
from keel.workflows.manager import Workflows

router = APIRouter(tags=["workflows"])
YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml", "text/plain")


class RunIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: dict[str, Any] = Field(default_factory=dict, description="checked against the workflow's input schema")


class RetryIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    from_step: str | None = Field(default=None, description="default: the step that failed")


class ApproveIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str | None = Field(default=None, max_length=4000)
    edits: dict[str, Any] = Field(default_factory=dict, description="new values for the approval's editable fields")


class RejectIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str | None = Field(default=None, max_length=4000)


def _wf(request: Request) -> Workflows:
    return request.app.state.workflows


@router.post("/v1/workflows")
async def define(request: Request, p: Principal = Depends(principal)) -> Response:
    """Define or update a workflow from its YAML: the raw body (`Content-Type: application/yaml`) or
    JSON `{"spec": "<yaml>", "team": "<team id or name, admins only>"}`. A changed spec becomes a new version.
    A workflow belongs to its builder's team (an admin's: `team`, else global); only its owner changes it."""
    raw = await request.body()
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    team = None
    if ctype in YAML_TYPES:
        source = raw.decode("utf-8", errors="replace")
    else:
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise MalformedJSON("the body is neither JSON nor YAML",
                                fix='send {"spec": "<yaml>"} or the YAML with Content-Type: application/yaml')
        if not isinstance(body, dict) or not isinstance(body.get("spec"), str):
            raise BadRequest("`spec` (the workflow YAML as a string) is required",
                             fix='send {"spec": "<yaml>"} or the YAML with Content-Type: application/yaml')
        source, team = body["spec"], body.get("team")
        if team is not None and not isinstance(team, str):
            raise BadRequest("`team` must be a team id or name", fix="send a string, or omit it")
    wf = _wf(request)
    out = await run_in_threadpool(wf.define, source, p, team_id=team)
    await wf.durable.ensure_launched()  # schedules and webhooks of the first workflow need a running engine
    return json_response(out, 201 if out["created"] else 200)


@router.get("/v1/workflows")
async def list_workflows(request: Request, p: Principal = Depends(principal)) -> Response:
    return json_response({"object": "list", "data": await run_in_threadpool(_wf(request).list, p)})


@router.get("/v1/workflows/{name}")
async def get_workflow(name: str, request: Request, p: Principal = Depends(principal)) -> Response:
    return json_response(await run_in_threadpool(_wf(request).get, name, p))


@router.post("/v1/workflows/{name}/runs", status_code=201)
async def start_run(name: str, body: RunIn, request: Request, p: Principal = Depends(principal)) -> Response:
    """Start a run; answers at once with its id (poll the run for its status)."""
    return json_response(await _wf(request).start(name, body.inputs, p), 201)


@router.get("/v1/workflows/{name}/runs")
async def list_runs(name: str, request: Request, status: str | None = None, limit: int = Query(50, ge=1, le=500),
                    p: Principal = Depends(principal)) -> Response:
    rows = await run_in_threadpool(_wf(request).runs, name, p, status, limit)
    return json_response({"object": "list", "data": rows})


@router.get("/v1/workflows/{name}/runs/{run_id}")
async def get_run(name: str, run_id: str, request: Request, p: Principal = Depends(principal)) -> Response:
    """Status, every step's state and output, and the run's tokens and cost."""
    return json_response(await _wf(request).detail(name, run_id, p))


@router.post("/v1/workflows/{name}/runs/{run_id}/cancel")
async def cancel_run(name: str, run_id: str, request: Request, p: Principal = Depends(principal)) -> Response:
    return json_response(await _wf(request).cancel(name, run_id, p))


@router.post("/v1/workflows/{name}/runs/{run_id}/retry", status_code=201)
async def retry_run(name: str, run_id: str, body: RetryIn, request: Request,
                    p: Principal = Depends(principal)) -> Response:
    """A new run that reuses the results of the steps before `from_step`."""
    return json_response(await _wf(request).retry(name, run_id, p, body.from_step), 201)


@router.post("/v1/workflows/{name}/runs/{run_id}/resume")
async def resume_run(name: str, run_id: str, request: Request, p: Principal = Depends(principal)) -> Response:
    """End a run's wait for an unavailable provider now: its step tries again at once."""
    return json_response(await _wf(request).resume(name, run_id, p))


@router.get("/v1/runs")
async def list_all_runs(request: Request, status: str | None = Query(None, max_length=40),
                        waiting_for: str | None = Query(None, max_length=300,
                                                        description="a model alias or host the runs wait for"),
                        workflow: str | None = Query(None, max_length=64), limit: int = Query(100, ge=1, le=1000),
                        p: Principal = Depends(principal)) -> Response:
    """Runs of every workflow the caller may see, newest first. `?status=waiting_provider&waiting_for=ALIAS`
    lists the runs an outage of that model alias (or host) holds; each says when it tries next."""
    rows = await run_in_threadpool(_wf(request).all_runs, p, status, waiting_for, workflow, limit)
    return json_response({"object": "list", "data": rows})


@router.post("/v1/workflows/{name}/webhook", status_code=201, openapi_extra={"security": []})
async def inbound_webhook(name: str, request: Request) -> Response:
    """Start a run from a signed webhook: the JSON body is the run's inputs. Authenticated by the
    HMAC signature (`X-Keel-Signature`), not a bearer key."""
    raw = await request.body()
    try:
        inputs = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        raise MalformedJSON("the webhook body is not valid JSON", fix="send the run's inputs as a JSON object")
    wf = _wf(request)
    out = await triggers.webhook(wf, name, raw, inputs, request.headers.get("x-keel-signature"),
                                 request.headers.get("idempotency-key"),
                                 request.app.state.settings.workflow_webhook_tolerance_s)
    return json_response(out, 201)


# -- approvals ---------------------------------------------------------------------------------
@router.get("/v1/approvals", tags=["approvals"])
async def list_approvals(request: Request, status: str | None = "pending", limit: int = Query(100, ge=1, le=500),
                         p: Principal = Depends(principal)) -> Response:
    """Approvals the caller may decide (pending by default; `status=` for others, empty for all)."""
    rows = await run_in_threadpool(approvals.list_approvals, _wf(request).run_store, p, status or None, limit)
    return json_response({"object": "list", "data": rows})


@router.get("/v1/approvals/{approval_id}", tags=["approvals"])
async def get_approval(approval_id: str, request: Request, p: Principal = Depends(principal)) -> Response:
    r = await run_in_threadpool(approvals.get_approval, _wf(request).run_store, p, approval_id)
    return json_response(approvals.public(r))


@router.post("/v1/approvals/{approval_id}/approve", tags=["approvals"])
async def approve(approval_id: str, body: ApproveIn, request: Request, p: Principal = Depends(principal)) -> Response:
    """Approve, optionally editing the editable fields: the edited values are what later steps use."""
    wf = _wf(request)
    out = await approvals.decide(wf.run_store, wf.durable, p, approval_id, "approved", body.reason, body.edits)
    return json_response(out)


@router.post("/v1/approvals/{approval_id}/reject", tags=["approvals"])
async def reject(approval_id: str, body: RejectIn, request: Request, p: Principal = Depends(principal)) -> Response:
    wf = _wf(request)
    out = await approvals.decide(wf.run_store, wf.durable, p, approval_id, "rejected", body.reason, None)
    return json_response(out)


# -- sinks -----------------------------------------------------------------------------------
@router.get("/v1/records/{table}")
async def list_records(table: str, request: Request, limit: int = Query(100, ge=1, le=1000),
                       p: Principal = Depends(principal)) -> Response:
    """Rows workflow `record` steps wrote (e.g. the lead-intake CRM's `crm_leads`)."""
    rows = await run_in_threadpool(_wf(request).records, table, p, limit)
    return json_response({"object": "list", "data": rows})


@router.get("/v1/outbox")
async def list_outbox(request: Request, run_id: str | None = None, limit: int = Query(100, ge=1, le=1000),
                      p: Principal = Depends(principal)) -> Response:
    """Email that workflow steps sent while no SMTP server is configured."""
    rows = await run_in_threadpool(_wf(request).outbox, p, run_id, limit)
    return json_response({"object": "list", "data": rows})
