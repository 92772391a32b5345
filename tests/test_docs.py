"""The API reference: `/openapi.json` and `/docs` need a key like every other route, and `/docs` works offline
(Swagger UI ships in the package, served by Keel under a strict Content-Security-Policy)."""

from __future__ import annotations

import re

import httpx
import pytest

from conftest import KeelServer

PAGES = ["/openapi.json", "/docs", "/docs/openapi.json", "/docs/assets/swagger-ui-bundle.js",
         "/docs/assets/swagger-ui.css", "/docs/assets/docs.js"]
EXTERNAL = re.compile(r"""(?:src|href|action)\s*=\s*["']?\s*(?:[a-z][a-z0-9+.-]*:|//)""", re.I)


@pytest.fixture(scope="module")
def srv(module_server_factory) -> KeelServer:
    return module_server_factory()


@pytest.fixture(scope="module")
def member_key(srv) -> str:
    with srv.admin() as admin:
        r = admin.post("/admin/keys", json={"role": "member", "name": "docs-reader"})
        assert r.status_code == 201, r.text
        return r.json()["key"]


def asset_urls(html: str) -> list[str]:
    return re.findall(r"""(?:src|href)="([^"]+)\"""", html)


@pytest.mark.parametrize("path", PAGES)
def test_api_reference_refuses_an_anonymous_caller(srv, path):
    for headers in ({}, {"Authorization": "Bearer sk-keel-not-a-key"}, {"Accept": "application/json"}):
        r = httpx.get(srv.url + path, headers=headers)
        assert r.status_code == 401, (path, headers, r.text[:200])
        assert r.headers["content-type"].startswith("application/problem+json")
        assert r.json()["code"] == "unauthorized"


def test_api_reference_answers_any_valid_key(srv, member_key):
    with srv.client(member_key) as c:
        spec = c.get("/openapi.json")
        assert spec.status_code == 200 and spec.headers["content-type"].startswith("application/json")
        assert "/v1/chat/completions" in spec.json()["paths"]
        assert c.get("/docs/openapi.json").json() == spec.json()
        page = c.get("/docs")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    r = httpx.get(srv.url + "/openapi.json", headers={"x-api-key": member_key})
    assert r.status_code == 200


def test_docs_page_loads_nothing_from_outside_keel(srv, member_key):
    """No CDN: every script, stylesheet and icon comes from Keel, and the CSP forbids anything else."""
    with srv.client(member_key) as c:
        page = c.get("/docs")
        html = page.text
        assert not EXTERNAL.search(html), EXTERNAL.search(html)
        assert "<script>" not in html and "style=" not in html  # nothing inline: the CSP allows 'self' only
        urls = asset_urls(html)
        assert any(u.endswith("swagger-ui-bundle.js") for u in urls) and any(u.endswith(".css") for u in urls)
        for url in urls:
            assert url.startswith("/docs/"), url
            asset = c.get(url)
            assert asset.status_code == 200 and asset.content, url
        init = c.get("/docs/assets/docs.js").text
        assert "validatorUrl: null" in init and not re.search(r"https?://", init)
    csp = dict(d.strip().split(" ", 1) for d in page.headers["content-security-policy"].split(";") if d.strip())
    assert csp["default-src"] == "'none'"
    for directive in ("script-src", "style-src", "connect-src"):
        assert csp[directive] == "'self'", (directive, csp)
    assert csp["frame-ancestors"] == "'none'"
    assert page.headers["x-content-type-options"] == "nosniff"
    assert "no-store" in page.headers["cache-control"]


def test_browser_signs_in_to_docs_with_its_key_in_a_cookie_that_opens_only_docs(srv, member_key):
    """A browser cannot send a bearer header to a page: /docs answers it with a sign-in form (still 401), the
    form's key goes into an HttpOnly, SameSite=Strict cookie scoped to /docs, and that cookie opens the docs
    and their spec — never an API route."""
    with httpx.Client(base_url=srv.url) as browser:
        form = browser.get("/docs", headers={"Accept": "text/html"})
        assert form.status_code == 401 and form.headers["content-type"].startswith("text/html")
        assert 'action="/docs/sign-in"' in form.text and "default-src 'none'" in form.headers[
            "content-security-policy"]

        wrong = browser.post("/docs/sign-in", data={"key": "sk-keel-wrong"}, headers={"Accept": "text/html"})
        assert wrong.status_code == 401 and "set-cookie" not in wrong.headers
        assert not browser.cookies

        signed = browser.post("/docs/sign-in", data={"key": member_key})
        assert signed.status_code == 303 and signed.headers["location"] == "/docs"
        cookie = signed.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and "path=/docs" in cookie

        assert browser.get("/docs").status_code == 200
        assert browser.get("/docs/openapi.json").status_code == 200
        assert browser.get("/docs/assets/swagger-ui-bundle.js").status_code == 200
        (name, value), = browser.cookies.items()
        # The cookie is for the docs only: sent by hand to an API route, it is not a key.
        assert httpx.get(srv.url + "/v1/me", cookies={name: value}).status_code == 401
        assert httpx.get(srv.url + "/openapi.json", cookies={name: value}).status_code == 401

        out = browser.post("/docs/sign-out")
        assert out.status_code == 303
        assert browser.get("/docs").status_code == 401


def test_api_reference_is_not_an_operation_of_its_own_spec(srv):
    spec = httpx.get(srv.url + "/openapi.json", headers={"Authorization": f"Bearer {srv.admin_key}"}).json()
    assert not [p for p in spec["paths"] if p.startswith("/docs") or p == "/openapi.json"]
