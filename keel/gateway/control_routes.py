"""Admin HTTP API for rate limits (`/admin/limits`) and budgets (`/admin/budgets`).

Changes take effect in this replica at once and in the others within two seconds.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.concurrency import run_in_threadpool

from keel.core.errors import BadRequest, NotFound, Unavailable
from keel.core.http import json_response
from keel.gateway.budgets import Budgets
from keel.gateway.limits import RateLimiter
from keel.identity import service as identity
from keel.identity.auth import admin, principal
from keel.identity.principal import Principal

router = APIRouter()
LIMIT_KINDS = {"keys": "key", "teams": "team"}
S = TypeVar("S")


class LimitIn(BaseModel):
    """`PUT /admin/limits/{keys|teams}/{id}`: requests and/or tokens per minute; null = no limit."""

    model_config = ConfigDict(extra="forbid")
    rpm: int | None = Field(default=None, gt=0, le=10**12, description="requests per minute")
    tpm: int | None = Field(default=None, gt=0, le=10**15, description="tokens per minute")

    @model_validator(mode="after")
    def _one_set(self) -> LimitIn:
        if self.rpm is None and self.tpm is None:
            raise ValueError("set `rpm`, `tpm` or both (to remove the limit, DELETE it)")
        return self


class BudgetIn(BaseModel):
    """`POST /admin/budgets`: a spend limit in US dollars for one key, team or user and period."""

    model_config = ConfigDict(extra="forbid")
    scope: Literal["key", "team", "user"]
    scope_id: str = Field(min_length=1, max_length=300, description="key id, team id or name, user id or email")
    period: Literal["day", "month", "total"] = "month"
    amount: float = Field(gt=0, le=1e9, description="the limit in USD")
    alert_percent: float | None = Field(default=None, gt=0, le=100,
                                        description="soft-limit alert threshold; default KEEL_BUDGET_ALERT_PERCENT")


class BudgetPatch(BaseModel):
    """`PATCH /admin/budgets/{id}`: a new limit and/or alert threshold."""

    model_config = ConfigDict(extra="forbid")
    amount: float | None = Field(default=None, gt=0, le=1e9)
    alert_percent: float | None = Field(default=None, gt=0, le=100)

    @model_validator(mode="after")
    def _one_set(self) -> BudgetPatch:
        if self.amount is None and self.alert_percent is None:
            raise ValueError("set `amount`, `alert_percent` or both")
        return self


def _stage(request: Request, kind: type[S], what: str) -> S:
    for stage in request.app.state.gateway.stages:
        if isinstance(stage, kind):
            return stage
    raise Unavailable(f"{what} are not enabled in this server", fix="build the gateway with keel.gateway.service")


def _audit(request: Request, action: str, p: Principal, **details: Any) -> None:
    hook = getattr(request.app.state, "audit", None)
    if hook is not None:
        hook(action=action, actor=p.key_id, **details)


def resolve(request: Request, scope: str, ref: str) -> str:
    """The stored id of the key (id or `sk-keel-<prefix>`), team (id or name) or user (id or email)."""
    store = request.app.state.store
    if scope == "team":
        return identity.get_team(store, ref)["id"]
    if scope == "key":
        for k in identity.list_keys(store):
            if ref in (k["id"], k["prefix"]):
                return k["id"]
        raise NotFound(f"API key {ref!r} does not exist", fix="list keys at GET /admin/keys", key_id=ref)
    for u in identity.list_users(store):
        if ref in (u["id"], u["email"]):
            return u["id"]
    raise NotFound(f"user {ref!r} does not exist", fix="list users at GET /admin/users", user_id=ref)


def _limit_scope(kind: str) -> str:
    if kind == "deployments":
        raise BadRequest("deployment limits are part of the deployment",
                         fix="set `rpm`/`tpm` on it in keel.yaml or with PUT /admin/deployments/{id}")
    scope = LIMIT_KINDS.get(kind)
    if scope is None:
        raise NotFound(f"no limits of kind {kind!r}", fix="use /admin/limits/keys/{id} or /admin/limits/teams/{id}")
    return scope


# -- rate limits -------------------------------------------------------------------------------------------

@router.get("/admin/limits", tags=["admin"])
async def list_limits(request: Request, _p: Principal = Depends(admin)) -> Response:
    """Key and team limits, and the deployments' own `rpm`/`tpm`."""
    limiter = _stage(request, RateLimiter, "rate limits")
    return json_response({"data": await run_in_threadpool(limiter.listing)})


@router.get("/admin/limits/{kind}/{ref}", tags=["admin"])
async def get_limit(kind: str, ref: str, request: Request, _p: Principal = Depends(admin)) -> Response:
    scope = _limit_scope(kind)
    limiter = _stage(request, RateLimiter, "rate limits")
    scope_id = await run_in_threadpool(resolve, request, scope, ref)
    return json_response(await run_in_threadpool(limiter.get, scope, scope_id))


