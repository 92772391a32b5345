"""The policy (the active version, every stored version, a diff between two, a draft checked without being
activated, and for admins a draft activated) and the guard events — the calls behind `/admin/policy…` and `/v1/guard-events`, with their rules:
the policy is for auditors and admins; guard events are a team-bound auditor's team's, everyone's for admins and
team-less auditors, and the caller's own key's for anyone else. Guard events never hold the matched value."""

from __future__ import annotations

import difflib
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from keel.console.web import Page
from keel.core.errors import BadRequest, KeelError, NotFound
from keel.governance.policy import loader
from keel.governance.policy.model import parse_policy
from keel.governance.routes import MAX_POLICY_BYTES

VERSION_MAX = 2**31 - 1


def _gov(page: Page) -> Any:
    gov = getattr(page.state, "governance", None)
    if gov is None:
        raise NotFound("governance is not enabled on this server", fix="start Keel with governance")
    return gov


def _version(raw: str | None, name: str) -> int | None:
    if raw in (None, ""):
        return None
    if not raw.isdigit() or not 1 <= int(raw) <= VERSION_MAX:
        raise BadRequest(f"{name} must be a policy version number", fix="pick a version from the list", field=name)
    return int(raw)


def diff(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, str]]:
    """A unified diff of two versions' text as (kind, line): kind is add, del, hunk or same."""
    lines = difflib.unified_diff(old["content"].splitlines(), new["content"].splitlines(),
                                 f"version {old['version']}", f"version {new['version']}", lineterm="")
    out = []
    for line in lines:
        kind = ("hunk" if line.startswith(("@@", "---", "+++")) else "add" if line.startswith("+")
                else "del" if line.startswith("-") else "same")
        out.append((kind, line))
    return out


async def policy(page: Page, draft: str = "", verdict: dict[str, Any] | None = None, status: int = 200,
                 message: str = "") -> Response:
    page.p.require("audit.read")
    active = _gov(page).policy.engine.version
    q = page.request.query_params
    shown_v = _version(q.get("version"), "version") or active
    against_v = _version(q.get("diff"), "diff")
    versions = await run_in_threadpool(loader.list_versions, page.store)
    shown = await run_in_threadpool(loader.get_version, page.store, shown_v)
    changes = None
    if against_v is not None:
        against = await run_in_threadpool(loader.get_version, page.store, against_v)
        changes = diff(against, shown)
    return page.render("policy.html", status, title="Policy", active=active, shown=shown, versions=versions,
                       against=against_v, changes=changes, draft=draft, verdict=verdict, message=message,
                       may_activate=page.p.has("admin.manage"))


async def check_draft(page: Page) -> Response:
    """As `POST /admin/policy/check`: the draft is parsed and checked, never activated. An invalid draft is the
    page again with the parser's message (field and line) and a 400, as the API answers it."""
    page.p.require("audit.read")
    text = await _draft(page)
    try:
        parsed = parse_policy(text, "draft")
    except KeelError as err:
        return await policy(page, text, {"valid": False, "detail": err.detail}, err.status)
    return await policy(page, text, {"valid": True, "name": parsed.name,
                                     "rules": [r.name for r in parsed.data_rules]})


async def _draft(page: Page) -> str:
    await page.form()  # CSRF first; its copy of the fields is cut to the console's field size, a draft is not
    text = str((await page.request.form()).get("draft") or "")
    if len(text.encode()) > MAX_POLICY_BYTES:
        raise BadRequest(f"the draft is over the {MAX_POLICY_BYTES}-byte limit", fix="send a shorter policy")
    return text


async def activate(page: Page) -> Response:
    """As `PUT /admin/policy` (admins): the draft becomes the active policy on every process of this store, and
    the policy's own audit event records it; an invalid draft changes nothing and is shown as the check shows it."""
    page.p.require("admin.manage")
    text = await _draft(page)
    try:
        engine = await run_in_threadpool(_gov(page).policy.set, text, page.p.key_id)
    except KeelError as err:
        return await policy(page, text, {"valid": False, "detail": err.detail}, err.status)
    return await policy(page, message=f"Version {engine.version} is now the active policy.")


async def guard_events(page: Page) -> Response:
    gov = _gov(page)
    p = page.p
    request_id = page.request.query_params.get("request_id", "").strip()[:200] or None
    await gov.events.flush()
    if p.has("audit.read"):
        scope = None if p.is_admin or p.team_id is None else p.team_id
        rows = await run_in_threadpool(lambda: gov.events.query(request_id=request_id, team_id=scope, limit=200))
    else:
        rows = await run_in_threadpool(lambda: gov.events.query(request_id=request_id, key_id=p.key_id, limit=200))
    return page.render("guard_events.html", title="Guard events", events=rows, request_id=request_id or "",
                       everyone=p.has("audit.read"))


ROUTES = [
    ("GET", "/policy", policy),
    ("POST", "/policy/check", check_draft),
    ("POST", "/policy/activate", activate),
    ("GET", "/guard-events", guard_events),
]
