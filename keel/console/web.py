"""The console's request plumbing: the session behind the cookie, CSRF checks, rendering a page with the
strict security headers, and turning a Keel error into an HTML error page (a 404 stays a 404: a member who
opens another team's run by URL sees the not-found page, exactly as the API answers it).

Server-rendered Jinja2 with a vendored htmx: pages work without a build step or a bundle, and the few
interactive parts (verify the chain, approve in the inbox) are htmx attributes, not a JavaScript app.
"""

from __future__ import annotations

import hmac
import secrets as pysecrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2
from fastapi import Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import HTMLResponse, RedirectResponse, Response

from keel.core.errors import Forbidden, KeelError, Unauthorized
from keel.identity import sessions
from keel.identity.principal import Principal

HERE = Path(__file__).parent
COOKIE = "keel_console"
PRE_CSRF_COOKIE = "keel_console_csrf"  # the sign-in form's double-submit token (no session yet)
MAX_FORM_FIELD = 4000
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; font-src 'self'; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store",
           "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY"}

templates = jinja2.Environment(loader=jinja2.FileSystemLoader(str(HERE / "templates")),
                               autoescape=jinja2.select_autoescape(default=True), trim_blocks=True,
                               lstrip_blocks=True, undefined=jinja2.StrictUndefined)

# The pages, in navigation order: (path, label, who sees it in the navigation).
NAV: list[tuple[str, str, Callable[[Principal], bool]]] = [
    ("overview", "Overview", lambda p: p.has("reports.read.own")),
    ("usage", "Usage & cost", lambda p: p.has("reports.read.own")),
    ("playground", "Playground", lambda p: p.has("models.use")),
    ("knowledge", "Knowledge", lambda p: p.has("collections.read")),
    ("inbox", "Inbox", lambda p: p.has("approvals.decide") or p.has("reviews.decide") or p.has("audit.read")),
    ("workflows", "Workflows", lambda p: p.role != "auditor" or p.has("audit.read")),
    ("agents", "Agents", lambda p: p.role != "auditor" or p.has("audit.read")),
    ("audit", "Audit", lambda p: p.has("audit.read")),
    ("keys", "Admin: keys", lambda p: p.is_admin),
    ("people", "Admin: people", lambda p: p.is_admin),
    ("budgets", "Admin: budgets", lambda p: p.is_admin),
    ("limits", "Admin: limits", lambda p: p.is_admin),
    ("deployments", "Admin: deployments", lambda p: p.is_admin),
    ("policy", "Policy", lambda p: p.has("audit.read")),
    ("guard-events", "Guard events", lambda p: p.has("audit.read")),
]


def root(request: Request) -> str:
    return request.scope.get("root_path", "").rstrip("/") + "/console"


def secure(request: Request) -> bool:
    """Whether the browser reached us over TLS (directly, or through a proxy that says so)."""
    return request.url.scheme == "https" or request.headers.get("x-forwarded-proto", "") == "https"


class Page:
    """What a console route works with: the request, the signed-in principal and its session."""

    def __init__(self, request: Request, session: sessions.Session) -> None:
        self.request = request
        self.session = session
        self.p = session.principal

    @property
    def store(self) -> Any:
        return self.request.app.state.store

    @property
    def state(self) -> Any:
        return self.request.app.state

    def render(self, template: str, status: int = 200, **ctx: Any) -> Response:
        return render(self.request, template, status, principal=self.p, csrf=self.session.csrf, **ctx)

    async def form(self) -> dict[str, str]:
        """The posted form, CSRF-checked (field `csrf` or header `X-CSRF-Token` equal to the session's)."""
        form = await self.request.form()
        sent = str(form.get("csrf") or self.request.headers.get("x-csrf-token") or "")
        if not hmac.compare_digest(sent.encode(), self.session.csrf.encode()):
            raise Forbidden("the form's CSRF token is missing or wrong", fix="reload the page and submit it again")
        return {k: str(v)[:MAX_FORM_FIELD] for k, v in form.items() if isinstance(v, str)}

    def audit(self, action: str, **details: Any) -> Awaitable[Any]:
        return audit(self.request, action, self.p.key_id, team_id=self.p.team_id, **details)


async def audit(request: Request, action: str, actor: str, **details: Any) -> None:
    hook = getattr(request.app.state, "audit", None)
    if hook is not None:
        await run_in_threadpool(lambda: hook(action=action, actor=actor, **details))


def render(request: Request, template: str, status: int = 200, **ctx: Any) -> Response:
    p: Principal | None = ctx.get("principal")
    nav = [(path, label) for path, label, shown in NAV if p is not None and shown(p)]
    body = templates.get_template(template).render(root=root(request), nav=nav, path=request.url.path,
                                                   principal=p, csrf=ctx.pop("csrf", ""),
                                                   **{k: v for k, v in ctx.items() if k != "principal"})
    return HTMLResponse(body, status_code=status, headers=HEADERS)


def error_page(request: Request, err: KeelError, session: sessions.Session | None) -> Response:
    title = {404: "Not found", 403: "Not allowed"}.get(err.status, err.title)
    return render(request, "error.html", err.status, principal=session.principal if session else None,
                  csrf=session.csrf if session else "", title=title, err=err)


async def current_session(request: Request) -> sessions.Session | None:
    token = request.cookies.get(COOKIE)
    if not token or len(token) > 200:
        return None
    settings = request.app.state.settings
    try:
        return await run_in_threadpool(sessions.resume_session, request.app.state.store, token,
                                       idle_s=settings.console_session_idle_s, max_s=settings.console_session_max_s)
    except Unauthorized:
        return None


Handler = Callable[[Page], Awaitable[Response]]


def page(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """A console route: signed in (else to the sign-in form, remembering where to come back), errors as pages."""

    async def endpoint(request: Request) -> Response:
        session = await current_session(request)
        if session is None:
            if request.method != "GET" or request.headers.get("hx-request"):
                return error_page(request, Unauthorized("you are not signed in", fix="sign in again"), None)
            back = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            response = RedirectResponse(f"{root(request)}/sign-in?next={_quote(back)}", status_code=303)
            response.delete_cookie(COOKIE, path=root(request))
            return response
        try:
            return await handler(Page(request, session))
        except KeelError as err:
            return error_page(request, err, session)

    endpoint.__name__ = handler.__name__
    return endpoint


def _quote(text: str) -> str:
    return quote(text, safe="/")


def new_csrf() -> str:
    return pysecrets.token_urlsafe(32)