@router.put("/admin/limits/{kind}/{ref}", tags=["admin"])
async def put_limit(kind: str, ref: str, body: LimitIn, request: Request, p: Principal = Depends(admin)) -> Response:
    """Set a key's or team's requests/min and tokens/min (replaces both)."""
    scope = _limit_scope(kind)
    limiter = _stage(request, RateLimiter, "rate limits")
    scope_id = await run_in_threadpool(resolve, request, scope, ref)
    out = await run_in_threadpool(limiter.put, scope, scope_id, body.rpm, body.tpm)
    _audit(request, "limit.put", p, scope=scope, scope_id=scope_id, rpm=body.rpm, tpm=body.tpm)
    return json_response(out)


@router.delete("/admin/limits/{kind}/{ref}", status_code=204, tags=["admin"])
async def delete_limit(kind: str, ref: str, request: Request, p: Principal = Depends(admin)) -> Response:
    scope = _limit_scope(kind)
    limiter = _stage(request, RateLimiter, "rate limits")
    scope_id = await run_in_threadpool(resolve, request, scope, ref)
    await run_in_threadpool(limiter.delete, scope, scope_id)
    _audit(request, "limit.delete", p, scope=scope, scope_id=scope_id)
    return json_response(None, 204)


# -- budgets -----------------------------------------------------------------------------------------------

@router.get("/admin/budgets", tags=["admin"])
async def list_budgets(request: Request, scope: Literal["key", "team", "user"] | None = None,
                       scope_id: str | None = None, _p: Principal = Depends(admin)) -> Response:
    """Budgets with this period's spent, reserved and remaining (as of the replicas' last flush, ≤ 0.5 s)."""
    budgets = _stage(request, Budgets, "budgets")
    if scope and scope_id:
        scope_id = await run_in_threadpool(resolve, request, scope, scope_id)
    return json_response({"data": await run_in_threadpool(budgets.listing, scope, scope_id)})


@router.get("/v1/budgets", tags=["gateway"])
async def my_budgets(request: Request, p: Principal = Depends(principal)) -> Response:
    """The budgets that bound the caller's spending (its key's, its team's, its user's; an admin's: every one), with
    this period's spent, reserved and remaining — what a team sees of its own limits, not another team's."""
    budgets = _stage(request, Budgets, "budgets")
    return json_response({"data": await run_in_threadpool(budgets.binding, p)})


@router.post("/admin/budgets", status_code=201, tags=["admin"])
async def create_budget(body: BudgetIn, request: Request, p: Principal = Depends(admin)) -> Response:
    budgets = _stage(request, Budgets, "budgets")
    scope_id = await run_in_threadpool(resolve, request, body.scope, body.scope_id)
    out = await run_in_threadpool(budgets.create, body.scope, scope_id, body.period, body.amount, body.alert_percent)
    _audit(request, "budget.create", p, budget_id=out["id"], scope=body.scope, scope_id=scope_id,
           amount=body.amount, period=body.period)
    return json_response(out, 201)


@router.get("/admin/budgets/{budget_id}", tags=["admin"])
async def get_budget(budget_id: str, request: Request, _p: Principal = Depends(admin)) -> Response:
    """One budget with this period's usage and its latest events (soft-limit alerts, expired holds)."""
    budgets = _stage(request, Budgets, "budgets")
    return json_response(await run_in_threadpool(budgets.get, budget_id))


@router.patch("/admin/budgets/{budget_id}", tags=["admin"])
@router.put("/admin/budgets/{budget_id}", tags=["admin"])
async def update_budget(budget_id: str, body: BudgetPatch, request: Request,
                        p: Principal = Depends(admin)) -> Response:
    budgets = _stage(request, Budgets, "budgets")
    out = await run_in_threadpool(budgets.update, budget_id, body.amount, body.alert_percent)
    _audit(request, "budget.update", p, budget_id=budget_id, amount=body.amount, alert_percent=body.alert_percent)
    return json_response(out)


@router.delete("/admin/budgets/{budget_id}", status_code=204, tags=["admin"])
async def delete_budget(budget_id: str, request: Request, p: Principal = Depends(admin)) -> Response:
    budgets = _stage(request, Budgets, "budgets")
    await run_in_threadpool(budgets.delete, budget_id)
    _audit(request, "budget.delete", p, budget_id=budget_id)
    return json_response(None, 204)


# -- deployment health ---------------------------------------------------------------------------------------

@router.get("/admin/circuits", tags=["admin"])
async def list_circuits(request: Request, _p: Principal = Depends(admin)) -> Response:
    """Each deployment's circuit breaker in this replica (closed, open or half_open), its consecutive failures,
    requests in flight and median latencies; deployments this replica has not called yet are absent."""
    router_ = getattr(request.app.state.gateway, "router", None)
    if router_ is None:
        raise Unavailable("the router is not installed in this server", fix="build the gateway with keel.gateway.service")
    snapshot = router_.snapshot()
    return json_response({"data": [{"deployment": did, **state} for did, state in sorted(snapshot.items())]})
