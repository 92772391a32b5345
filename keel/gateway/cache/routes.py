"""`DELETE /admin/cache/{alias}`: drop every cached answer of an alias, on every replica."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from keel.core.errors import Unavailable
from keel.core.http import json_response
from keel.gateway.cache.stage import CacheStage
from keel.identity.auth import admin
from keel.identity.principal import Principal

router = APIRouter()


def cache_stage(request: Request) -> CacheStage:
    """The gateway's cache stage (the service always installs one)."""
    stage = next((s for s in request.app.state.gateway.stages if isinstance(s, CacheStage)), None)
    if stage is None:
        raise Unavailable("the response cache is not installed in this server",
                          fix="build the gateway with keel.gateway.service.build")
    return stage


@router.delete("/admin/cache/{alias:path}", tags=["admin"])
async def invalidate_cache(alias: str, request: Request, _p: Principal = Depends(admin)) -> Response:
    """Delete the alias's cached answers for all teams; other replicas drop theirs within a second."""
    deleted = await cache_stage(request).entries.invalidate(alias)
    return json_response({"alias": alias, "deleted": deleted})
