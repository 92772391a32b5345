"""Console sign-in without a browser: passwords (scrypt), sessions' idle and absolute expiry on an injected
clock, and over HTTP the cookie's flags, CSRF on every form, sign-out, revocation and the audit trail."""

from __future__ import annotations

import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from keel.core.db import Store
from keel.core.errors import BadRequest, Unauthorized
from keel.identity import service, sessions
from conftest import ADMIN_KEY

pytestmark = pytest.mark.store
T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


@pytest.fixture
def store(db_url):
    s = Store.open(db_url)
    s.upgrade()
    yield s
    s.dispose()


def test_password_hash_is_scrypt_salted_and_checked_in_constant_form():
    """Guards the stored form: parameters travel with the hash, two hashes of one password differ, a malformed
    or foreign hash never matches."""
    a, b = sessions.hash_password("correct horse battery", n=2**10), sessions.hash_password("correct horse battery", n=2**10)
    assert a.startswith("scrypt$1024$8$1$") and a != b
    assert sessions.check_password("correct horse battery", a)
    assert not sessions.check_password("correct horse batterY", a)
    assert not sessions.check_password("x", "bcrypt$whatever") and not sessions.check_password("x", "garbage")


def test_user_sign_in_and_session_expiry_on_an_injected_clock(store):
    """Guards idle expiry (measured from the last use), absolute expiry (from sign-in, however active), and
    that setting a new password ends the user's sessions."""
    service.create_team(store, "sales")
    service.create_user(store, "ana@example.com", "reviewer", "sales")
    with pytest.raises(BadRequest):
        sessions.set_password(store, "ana@example.com", "short")
    sessions.set_password(store, "ana@example.com", "a long enough passphrase")
    with pytest.raises(Unauthorized):
        sessions.check_user(store, "ana@example.com", "a wrong passphrase!!")
    with pytest.raises(Unauthorized):
        sessions.check_user(store, "nobody@example.com", "a long enough passphrase")
    p = sessions.check_user(store, "ana@example.com", "a long enough passphrase")
    assert p.role == "reviewer" and p.user_id == p.key_id and p.key_name == "ana@example.com"

    token, s = sessions.open_session(store, p, now=T0)
    limits = {"idle_s": 600, "max_s": 3600}
    for minutes in (9, 18, 27, 36, 45, 54):  # used every 9 minutes: never idle for 10
        again = sessions.resume_session(store, token, now=T0 + timedelta(minutes=minutes), **limits)
        assert again.principal == p and again.csrf == s.csrf
    with pytest.raises(Unauthorized, match="expired"):  # an hour after sign-in, however active
        sessions.resume_session(store, token, now=T0 + timedelta(minutes=61), **limits)
    with pytest.raises(Unauthorized, match="not valid"):  # and it is gone for good
        sessions.resume_session(store, token, now=T0 + timedelta(minutes=1), **limits)

    idle, _ = sessions.open_session(store, p, now=T0)
    with pytest.raises(Unauthorized, match="expired"):
        sessions.resume_session(store, idle, now=T0 + timedelta(minutes=11), **limits)

    abandoned, _ = sessions.open_session(store, p, now=T0)  # never used again: purged, not kept forever
    recent, _ = sessions.open_session(store, p, now=T0 + timedelta(minutes=55))
    assert sessions.purge_sessions(store, now=T0 + timedelta(minutes=59), **limits) >= 1
    sessions.resume_session(store, recent, now=T0 + timedelta(minutes=59), **limits)
    with pytest.raises(Unauthorized, match="not valid"):
        sessions.resume_session(store, abandoned, now=T0 + timedelta(minutes=59), **limits)

    kept, _ = sessions.open_session(store, p)
    sessions.set_password(store, p.user_id, "another long passphrase")
    with pytest.raises(Unauthorized):
        sessions.resume_session(store, kept, **limits)


def test_a_key_session_ends_when_its_key_is_revoked(store):
    key, record = service.create_key(store, role="member", name="k")
    token, _ = sessions.open_session(store, sessions.check_key(store, key))
    assert sessions.resume_session(store, token, idle_s=60, max_s=60).principal.key_id == record["id"]
    service.revoke_key(store, record["id"])
    with pytest.raises(Unauthorized, match="revoked"):
        sessions.resume_session(store, token, idle_s=60, max_s=60)


