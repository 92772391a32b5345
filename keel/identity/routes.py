"""Admin HTTP API for teams, users, API keys and secrets (owners, uses, grants), `/v1/secrets` for a
builder's own team, plus `/v1/me`. No route ever returns a secret's value."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from keel.core.errors import Forbidden
from keel.core.http import json_response
from keel.identity import service, sessions
from keel.identity.auth import admin, principal
from keel.identity.principal import Principal
from keel.identity.vault import USES

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
    team: str | None = Field(default=None, description="owning team (id or name); none: a global secret")
    uses: list[str] | None = Field(default=None, description=f"what it may serve: {', '.join(USES)}; default "
                                   "provider (global) or http_header and webhook (a team's); an update keeps them")


class TeamSecretIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: str = Field(min_length=1)
    uses: list[str] | None = Field(default=None, description="http_header and/or webhook (default both)")


def _store(request: Request):  # noqa: ANN202
    return request.app.state.store


def _team_id(store: Any, ref: str | None) -> str | None:
    return service.get_team(store, ref)["id"] if ref else None


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


class PasswordIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    password: str = Field(min_length=12, max_length=1024, description="the user's console password")


@router.put("/admin/users/{ref}/password", tags=["admin"])
async def set_password(ref: str, body: PasswordIn, request: Request, p: Principal = Depends(admin)) -> Response:
    """Set a user's console password (by id or email; stored as a scrypt hash); ends the user's sessions."""
    out = await run_in_threadpool(sessions.set_password, _store(request), ref, body.password)
    _audit(request, "user.password.set", p, user_id=out["user_id"])
    return json_response(out)


@router.get("/admin/keys", tags=["admin"])
async def list_keys(request: Request, team: str | None = None, _p: Principal = Depends(admin)) -> Response:
    store = _store(request)
    team_id = await run_in_threadpool(_team_id, store, team)
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
    """Every secret's name, owner, uses and grants (never a value)."""
    return json_response({"data": await run_in_threadpool(request.app.state.vault.names)})


@router.put("/admin/secrets/{name}", tags=["admin"])
async def put_secret(name: str, body: SecretIn, request: Request, p: Principal = Depends(admin)) -> Response:
    """Store a secret owned by `team` (or global) serving `uses`."""
    team_id = await run_in_threadpool(_team_id, _store(request), body.team)
    return await _put_secret(request, p, name, body.value, team_id, body.uses)


async def _put_secret(request: Request, p: Principal, name: str, value: str, team_id: str | None,
                      uses: list[str] | None) -> Response:
    out = await run_in_threadpool(lambda: request.app.state.vault.put(name, value, team_id=team_id, uses=uses))
    _audit(request, "secret.put", p, secret=name, owner=team_id, uses=out["uses"], team_id=team_id)
    return json_response({**out, "stored": True})


@router.delete("/admin/secrets/{name}", status_code=204, tags=["admin"])
async def delete_secret(name: str, request: Request, p: Principal = Depends(admin)) -> Response:
    await run_in_threadpool(request.app.state.vault.delete, name)
    _audit(request, "secret.delete", p, secret=name)
    return json_response(None, 204)


@router.put("/admin/secrets/{name}/grants/{team}/{use}", tags=["admin"])
async def grant_secret(name: str, team: str, use: str, request: Request, p: Principal = Depends(admin)) -> Response:
    """Let `team`'s workflows use secret `name` for `use` (one of the secret's own uses)."""
    team_id = await run_in_threadpool(_team_id, _store(request), team)
    created = await run_in_threadpool(request.app.state.vault.grant, name, team_id, use, p.user_id or p.key_id)
    _audit(request, "secret.grant", p, secret=name, grantee=team_id, use=use, team_id=team_id)
    return json_response({"secret": name, "team_id": team_id, "use": use, "granted": True}, 201 if created else 200)


@router.delete("/admin/secrets/{name}/grants/{team}/{use}", status_code=204, tags=["admin"])
async def revoke_secret(name: str, team: str, use: str, request: Request, p: Principal = Depends(admin)) -> Response:
    team_id = await run_in_threadpool(_team_id, _store(request), team)
    await run_in_threadpool(request.app.state.vault.revoke, name, team_id, use)
    _audit(request, "secret.revoke", p, secret=name, grantee=team_id, use=use, team_id=team_id)
    return json_response(None, 204)


# -- a team's own secrets (builders) ------------------------------------------------------------

def _team_manager(p: Principal) -> str:
    p.require("secrets.manage")
    if p.team_id is None:
        raise Forbidden(f"key {p.key_id} has no team, so it owns no team secrets",
                        fix="use a key that belongs to a team, or an admin key with /admin/secrets", key_id=p.key_id)
    return p.team_id


@router.get("/v1/secrets", tags=["identity"])
async def list_team_secrets(request: Request, p: Principal = Depends(principal)) -> Response:
    """Names and uses of the secrets the caller's team owns or was granted (never a value)."""
    team_id = _team_manager(p)
    return json_response({"data": await run_in_threadpool(
        lambda: request.app.state.vault.names(team_id, scoped=True))})


@router.put("/v1/secrets/{name}", tags=["identity"])
async def put_team_secret(name: str, body: TeamSecretIn, request: Request,
                          p: Principal = Depends(principal)) -> Response:
    """Store a secret owned by the caller's team (for its workflows' headers and webhooks)."""
    return await _put_secret(request, p, name, body.value, _team_manager(p), body.uses)


@router.delete("/v1/secrets/{name}", status_code=204, tags=["identity"])
async def delete_team_secret(name: str, request: Request, p: Principal = Depends(principal)) -> Response:
    team_id = _team_manager(p)
    await run_in_threadpool(lambda: request.app.state.vault.delete(name, team_id, scoped=True))
    _audit(request, "secret.delete", p, secret=name, owner=team_id, team_id=team_id)
    return json_response(None, 204)
