"""Observability's HTTP surface: `GET /metrics` (Prometheus), `GET /v1/usage` (cost and usage reports, JSON or
CSV) and `POST /v1/feedback`."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from keel.core.errors import BadRequest
from keel.core.http import bounded_json, json_response
from keel.identity.auth import principal
from keel.identity.principal import Principal
from keel.observe.feedback import Feedback
from keel.observe.metrics import CONTENT_TYPE
from keel.observe.usage import ReportQuery, report, to_csv

router = APIRouter()
MAX_FEEDBACK_BYTES = 256 * 1024


@router.get("/metrics", tags=["observe"])
async def metrics(request: Request, p: Principal = Depends(principal)) -> Response:
    """Prometheus text format; needs `metrics.read` (admins, auditors), or use the `metrics_bind` listener."""
    p.require("metrics.read")
    body = await run_in_threadpool(request.app.state.observe.metrics.render)  # queue depths read the store
    return Response(body, media_type=CONTENT_TYPE)


@router.get("/v1/usage", tags=["observe"])
async def usage(request: Request, p: Principal = Depends(principal),
                group_by: str = Query("day", description="comma-separated dimensions"),
                start: str | None = Query(None, description="ISO date or date-time (UTC); default 30 days before end"),
                end: str | None = Query(None, description="ISO date or date-time (UTC), exclusive; default now"),
                fmt: str = Query("json", alias="format", description="json or csv")) -> Response:
    """Tokens, cost, requests, errors, p50/p95 latency and feedback from the ledger, grouped by
    `group_by=day,team,key,user,use_case,task,model,deployment,provider,kind,status,workflow,workflow_run,agent,
    agent_run`, over `start`/`end` (default the last 30 days), filtered by `<dimension>=<value>`;
    `format=csv` for CSV. Admins and auditors see every call, builders their team's, others their own."""
    params = dict(request.query_params)  # the parameters declared above (for the API reference) and filters
    if fmt not in ("json", "csv"):
        raise BadRequest(f"unknown format {fmt[:20]!r}", fix="use format=json or format=csv")
    q = ReportQuery.parse(params)
    rep = await run_in_threadpool(report, request.app.state.store, p, q)
    if fmt == "csv":
        return Response(to_csv(rep), media_type="text/csv; charset=utf-8",
                        headers={"content-disposition": 'attachment; filename="keel-usage.csv"'})
    return json_response(rep)


@router.post("/v1/feedback", status_code=201, tags=["observe"])
async def give_feedback(request: Request, p: Principal = Depends(principal)) -> Response:
    """Feedback on a call (`request_id`), a workflow or agent run (`run_id`) or an answer (`answer_id`):
    `score` (-100…100), `label`, `comment`, `correction`. Only on calls the key may see in `/v1/usage`."""
    body = await bounded_json(request, MAX_FEEDBACK_BYTES, f"feedback body is over {MAX_FEEDBACK_BYTES // 1024} KiB",
                              "shorten the correction")
    fb = Feedback(request.app.state.store, request.app.state.observe.ledger)
    given = await fb.give(p, body)
    request.app.state.observe.drift.observe_feedback(given["score"])  # the feedback_rate drift signal
    return json_response(given, 201)
