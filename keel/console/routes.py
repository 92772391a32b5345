"""The console at `/console`: its assets, sign-in and sign-out, and every page's route (none in the API spec).

Sign-in takes an API key or a user's email and password (set by an admin) and opens a session: an HttpOnly,
SameSite=Strict cookie scoped to `/console` (Secure over TLS) holding a random token. Only console routes read
it, so no API route ever accepts a cookie. Each sign-in, failed sign-in and sign-out is an audit event.
"""

from __future__ import annotations

import hmac
from urllib.parse import urlsplit

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import FileResponse, RedirectResponse, Response

from keel.console import (pages_admin, pages_agents, pages_inbox, pages_knowledge, pages_ops, pages_playground,
                          pages_policy, pages_reports, pages_workflows, web)
from keel.console.throttle import (KEY_FAILURES_AUDITED, SignInThrottle, address_key, client_address, email_key,
                                  networks)
from keel.core.errors import KeelError, NotFound, Unauthorized
from keel.identity import sessions
from keel.identity.service import KEY_PREFIX, split_key

MAX_SECRET = 1024
STATIC = {  # name → media type: nothing else is served under /console/static
    "htmx.min.js": "text/javascript", "console.css": "text/css", "console.js": "text/javascript",
    "favicon.svg": "image/svg+xml",
}


def _next(value: str, request: Request) -> str:
    """Where to go after sign-in: a console path only (never another site)."""
    base = web.root(request)
    parts = urlsplit(value or "")
    if parts.scheme or parts.netloc or not parts.path.startswith(base + "/") or "\\" in value:
        return base + "/"
    return value


