"""Admin: budgets, rate limits and deployments (with each one's circuit state) — the service calls behind
`/admin/budgets`, `/admin/limits`, `/admin/deployments` and `/admin/circuits`, with the API's own request models
checking each form, so a form accepts exactly what the API accepts and audits the same events. A deployment's
API key goes into the vault; the page shows the vault reference only, never a value."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.responses import RedirectResponse, Response

from keel.console.web import Page, root
from keel.core.errors import NotFound, Unavailable, ValidationFailed
from keel.gateway.budgets import Budgets
from keel.gateway.control_routes import BudgetIn, BudgetPatch, LimitIn, resolve
from keel.gateway.limits import RateLimiter
from keel.identity import service

S = TypeVar("S")
M = TypeVar("M", bound=BaseModel)
LIMIT_SCOPES = ("key", "team")
DEPLOYMENT_FIELDS = ("alias", "provider", "model", "kind", "base_url", "input_price_per_1m", "output_price_per_1m",
                     "rpm", "tpm")
EDITABLE = ("base_url", "input_price_per_1m", "output_price_per_1m", "weight", "rpm", "tpm")


def _admin(page: Page) -> None:
    page.p.require("admin.manage")


def _stage(page: Page, kind: type[S], what: str) -> S:
    for stage in page.state.gateway.stages:
        if isinstance(stage, kind):
            return stage
    raise Unavailable(f"{what} are not enabled in this server", fix="build the gateway with keel.gateway.service")


def checked(model: type[M], form: dict[str, str], fields: tuple[str, ...]) -> M:
    """The form's non-empty `fields` through the API's request model; a mistake is a 422 naming the field."""
    try:
        return model(**{f: form[f] for f in fields if form.get(f, "").strip()})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'form'}: {e['msg']}" for e in exc.errors())
        raise ValidationFailed(f"the form is not valid: {problems}", fix="correct the named fields") from None


def _teams(page: Page) -> dict[str, str]:
    return {t["id"]: t["name"] for t in service.list_teams(page.store)}


# -- budgets -------------------------------------------------------------------------------------------------

async def budgets(page: Page, message: str = "", status: int = 200) -> Response:
    _admin(page)
    rows = await run_in_threadpool(_stage(page, Budgets, "budgets").listing)
    teams = await run_in_threadpool(_teams, page)
    return page.render("budgets.html", status, title="Admin: budgets", budgets=rows, teams=teams, message=message)


async def create_budget(page: Page) -> Response:
    _admin(page)
    form = await page.form()
    body = checked(BudgetIn, form, ("scope", "scope_id", "period", "amount", "alert_percent"))
    stage = _stage(page, Budgets, "budgets")
    scope_id = await run_in_threadpool(resolve, page.request, body.scope, body.scope_id)
    out = await run_in_threadpool(stage.create, body.scope, scope_id, body.period, body.amount, body.alert_percent)
    await page.audit("budget.create", budget_id=out["id"], scope=body.scope, scope_id=scope_id, amount=body.amount,
                     period=body.period)
    return await budgets(page, f"Budget {out['id']} created: {body.scope} {body.scope_id}, "
                               f"${body.amount:g} per {body.period}.", 201)


async def update_budget(page: Page) -> Response:
    _admin(page)
    form = await page.form()
    body = checked(BudgetPatch, form, ("amount", "alert_percent"))
    budget_id = page.request.path_params["budget_id"]
    await run_in_threadpool(_stage(page, Budgets, "budgets").update, budget_id, body.amount, body.alert_percent)
    await page.audit("budget.update", budget_id=budget_id, amount=body.amount, alert_percent=body.alert_percent)
    return await budgets(page, f"Budget {budget_id} updated.")


async def delete_budget(page: Page) -> Response:
    _admin(page)
    await page.form()
    budget_id = page.request.path_params["budget_id"]
    await run_in_threadpool(_stage(page, Budgets, "budgets").delete, budget_id)
    await page.audit("budget.delete", budget_id=budget_id)
    return RedirectResponse(f"{root(page.request)}/budgets", 303)


# -- rate limits ---------------------------------------------------------------------------------------------

async def limits(page: Page, message: str = "", status: int = 200) -> Response:
    _admin(page)
    rows = await run_in_threadpool(_stage(page, RateLimiter, "rate limits").listing)
    teams = await run_in_threadpool(_teams, page)
    return page.render("limits.html", status, title="Admin: rate limits", limits=rows, teams=teams, message=message)


def _limit_scope(form: dict[str, str]) -> str:
    scope = form.get("scope", "")
    if scope not in LIMIT_SCOPES:
        raise ValidationFailed(f"scope {scope[:40]!r} is not key or team",
                               fix="a deployment's limits are part of the deployment: pick key or team")
    return scope


async def put_limit(page: Page) -> Response:
    _admin(page)
    form = await page.form()
    scope = _limit_scope(form)
    body = checked(LimitIn, form, ("rpm", "tpm"))
    ref = form.get("ref", "").strip()[:300]
    scope_id = await run_in_threadpool(resolve, page.request, scope, ref)
    await run_in_threadpool(_stage(page, RateLimiter, "rate limits").put, scope, scope_id, body.rpm, body.tpm)
    await page.audit("limit.put", scope=scope, scope_id=scope_id, rpm=body.rpm, tpm=body.tpm)
    return await limits(page, f"Limit set for {scope} {ref}.")


async def delete_limit(page: Page) -> Response:
    _admin(page)
    form = await page.form()
    scope = _limit_scope(form)
    ref = form.get("ref", "").strip()[:300]
    try:  # a team by name or id, a key by prefix or id, as the set form takes them
        scope_id = await run_in_threadpool(resolve, page.request, scope, ref)
    except NotFound:
        scope_id = ref  # a limit left by a deleted team or key goes by the stored id the table shows
    await run_in_threadpool(_stage(page, RateLimiter, "rate limits").delete, scope, scope_id)
    await page.audit("limit.delete", scope=scope, scope_id=scope_id)
    return RedirectResponse(f"{root(page.request)}/limits", 303)


# -- deployments ---------------------------------------------------------------------------------------------

def _deployments(page: Page) -> Any:
    deps = getattr(getattr(page.state, "gateway", None), "deployments", None)
    if deps is None:
        raise NotFound("the gateway is not enabled on this server", fix="start Keel with the gateway")
    return deps


def _circuits(page: Page) -> dict[str, dict[str, Any]]:
    router = getattr(page.state.gateway, "router", None)
    return router.snapshot() if router is not None else {}


async def deployments(page: Page, message: str = "", status: int = 200) -> Response:
    _admin(page)
    deps = _deployments(page)
    await run_in_threadpool(deps.reload)
    rows = deps.listing()
    return page.render("deployments.html", status, title="Admin: deployments", deployments=rows,
                       circuits=_circuits(page), message=message)


async def add_deployment(page: Page) -> Response:
    """As `POST /admin/deployments`: the config checked by the gateway, the API key stored in the vault under
    `deployment-<id>` and the deployment pointing at it by name."""
    _admin(page)
    form = await page.form()
    data: dict[str, Any] = {f: form[f].strip() for f in DEPLOYMENT_FIELDS if form.get(f, "").strip()}
    deps = _deployments(page)
    cfg = deps.parse(data)
    await run_in_threadpool(deps.check_new, cfg.deployment_id())  # a duplicate changes no stored key
    api_key = form.get("api_key", "")
    if api_key:
        data["credential"] = f"deployment-{cfg.deployment_id()}".replace("/", "-")[:190]
        await run_in_threadpool(page.state.vault.put, data["credential"], api_key)
    out = await run_in_threadpool(deps.add, deps.parse(data))
    await page.audit("deployment.create", deployment=out["id"], credential=out.get("credential"))
    return await deployments(page, f"Deployment {out['id']} added.", 201)


async def update_deployment(page: Page) -> Response:
    """As `PUT /admin/deployments/{id}`: the filled-in fields replace the deployment's, a new API key replaces the
    vault secret it names (or is stored under `deployment-<id>`) once the changed config has been checked."""
    _admin(page)
    form = await page.form()
    did = form.get("id", "")[:300]
    patch: dict[str, Any] = {f: form[f].strip() for f in EDITABLE if form.get(f, "").strip()}
    deps = _deployments(page)
    api_key = form.get("api_key", "")
    if api_key:
        current = next((d for d in deps.listing() if d["id"] == did and d["source"] == "api"), None)
        if current is None:
            raise NotFound(f"deployment {did!r} does not exist or is defined in keel.yaml",
                           fix="pick a deployment added through the API or this page", deployment=did)
        patch["credential"] = current.get("credential") or f"deployment-{did}".replace("/", "-")[:190]
        deps.parse({**deps.all()[did].model_dump(), **patch, "id": did})  # a refused change stores no key
        await run_in_threadpool(page.state.vault.put, patch["credential"], api_key)
    out = await run_in_threadpool(deps.update, did, patch)
    await page.audit("deployment.update", deployment=did, fields=sorted(patch))
    return await deployments(page, f"Deployment {out['id']} updated.")


async def delete_deployment(page: Page) -> Response:
    _admin(page)
    form = await page.form()
    did = form.get("id", "")[:300]
    await run_in_threadpool(_deployments(page).delete, did)
    await page.audit("deployment.delete", deployment=did)
    return RedirectResponse(f"{root(page.request)}/deployments", 303)


ROUTES = [
    ("GET", "/budgets", budgets),
    ("POST", "/budgets", create_budget),
    ("POST", "/budgets/{budget_id}", update_budget),
    ("POST", "/budgets/{budget_id}/delete", delete_budget),
    ("GET", "/limits", limits),
    ("POST", "/limits", put_limit),
    ("POST", "/limits/delete", delete_limit),
    ("GET", "/deployments", deployments),
    ("POST", "/deployments", add_deployment),
    ("POST", "/deployments/edit", update_deployment),
    ("POST", "/deployments/delete", delete_deployment),
]
