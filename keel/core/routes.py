"""`/healthz` (process alive) and `/readyz` (database reachable, migrations current) — no key needed."""

from __future__ import annotations


from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from keel.core.errors import Unavailable
from keel.core.http import json_response

router = APIRouter(tags=["health"])


@router.get("/healthz", openapi_extra={"security": []})
async def healthz() -> Response:
    return json_response({"status": "ok"})


@router.get("/readyz", openapi_extra={"security": []})
async def readyz(request: Request) -> Response:
    store = request.app.state.store
    await run_in_threadpool(store.ping)
    if not await run_in_threadpool(store.is_current):
        raise Unavailable("database migrations are not current", fix="run `keel db upgrade`")
    return json_response({"status": "ready", "database": store.dialect})
