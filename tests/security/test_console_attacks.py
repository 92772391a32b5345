"""Attacks on the console at /console, over HTTP on a real server: password guessing, open redirects after
sign-in, session fixation, stored markup in the audit trail, the strict CSP on error pages, and charts built
from names a user chose."""

from __future__ import annotations

import re

import httpx
import pytest

from conftest import ADMIN_KEY
from keel.console import charts
from keel.console.throttle import SignInThrottle

pytestmark = pytest.mark.store
PASSWORD = "ana's long passphrase"


@pytest.fixture(scope="module")
def srv(module_server_factory):
    s = module_server_factory()
    with s.admin() as a:
        for email in ("ana@example.com", "ben@example.com"):
            assert a.post("/admin/users", json={"email": email, "role": "member"}).status_code == 201
            assert a.put(f"/admin/users/{email}/password", json={"password": PASSWORD}).status_code == 200
    return s


def _csrf(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


def sign_in(c: httpx.Client, **fields: str) -> httpx.Response:
    return c.post("/console/sign-in", data={"csrf": _csrf(c.get("/console/sign-in").text), **fields})


def test_password_guessing_is_throttled_per_email(srv):
    """Ten wrong passwords for one email, then even the right one is refused for a while (429, no password
    check); another email is not locked out by it."""
    with httpx.Client(base_url=srv.url) as c:
        for i in range(10):
            assert sign_in(c, email="ana@example.com", password=f"guess number {i:04d}").status_code == 401
        r = sign_in(c, email="ANA@example.com ", password=PASSWORD)
        assert r.status_code == 429 and int(r.headers["retry-after"]) > 0, r.status_code
        assert "keel_console=" not in r.headers.get("set-cookie", "")
        assert "default-src 'none'" in r.headers["content-security-policy"]
    with httpx.Client(base_url=srv.url) as c:
        assert sign_in(c, email="ben@example.com", password=PASSWORD).status_code == 303


def test_throttle_window_on_an_injected_clock():
    now = [0.0]
    t = SignInThrottle(limit=3, window_s=60, clock=lambda: now[0])
    for _ in range(3):
        assert t.retry_after("a@x") == 0
        t.failed("a@x")
    assert t.retry_after("A@X") == 60
    now[0] = 59.0
    assert 0 < t.retry_after("a@x") <= 1
    now[0] = 60.0
    assert t.retry_after("a@x") == 0  # the oldest failure left the window
    t.failed("a@x")
    t.succeeded("a@x")
    assert t.retry_after("a@x") == 0


@pytest.mark.parametrize("target", ["//evil.example/console/", "/\\evil.example", "https:evil.example/console/",
                                    "javascript:alert(1)", "/console@evil.example", "/console/\r\nSet-Cookie: x=1",
                                    "http://127.0.0.1/console/", "\t//evil.example/console/"])
def test_next_never_leaves_the_console(srv, target):
    with httpx.Client(base_url=srv.url) as c:
        r = sign_in(c, key=ADMIN_KEY, next=target)
    assert r.status_code == 303
    loc = r.headers["location"]
    assert loc.startswith("/console/") and not loc.startswith("//") and "\n" not in loc, loc
    assert not any(v.startswith("x=") for v in r.headers.get_list("set-cookie"))


def test_a_planted_session_cookie_is_replaced_at_sign_in(srv):
    planted = "attacker-chosen-session-token-0123456789"
    with httpx.Client(base_url=srv.url, cookies={"keel_console": planted}) as c:
        r = sign_in(c, key=ADMIN_KEY)
        assert r.status_code == 303
        fresh = next(v for v in r.headers.get_list("set-cookie") if v.startswith("keel_console="))
        assert planted not in fresh
    with httpx.Client(base_url=srv.url, cookies={"keel_console": planted}) as attacker:
        assert attacker.get("/console/keys").status_code == 303  # the planted token opens nothing


def test_markup_in_a_failed_sign_in_is_inert_on_the_audit_page(srv):
    payload = '"><img src=x onerror=alert(1)><script>alert(2)</script>'
    with httpx.Client(base_url=srv.url) as c:
        assert sign_in(c, email=payload + "@x.example", password="whatever it is").status_code == 401
        assert sign_in(c, key=payload).status_code == 401
    with httpx.Client(base_url=srv.url) as admin:
        assert sign_in(admin, key=ADMIN_KEY).status_code == 303
        page = admin.get("/console/audit")
    assert page.status_code == 200 and "console.sign_in.failed" in page.text
    assert "<img src=x" not in page.text and "<script>alert" not in page.text
    assert "&lt;img src=x" in page.text or "&lt;script&gt;" in page.text


def test_error_pages_carry_the_strict_headers(srv):
    with httpx.Client(base_url=srv.url) as c:
        assert sign_in(c, email="ben@example.com", password=PASSWORD).status_code == 303
        for method, path, status in (("GET", "/console/keys", 403), ("GET", "/console/knowledge/nope-nope", 404),
                                     ("GET", "/console/workflows/nope/runs/run_nope", 404),
                                     ("POST", "/console/keys", 403)):
            r = c.request(method, path, data={"name": "x"} if method == "POST" else None)
            assert r.status_code == status, (path, r.status_code)
            assert "frame-ancestors 'none'" in r.headers["content-security-policy"], path
            assert r.headers["x-content-type-options"] == "nosniff"
    with httpx.Client(base_url=srv.url) as anonymous:
        r = anonymous.post("/console/keys", data={"name": "x"})
        assert r.status_code == 401 and "default-src 'none'" in r.headers["content-security-policy"]


def test_charts_escape_names_users_chose():
    evil = '</text><script>alert(1)</script><text x="'
    svg = str(charts.bars([(evil, 3.0), ("ok", 1.0)], label=evil, unit='"<u>')) + \
        str(charts.series([(evil, 1.0), ("d2", 2.0)], label=evil))
    assert "<script>" not in svg and '"<u>' not in svg and "&lt;script&gt;" in svg


def test_a_password_typed_into_the_key_field_never_reaches_the_audit_log(srv):
    """A failed key sign-in is audited by the key's public prefix only; text not shaped like a Keel key
    (someone's password in the wrong field) is not written anywhere."""
    typed = "Correct-Horse-Battery-Staple-42"
    with httpx.Client(base_url=srv.url) as c:
        assert sign_in(c, key=typed).status_code == 401
        assert sign_in(c, key="sk-keel-abcdefgh12_" + "s3cret" * 5).status_code == 401
    with httpx.Client(base_url=srv.url) as admin:
        assert sign_in(admin, key=ADMIN_KEY).status_code == 303
        page = admin.get("/console/audit").text
    assert typed[:8] not in page and "s3cret" not in page
    assert "sk-keel-abcdefgh12" in page  # a key's public prefix still names who tried
