"""Admin HTTP API for teams, users, API keys and secrets, plus `/v1/me`."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from keel.core.http import json_response
from keel.identity import service
from keel.identity.auth import admin, principal
from keel.identity.principal import Principal

router = APIRouter()


class TeamIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    classification: str = "internal"


class UserIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    email: str = Field(min_length=3, max_length=320)
    role: str
    team: str | None = None
    name: str = ""


class ScopesIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    models: list[str] | None = None
    collections: list[str] | None = None
    agents: list[str] | None = None


class KeyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: str = "member"
    name: str = ""
    team: str | None = None
    user_id: str | None = None
    scopes: ScopesIn = Field(default_factory=ScopesIn)
    expires_at: datetime | None = None


class SecretIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: str = Field(min_length=1)


def _store(request: Request):  # noqa: ANN202
    return request.app.state.store


def _audit(request: Request, action: str, p: Principal, **details: Any) -> None:
    hook = getattr(request.app.state, "audit", None)
    if hook is not None:
        hook(action=action, actor=p.key_id, **details)


@router.get("/v1/me", tags=["identity"])
async def me(p: Principal = Depends(principal)) -> Response:
    return json_response({"key_id": p.key_id, "role": p.role, "team_id": p.team_id, "user_id": p.user_id,
                          "name": p.key_name, "scopes": p.scopes.to_dict()})


@router.get("/admin/teams", tags=["admin"])
async def list_teams(request: Request, _p: Principal = Depends(admin)) -> Response:
    return json_response({"data": await run_in_threadpool(service.list_teams, _store(request))})


@router.post("/admin/teams", status_code=201, tags=["admin"])
async def create_team(body: TeamIn, request: Request, p: Principal = Depends(admin)) -> Response:
    team = await run_in_threadpool(service.create_team, _store(request), body.name, body.classification)
    _audit(request, "team.create", p, team_id=team["id"])
    return json_response(team, 201)


@router.get("/admin/teams/{ref}", tags=["admin"])
async def get_team(ref: str, request: Request, _p: Principal = Depends(admin)) -> Response:
    return json_response(await run_in_threadpool(service.get_team, _store(request), ref))


@router.delete("/admin/teams/{ref}", status_code=204, tags=["admin"])
async def delete_team(ref: str, request: Request, p: Principal = Depends(admin)) -> Response:
    await run_in_threadpool(service.delete_team, _store(request), ref)
    _audit(request, "team.delete", p, team=ref)
    return json_response(None, 204)


@router.get("/admin/users", tags=["admin"])
async def list_users(request: Request, _p: Principal = Depends(admin)) -> Response:
    return json_response({"data": await run_in_threadpool(service.list_users, _store(request))})


@router.post("/admin/users", status_code=201, tags=["admin"])
async def create_user(body: UserIn, request: Request, p: Principal = Depends(admin)) -> Response:
    user = await run_in_threadpool(service.create_user, _store(request), body.email, body.role, body.team, body.name)
    _audit(request, "user.create", p, user_id=user["id"])
    return json_response(user, 201)


@router.get("/admin/keys", tags=["admin"])
async def list_keys(request: Request, team: str | None = None, _p: Principal = Depends(admin)) -> Response:
    store = _store(request)
    team_id = (await run_in_threadpool(service.get_team, store, team))["id"] if team else None
    return json_response({"data": await run_in_threadpool(service.list_keys, store, team_id)})


@router.post("/admin/keys", status_code=201, tags=["admin"])
async def create_key(body: KeyIn, request: Request, p: Principal = Depends(admin)) -> Response:
    key, record = await run_in_threadpool(
        lambda: service.create_key(_store(request), role=body.role, name=body.name, team=body.team,
                                   user=body.user_id, scopes=body.scopes.model_dump(), expires_at=body.expires_at))
    _audit(request, "key.create", p, key_id=record["id"], role=body.role)
    return json_response({**record, "key": key}, 201)


@router.post("/admin/keys/{key_id}/revoke", tags=["admin"])
async def revoke_key(key_id: str, request: Request, p: Principal = Depends(admin)) -> Response:
    record = await run_in_threadpool(service.revoke_key, _store(request), key_id)
    request.app.state.authenticator.invalidate()
    _audit(request, "key.revoke", p, key_id=record["id"])
    return json_response(record)


@router.delete("/admin/keys/{key_id}", tags=["admin"])
async def delete_key(key_id: str, request: Request, p: Principal = Depends(admin)) -> Response:
    return await revoke_key(key_id, request, p)


@router.get("/admin/secrets", tags=["admin"])
async def list_secrets(request: Request, _p: Principal = Depends(admin)) -> Response:
    return json_response({"data": await run_in_threadpool(request.app.state.vault.names)})


@router.put("/admin/secrets/{name}", tags=["admin"])
async def put_secret(name: str, body: SecretIn, request: Request, p: Principal = Depends(admin)) -> Response:
    await run_in_threadpool(request.app.state.vault.put, name, body.value)
    _audit(request, "secret.put", p, secret=name)
    return json_response({"name": name, "stored": True})


@router.delete("/admin/secrets/{name}", status_code=204, tags=["admin"])
async def delete_secret(name: str, request: Request, p: Principal = Depends(admin)) -> Response:
    await run_in_threadpool(request.app.state.vault.delete, name)
    _audit(request, "secret.delete", p, secret=name)
    return json_response(None, 204)
