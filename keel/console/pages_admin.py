"""Admin: API keys — list, create (the key is shown once, on the page that created it) and revoke — and teams and
users (create; set a user's console password), through identity's service functions as `/admin/…` does, with
the same audit events."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.responses import RedirectResponse, Response

from keel.console.web import Page, root
from keel.identity import service, sessions
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


async def people(page: Page, message: str = "", status: int = 200) -> Response:
    _admin(page)
    teams = await run_in_threadpool(service.list_teams, page.store)
    users = await run_in_threadpool(service.list_users, page.store)
    return page.render("people.html", status, title="Admin: teams and users", teams=teams, users=users,
                       team_names={t["id"]: t["name"] for t in teams}, roles=ROLES, message=message)


async def create_team(page: Page) -> Response:
    _admin(page)
    form = await page.form()
    team = await run_in_threadpool(service.create_team, page.store, form.get("name", "").strip()[:200],
                                   form.get("classification") or "internal")
    await page.audit("team.create", team_id=team["id"])
    return await people(page, f"Team {team['name']} created.", 201)


async def create_user(page: Page) -> Response:
    _admin(page)
    form = await page.form()
    user = await run_in_threadpool(service.create_user, page.store, form.get("email", "").strip()[:320],
                                   form.get("role", "member"), form.get("team") or None, form.get("name", "")[:200])
    await page.audit("user.create", user_id=user["id"])
    return await people(page, f"User {user['email']} created.", 201)


async def set_password(page: Page) -> Response:
    _admin(page)
    form = await page.form()
    out = await run_in_threadpool(sessions.set_password, page.store, page.request.path_params["user_id"],
                                  form.get("password", ""))
    await page.audit("user.password.set", user_id=out["user_id"])
    return await people(page, f"Password set for {out['email']}; their open sessions ended.")


ROUTES = [
    ("GET", "/people", people),
    ("POST", "/people/teams", create_team),
    ("POST", "/people/users", create_user),
    ("POST", "/people/users/{user_id}/password", set_password),
    ("GET", "/keys", keys),
    ("POST", "/keys", create_key),
    ("POST", "/keys/{key_id}/revoke", revoke_key),
]
