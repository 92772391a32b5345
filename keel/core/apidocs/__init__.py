"""The API reference behind a key: `/openapi.json`, and `/docs` (Swagger UI from the package, strict CSP).

A browser cannot send a bearer header to a page, so `/docs` answers a browser without a key with a sign-in
form (still 401) whose key goes into an HttpOnly, SameSite=Strict cookie scoped to `/docs`: the cookie opens
the docs, their spec and assets and nothing else, so no API route ever accepts a cookie (no CSRF surface),
and a revoked key stops opening them as it stops opening everything else. The page loads only what Keel serves: the Swagger UI bundle
(`swagger-ui-bundle-v2`, used through its public `swagger_ui_path`), its stylesheet and Keel's start script.
"""

from __future__ import annotations

import html
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from swagger_ui_bundle import swagger_ui_path

from keel.core.errors import KeelError, NotFound, Unauthorized
from keel.core.http import json_response, problem_response

COOKIE = "keel_docs_key"
MAX_KEY_CHARS = 512
HERE = Path(__file__).parent
# name → (file, media type): nothing else is served under /docs/assets.
ASSETS = {
    "swagger-ui-bundle.js": (Path(str(swagger_ui_path)) / "swagger-ui-bundle.js", "text/javascript"),
    "swagger-ui.css": (Path(str(swagger_ui_path)) / "swagger-ui.css", "text/css"),
    "favicon.png": (Path(str(swagger_ui_path)) / "favicon-32x32.png", "image/png"),
    "docs.js": (HERE / "docs.js", "text/javascript"),
    "docs.css": (HERE / "docs.css", "text/css"),
}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; font-src 'self'; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
PAGE_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store",
                "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY"}
# The caller holding `key` (None: the key the request's headers send), or raises Unauthorized.
Authenticate = Callable[[Request, str | None], Awaitable[Any]]


def router(authenticate: Authenticate) -> APIRouter:
    """The reference's routes, none in the spec itself; `authenticate` checks keys (identity's, passed in)."""
    r = APIRouter(include_in_schema=False)

    async def caller(request: Request, *, cookie: bool) -> None:
        """A key in the headers wins; else, on /docs routes only, the sign-in cookie's."""
        sends_header = any(name in (b"authorization", b"x-api-key") for name, _ in request.scope["headers"])
        key = request.cookies.get(COOKIE) if cookie and not sends_header else None
        await authenticate(request, key)

    @r.get("/openapi.json")
    async def openapi(request: Request) -> Response:
        await caller(request, cookie=False)
        return json_response(request.app.openapi())

    @r.get("/docs/openapi.json")
    async def docs_openapi(request: Request) -> Response:
        await caller(request, cookie=True)
        return json_response(request.app.openapi())

    @r.get("/docs")
    async def docs(request: Request) -> Response:
        try:
            await caller(request, cookie=True)
        except Unauthorized as err:
            return refusal(request, err, "")
        return HTMLResponse(page(request.scope.get("root_path", "").rstrip("/")), headers=PAGE_HEADERS)

    @r.get("/docs/assets/{name}")
    async def asset(request: Request, name: str) -> Response:
        await caller(request, cookie=True)
        found = ASSETS.get(name)
        if found is None:
            raise NotFound(f"no docs asset {name!r}", fix="open /docs")
        path, media_type = found
        return FileResponse(path, media_type=media_type,
                            headers={"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"})

    @r.post("/docs/sign-in")
    async def sign_in(request: Request) -> Response:
        form = await request.form()
        key = str(form.get("key") or "").strip()[:MAX_KEY_CHARS]
        try:
            if not key:
                raise Unauthorized("no API key sent", fix="paste a Keel API key (`sk-keel-…`) into the form")
            await authenticate(request, key)
        except Unauthorized as err:
            return refusal(request, err, "That key was not accepted: " + err.detail)
        root = request.scope.get("root_path", "").rstrip("/")
        response = RedirectResponse(f"{root}/docs", status_code=303)
        response.set_cookie(COOKIE, key, path=f"{root}/docs", httponly=True, samesite="strict",
                            secure=request.url.scheme == "https")
        return response

    @r.post("/docs/sign-out")
    async def sign_out(request: Request) -> Response:
        root = request.scope.get("root_path", "").rstrip("/")
        response = RedirectResponse(f"{root}/docs", status_code=303)
        response.delete_cookie(COOKIE, path=f"{root}/docs", httponly=True, samesite="strict",
                               secure=request.url.scheme == "https")
        return response

    return r


def refusal(request: Request, err: KeelError, message: str) -> Response:
    """401 to a caller without a valid key: the sign-in form for a browser, a problem body for anyone else."""
    if "text/html" not in request.headers.get("accept", ""):
        return problem_response(err)
    return HTMLResponse(sign_in_form(request.scope.get("root_path", "").rstrip("/"), message), status_code=401,
                        headers={**PAGE_HEADERS, "Content-Security-Policy": SIGN_IN_CSP})


SIGN_IN_CSP = "default-src 'none'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"


def sign_in_form(root: str, message: str) -> str:
    root = html.escape(root, quote=True)
    note = f"<p><strong>{html.escape(message)}</strong></p>" if message else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Keel API reference — sign in</title></head>
<body><h1>Keel API reference</h1>
<p>The reference needs a Keel API key, like every other route. It is kept in a cookie that only
<code>/docs</code> reads, until you sign out or close the browser.</p>{note}
<form method="post" action="{root}/docs/sign-in">
<label>API key <input type="password" name="key" autocomplete="off" required autofocus></label>
<button type="submit">Sign in</button></form>
</body></html>"""


def page(root: str) -> str:
    root = html.escape(root, quote=True)
    assets = f"{root}/docs/assets"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Keel API reference</title>
<link rel="icon" type="image/png" href="{assets}/favicon.png">
<link rel="stylesheet" href="{assets}/swagger-ui.css">
<link rel="stylesheet" href="{assets}/docs.css"></head>
<body>
<header class="keel-docs-bar"><span>Keel API reference — <em>Authorize</em> with your key to try requests</span>
<form method="post" action="{root}/docs/sign-out"><button type="submit">Sign out</button></form></header>
<div id="swagger-ui" data-url="{root}/docs/openapi.json"></div>
<script src="{assets}/swagger-ui-bundle.js"></script>
<script src="{assets}/docs.js"></script>
</body></html>"""
