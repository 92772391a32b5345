"""Agents HTTP API: mandates, the kill switch, runs and their action log."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from keel.agents.manager import Agents
from keel.core.errors import BadRequest, MalformedJSON
from keel.core.http import json_response
from keel.identity.auth import principal
from keel.identity.principal import Principal

router = APIRouter(tags=["agents"])
YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml", "text/plain")
SPEC_FIX = 'send {"spec": "<yaml>"} or the YAML with Content-Type: application/yaml'


class RunIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: str = Field(min_length=1, max_length=20000, description="what the agent is asked to do")
    wait_s: float = Field(default=60.0, ge=0, le=600, description="how long to wait for the run to end")
    user: str | None = Field(default=None, min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.@:+-]+$",
                             description="the end user the run is for: under memory thread `user`, the run "
                                         "continues that user's conversation with this agent (in this team)")
    stream: bool = Field(default=False, description="answer with server-sent events: each action as it is logged, "
                                                    "then the run (when it ends or waits for a person, or at wait_s)")


class SwitchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str | None = Field(default=None, max_length=2000)


def _agents(request: Request) -> Agents:
    return request.app.state.agents


@router.post("/v1/agents")
async def define(request: Request, p: Principal = Depends(principal)) -> Response:
    """Define or update an agent's mandate from its YAML (raw, `Content-Type: application/yaml`, or JSON
    `{"spec": "<yaml>", "team": "<admins only>"}`). A changed mandate becomes a new version; runs keep theirs."""
    raw = await request.body()
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    team: Any = None
    if ctype in YAML_TYPES:
        source = raw.decode("utf-8", errors="replace")
    else:
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise MalformedJSON("the body is neither JSON nor YAML", fix=SPEC_FIX)
        if not isinstance(body, dict) or not isinstance(body.get("spec"), str):
            raise BadRequest("`spec` (the mandate YAML as a string) is required", fix=SPEC_FIX)
        source, team = body["spec"], body.get("team")
        if team is not None and not isinstance(team, str):
            raise BadRequest("`team` must be a team id or name", fix="send a string, or omit it")
    out = await run_in_threadpool(_agents(request).define, source, p, team_id=team)
    return json_response(out, 201 if out["created"] else 200)


@router.get("/v1/agents")
async def list_agents(request: Request, p: Principal = Depends(principal)) -> Response:
    return json_response({"object": "list", "data": await run_in_threadpool(_agents(request).list, p)})


@router.get("/v1/agents/{name}")
async def get_agent(name: str, request: Request, p: Principal = Depends(principal)) -> Response:
    return json_response(await run_in_threadpool(_agents(request).get, name, p))


@router.post("/v1/agents/{name}/pause")
async def pause(name: str, request: Request, body: SwitchIn | None = None,
                p: Principal = Depends(principal)) -> Response:
    """The kill switch: no new run, and no further action by any running one."""
    return json_response(await run_in_threadpool(_agents(request).set_paused, name, p, True, body and body.reason))


@router.post("/v1/agents/{name}/resume")
async def resume(name: str, request: Request, body: SwitchIn | None = None,
                 p: Principal = Depends(principal)) -> Response:
    return json_response(await run_in_threadpool(_agents(request).set_paused, name, p, False, body and body.reason))


@router.post("/v1/agents/{name}/runs")
async def start_run(name: str, body: RunIn, request: Request, p: Principal = Depends(principal)) -> Response:
    """Run the agent on a task and wait (up to `wait_s`) for its answer: 200 when it ended, 202 while it still
    runs or waits for a person. The body has the run's action log."""
    agents = _agents(request)
    if body.stream:
        out = await agents.start(name, body.task, p, wait_s=0, user=body.user)
        return StreamingResponse(agents.events(name, out["id"], p, wait_s=body.wait_s), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    out = await agents.start(name, body.task, p, wait_s=body.wait_s, user=body.user)
    return json_response(out, 200 if out["status"] in ("completed", "failed", "stopped") else 202)


@router.get("/v1/agents/{name}/runs")
async def list_runs(name: str, request: Request, status: str | None = None, limit: int = Query(50, ge=1, le=500),
                    p: Principal = Depends(principal)) -> Response:
    rows = await run_in_threadpool(_agents(request).runs, name, p, status, limit)
    return json_response({"object": "list", "data": rows})


@router.post("/v1/agents/{name}/runs/{run_id}/resume")
async def resume_run(name: str, run_id: str, request: Request, p: Principal = Depends(principal)) -> Response:
    """End a run's provider wait now (409 unless it is `waiting_provider`): its model call is tried again."""
    return json_response(await _agents(request).resume_run(name, run_id, p))


@router.get("/v1/agents/{name}/runs/{run_id}")
async def get_run(name: str, run_id: str, request: Request, p: Principal = Depends(principal)) -> Response:
    """The run, with every action (allowed or refused, with its rule), tokens and cost."""
    return json_response(await run_in_threadpool(_agents(request).detail, name, run_id, p))