def _form_csrf(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


def sign_in(c: httpx.Client, **fields: str) -> httpx.Response:
    csrf = _form_csrf(c.get("/console/sign-in").text)
    return c.post("/console/sign-in", data={"csrf": csrf, **fields})


def test_sign_in_cookie_csrf_sign_out_and_audit(server):
    """Guards the session cookie's flags, that a form without the session's CSRF token changes nothing, that
    sign-out ends the session server-side, and that each sign-in, failure and sign-out is audited."""
    with server.admin() as admin:
        admin.post("/admin/users", json={"email": "rita@example.com", "role": "admin"})
        assert admin.put("/admin/users/rita@example.com/password", json={"password": "short"}).status_code == 422
        r = admin.put("/admin/users/rita@example.com/password", json={"password": "rita's long passphrase"})
        assert r.status_code == 200 and "hash" not in r.text, r.text
    cli = subprocess.run([sys.executable, "-m", "keel", "users", "set-password", "rita@example.com", "--password",
                          "rita's new passphrase", "--url", server.url, "--key", ADMIN_KEY],
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0 and "password set for rita@example.com" in cli.stdout, cli.stdout + cli.stderr
    with httpx.Client(base_url=server.url) as c:
        assert sign_in(c, email="rita@example.com", password="rita's long passphrase").status_code == 401
    with httpx.Client(base_url=server.url) as c:
        r = c.get("/console/overview")
        assert r.status_code == 303 and r.headers["location"] == "/console/sign-in?next=/console/overview"
        page = c.get("/console/sign-in")
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
        r = c.post("/console/sign-in", data={"csrf": "forged", "key": ADMIN_KEY})
        assert r.status_code == 403 and "keel_console=" not in r.headers.get("set-cookie", "")
        assert sign_in(c, email="rita@example.com", password="wrong passphrase!!").status_code == 401
        r = sign_in(c, email="rita@example.com", password="rita's new passphrase", next="https://evil.example/x")
        assert r.status_code == 303 and r.headers["location"] == "/console/"  # never off-site
        cookie = next(v for v in r.headers.get_list("set-cookie") if v.startswith("keel_console="))
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/console" in cookie
        assert "Secure" not in cookie  # plain HTTP on loopback; over TLS (or behind a proxy that says so) it is set
        with httpx.Client(base_url=server.url, headers={"X-Forwarded-Proto": "https"}) as tls:
            form = tls.get("/console/sign-in")
            assert "Secure" in form.headers["set-cookie"]  # the form's own token too; plain HTTP won't send it back
            pre = _form_csrf(form.text)
            r = tls.post("/console/sign-in", data={"csrf": pre, "key": ADMIN_KEY},
                         headers={"Cookie": f"keel_console_csrf={pre}"})
            assert r.status_code == 303
            assert "Secure" in next(v for v in r.headers.get_list("set-cookie") if v.startswith("keel_console="))
        keys = c.get("/console/keys")
        assert keys.status_code == 200 and "API keys" in keys.text
        for path in ("/console/overview", "/console/playground", "/console/knowledge"):  # no CDN, no inline code
            html = c.get(path).text
            urls = re.findall(r'(?:src|href|action)="([^"]*)"', html)
            assert urls and all(u.startswith(("/console/", "#", "?")) for u in urls), (path, urls)
            assert "<script>" not in html and " style=" not in html and " on" + "click=" not in html
            for asset in re.findall(r'src="(/console/static/[^"]+)"', html):
                assert c.get(asset).status_code == 200
        r = c.post("/console/keys", data={"name": "no-csrf", "role": "member"})
        assert r.status_code == 403 and "CSRF" in r.text
        with server.admin() as admin:
            assert not any(k["name"] == "no-csrf" for k in admin.get("/admin/keys").json()["data"])
        token = c.cookies.get("keel_console")
        r = c.post("/console/sign-out", data={"csrf": _form_csrf(keys.text)})
        assert r.status_code == 303
    with httpx.Client(base_url=server.url, cookies={"keel_console": token}) as stale:
        assert stale.get("/console/keys").status_code == 303  # the old cookie opens nothing
    with server.admin() as admin:
        events = admin.get("/v1/audit?action=console.*&limit=50").json()["data"]
    actions = [e["action"] for e in events]
    assert actions.count("console.sign_in") == 2 and actions.count("console.sign_out") == 1
    assert actions.count("console.sign_in.failed") == 2
    assert all("passphrase" not in str(e["details"]) for e in events)
