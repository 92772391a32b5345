"""Admin: API keys — list, create (the key is shown once, on the page that created it) and revoke — through
identity's service functions, as `/admin/keys` does, with the same audit events."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.responses import RedirectResponse, Response

from keel.console.web import Page, root
from keel.identity import service
from keel.identity.principal import ROLES


def _admin(page: Page) -> None:
    page.p.require("admin.manage")


async def keys(page: Page, created: dict | None = None, status: int = 200) -> Response:
    _admin(page)
    rows = await run_in_threadpool(service.list_keys, page.store)
    teams = await run_in_threadpool(service.list_teams, page.store)
    names = {t["id"]: t["name"] for t in teams}
    rows = sorted(rows, key=lambda k: (k["revoked_at"] is not None, k["created_at"] or ""), reverse=False)
    return page.render("keys.html", status, title="Admin: keys", keys=rows, teams=teams, team_names=names,
                       roles=ROLES, created=created)


async def create_key(page: Page) -> Response:
    _admin(page)
    form = await page.form()
    key, record = await run_in_threadpool(
        lambda: service.create_key(page.store, role=form.get("role", "member"), name=form.get("name", "")[:200],
                                   team=form.get("team") or None))
    await page.audit("key.create", key_id=record["id"], role=record["role"])
    return await keys(page, created={**record, "key": key}, status=201)


async def revoke_key(page: Page) -> Response:
    _admin(page)
    await page.form()
    record = await run_in_threadpool(service.revoke_key, page.store, page.request.path_params["key_id"])
    page.state.authenticator.invalidate()
    await page.audit("key.revoke", key_id=record["id"])
    return RedirectResponse(f"{root(page.request)}/keys", 303)


ROUTES = [
    ("GET", "/keys", keys),
    ("POST", "/keys", create_key),
    ("POST", "/keys/{key_id}/revoke", revoke_key),
]
