"""Password spraying at the console: one guess each for many emails never trips the per-email throttle, yet each
costs a scrypt. A process-wide token bucket of failed password sign-ins (`console_failed_sign_ins_per_minute`,
bursting to a minute's worth) refuses further password tries with 429 before any scrypt once it is empty; API-key
sign-in is untouched."""

from __future__ import annotations

import re

import httpx
import pytest

from conftest import ADMIN_KEY
from keel.console.throttle import SignInThrottle

pytestmark = pytest.mark.store


def test_the_spray_bucket_on_an_injected_clock():
    """Guards: a spray across emails, each under the per-email limit, costing a scrypt per try without end."""
    now = [0.0]
    t = SignInThrottle(limit=3, window_s=60, per_minute=4, clock=lambda: now[0])
    for i in range(4):  # one failure each for four emails: the burst (a minute's worth) is spent
        assert t.retry_after(f"u{i}@x") == 0 and t.spray_wait() == 0
        t.failed(f"u{i}@x")
    assert t.spray_wait() == pytest.approx(15.0)  # 4 a minute: the next token in 15 s
    assert t.retry_after("fresh@x") == 0  # the per-email count is not what refuses it
    now[0] = 15.0
    assert t.spray_wait() == 0
    t.failed("u5@x")
    assert t.spray_wait() == pytest.approx(15.0)
    now[0] = 10_000.0  # a long quiet: the bucket refills to its burst, no further
    for i in range(4):
        assert t.spray_wait() == 0
        t.failed(f"v{i}@x")
    assert t.spray_wait() > 0
    t.succeeded("v0@x")  # a success clears the email's count, not the process-wide bucket
    assert t.spray_wait() > 0


@pytest.fixture(scope="module")
def srv(module_server_factory):
    s = module_server_factory(KEEL_CONSOLE_FAILED_SIGN_INS_PER_MINUTE="1")
    with s.admin() as a:
        for email in ("ana@example.com", "ben@example.com"):
            assert a.post("/admin/users", json={"email": email, "role": "member"}).status_code == 201
    return s


def _sign_in(c: httpx.Client, **fields: str) -> httpx.Response:
    csrf = re.search(r'name="csrf" value="([^"]+)"', c.get("/console/sign-in").text).group(1)
    return c.post("/console/sign-in", data={"csrf": csrf, **fields})


def test_a_spray_is_refused_server_wide_and_keys_still_sign_in(srv):
    """Guards: the per-email throttle alone letting one guess per email through for any number of emails."""
    with httpx.Client(base_url=srv.url) as c:
        assert _sign_in(c, email="ana@example.com", password="Summer2026!").status_code == 401
        r = _sign_in(c, email="ben@example.com", password="Summer2026!")
        assert r.status_code == 429 and int(r.headers["retry-after"]) > 0, r.status_code
        assert "keel_console=" not in r.headers.get("set-cookie", "")
        r = _sign_in(c, email="nobody@example.com", password="Summer2026!")  # an unknown email: refused alike
        assert r.status_code == 429
    with httpx.Client(base_url=srv.url) as c:
        assert _sign_in(c, key=ADMIN_KEY).status_code == 303