def router() -> APIRouter:
    r = APIRouter(prefix="/console", include_in_schema=False)

    @r.get("/static/{name}")
    async def static(name: str) -> Response:
        media = STATIC.get(name)
        if media is None:
            raise NotFound(f"no console asset {name!r}", fix="open /console")
        return FileResponse(web.HERE / "static" / name, media_type=media,
                            headers={"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"})

    @r.get("/sign-in")
    async def sign_in_form(request: Request, next: str = "") -> Response:
        return _sign_in_page(request, next, "", 200)

    @r.post("/sign-in")
    async def sign_in(request: Request) -> Response:
        form = await request.form()
        field = {k: str(v)[:MAX_SECRET] for k, v in form.items() if isinstance(v, str)}
        target = _next(field.get("next", ""), request)
        pre = request.cookies.get(web.PRE_CSRF_COOKIE, "")
        if not pre or not hmac.compare_digest(pre.encode(), field.get("csrf", "").encode()):
            return _sign_in_page(request, target, "The form expired: sign in again.", 403)
        store = request.app.state.store
        key, email = field.get("key", "").strip(), field.get("email", "").strip()
        how = "key" if key else "password"
        guard = _throttle(request)
        address = client_address(request.client.host if request.client else None,
                                 request.headers.getlist("x-forwarded-for"), guard.trusted)
        wait = 0.0 if key or not email else guard.retry_after(email)
        if wait:
            if refused := guard.to_audit("email " + email_key(email)):
                await web.audit(request, "console.sign_in.throttled", email[:100], method=how, refused=refused)
            response = _sign_in_page(request, target, "Too many failed sign-ins for this email: try again in "
                                     f"{max(1, round(wait / 60))} minutes, or ask an admin to reset the password.", 429)
            response.headers["Retry-After"] = str(max(1, round(wait)))
            return response
        spray = 0.0 if key or not email else guard.spray_wait(address)
        if spray:
            if refused := guard.to_audit("address " + address_key(address)):
                await web.audit(request, "console.sign_in.throttled", email[:100], method=how, scope="address",
                                address=address, refused=refused)
            response = _sign_in_page(request, target, "Too many failed password sign-ins from your address: try again "
                                     f"in {max(1, round(spray))} seconds, or sign in with an API key.", 429)
            response.headers["Retry-After"] = str(max(1, round(spray)))
            return response
        try:
            if key:
                p = await run_in_threadpool(sessions.check_key, store, key)
            elif email and field.get("password"):
                p = await run_in_threadpool(sessions.check_user, store, email, field["password"])
            else:
                raise Unauthorized("give an API key, or an email and a password", fix="fill in one of the forms")
        except Unauthorized as err:
            if email and not key and field.get("password"):
                guard.failed(email, address)
            # A key is named by its public prefix only: text not shaped like a key may be a password typed
            # into the wrong field, and is never written down.
            prefix = split_key(key) if key else None
            who = email[:100] if email else (KEY_PREFIX + prefix if prefix else ("not a Keel key" if key else ""))
            # key guesses cost no scrypt and are not throttled: their audit events are (per address, with a count)
            count = guard.to_audit("key " + address_key(address), KEY_FAILURES_AUDITED) if key else 1
            if count:
                await web.audit(request, "console.sign_in.failed", who or "anonymous", method=how, reason=err.detail,
                                **({"failures": count} if count > 1 else {}))
            return _sign_in_page(request, target, f"Not signed in: {err.detail}.", 401)
        if email and not key:
            guard.succeeded(email)
        settings = request.app.state.settings
        await run_in_threadpool(lambda: sessions.purge_sessions(store, idle_s=settings.console_session_idle_s,
                                                                max_s=settings.console_session_max_s))
        token, _session = await run_in_threadpool(sessions.open_session, store, p)
        await web.audit(request, "console.sign_in", p.key_id, team_id=p.team_id, method=how, role=p.role)
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(web.COOKIE, token, path=web.root(request), httponly=True, samesite="strict",
                            secure=web.secure(request))
        response.delete_cookie(web.PRE_CSRF_COOKIE, path=web.root(request))
        return response

    @r.post("/sign-out")
    async def sign_out(request: Request) -> Response:
        session = await web.current_session(request)
        response = RedirectResponse(web.root(request) + "/sign-in", status_code=303)
        response.delete_cookie(web.COOKIE, path=web.root(request), httponly=True, samesite="strict",
                               secure=web.secure(request))
        if session is None:
            return response
        page = web.Page(request, session)
        try:
            await page.form()  # CSRF: a cross-site form cannot sign anyone out
        except KeelError as err:
            return web.error_page(request, err, session)
        await run_in_threadpool(sessions.close_session, request.app.state.store, request.cookies[web.COOKIE])
        await page.audit("console.sign_out")
        return response

    @r.get("")
    @r.get("/")
    async def home(request: Request) -> Response:
        return RedirectResponse(web.root(request) + "/overview", status_code=303)

    for module in (pages_reports, pages_playground, pages_knowledge, pages_inbox, pages_admin, pages_workflows,
                   pages_agents, pages_ops, pages_policy):
        for method, path, handler in module.ROUTES:
            r.add_api_route(path, web.page(handler), methods=[method])
    return r


def _throttle(request: Request) -> SignInThrottle:
    """This process's failed-sign-in counts (one per app)."""
    state = request.app.state
    if getattr(state, "console_throttle", None) is None:
        state.console_throttle = SignInThrottle(per_minute=state.settings.console_failed_sign_ins_per_minute,
                                                trusted_proxies=networks(state.settings.trusted_proxies))
    return state.console_throttle


def _sign_in_page(request: Request, target: str, message: str, status: int) -> Response:
    pre = request.cookies.get(web.PRE_CSRF_COOKIE) or web.new_csrf()
    settings = request.app.state.settings
    response = web.render(request, "sign_in.html", status, title="Sign in", message=message, next=target,
                          pre_csrf=pre, idle_min=round(settings.console_session_idle_s / 60),
                          max_h=round(settings.console_session_max_s / 3600, 1))
    response.set_cookie(web.PRE_CSRF_COOKIE, pre, path=web.root(request), httponly=True, samesite="strict",
                        secure=web.secure(request))
    return response
