"""The prompt registry's HTTP API: `POST /v1/prompts` (a new version), list, get, versions, diff, and moving a
label (`PUT /v1/prompts/{name}/labels/{label}`, the roll back)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from keel.core.http import bounded_json, json_response
from keel.identity.auth import principal
from keel.identity.principal import Principal
from keel.observe.prompts import Prompts

router = APIRouter(tags=["observe"])
MAX_BODY = 1024 * 1024


def _prompts(request: Request) -> Prompts:
    return request.app.state.prompts


async def _body(request: Request) -> Any:
    return await bounded_json(request, MAX_BODY, f"body is over {MAX_BODY // 1024} KiB", "shorten the prompt")


@router.post("/v1/prompts")
async def define_prompt(request: Request, p: Principal = Depends(principal)) -> Response:
    """A new version of a prompt: `{"name", "messages": [{role, content with {{ slots }}}] | "template",
    "description", "labels": ["staging"], "team" (admins)}`; an unchanged one keeps its version (200)."""
    out = await run_in_threadpool(_prompts(request).define, p, await _body(request))
    return json_response(out, 201 if out["created"] else 200)


@router.get("/v1/prompts")
async def list_prompts(request: Request, p: Principal = Depends(principal)) -> Response:
    """The prompts this key may read (global ones and its team's), latest version each, with their labels."""
    return json_response({"object": "list", "data": await run_in_threadpool(_prompts(request).list, p)})


@router.get("/v1/prompts/{name}")
async def get_prompt(name: str, request: Request, p: Principal = Depends(principal),
                     version: int | None = Query(None, ge=1), label: str | None = Query(None, max_length=40)
                     ) -> Response:
    """One version: `version=N`, `label=production`, or the latest."""
    return json_response(await run_in_threadpool(_prompts(request).get, p, name, version, label))


@router.get("/v1/prompts/{name}/versions")
async def prompt_versions(name: str, request: Request, p: Principal = Depends(principal)) -> Response:
    """Every version, newest first, with the labels on each."""
    return json_response({"object": "list", "data": await run_in_threadpool(_prompts(request).versions, p, name)})


@router.get("/v1/prompts/{name}/diff")
async def prompt_diff(name: str, request: Request, p: Principal = Depends(principal),
                      a: int = Query(..., alias="from", ge=1), b: int = Query(..., alias="to", ge=1)) -> Response:
    """A unified diff between two versions' messages."""
    return json_response(await run_in_threadpool(_prompts(request).diff, p, name, a, b))


@router.put("/v1/prompts/{name}/labels/{label}")
async def move_label(name: str, label: str, request: Request, p: Principal = Depends(principal)) -> Response:
    """Point `label` at `{"version": N}`: promote a version, or roll back by pointing at an older one."""
    out = await run_in_threadpool(_prompts(request).label, p, name, label, await _body(request))
    return json_response(out)
