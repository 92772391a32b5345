"""Authorization matrix: every governance endpoint × every role × own team / other team / no team.
Expected allow/deny for each cell, and no leak of another team's audit events, guard events or reviews."""

from __future__ import annotations

import pytest

from tests.governance.conftest import chat

pytestmark = pytest.mark.store

ROLES = ("admin", "builder", "member", "reviewer", "auditor")
TEAMS = ("red", "blue", None)
AUDIT_READERS = {"admin", "auditor"}

# (method, path, body, roles allowed); everyone else must get 403
ENDPOINTS = [
    ("GET", "/v1/audit", None, AUDIT_READERS),
    ("GET", "/v1/audit/verify", None, AUDIT_READERS),
    ("GET", "/admin/policy", None, AUDIT_READERS),
    ("GET", "/admin/policy/versions", None, AUDIT_READERS),
    ("GET", "/admin/policy/versions/1", None, AUDIT_READERS),
    ("POST", "/admin/policy/check", "name: x\n", AUDIT_READERS),
    ("POST", "/v1/policy/test", {"model": "cloud"}, AUDIT_READERS),
    ("GET", "/v1/reviews", None, {"admin", "reviewer"}),
    ("GET", "/v1/guard-events", None, set(ROLES)),
]


def _send(client, method, path, body):
    if isinstance(body, str):
        return client.request(method, path, content=body)
    return client.request(method, path, json=body) if body is not None else client.request(method, path)


@pytest.mark.parametrize("method,path,body,allowed", ENDPOINTS, ids=[f"{m} {p}" for m, p, _, _ in ENDPOINTS])
def test_role_matrix(governed, keys, method, path, body, allowed):
    for role in ROLES:
        for team in TEAMS:
            with keys.client(role, team) as c:
                r = _send(c, method, path, body)
            expected = 200 if role in allowed else 403
            assert r.status_code == expected, (role, team, method, path, r.status_code, r.text[:200])
    with governed.client() as anonymous:
        assert _send(anonymous, method, path, body).status_code == 401


def test_export_needs_a_team_less_auditor(governed, keys):
    for role in ROLES:
        for team in TEAMS:
            with keys.client(role, team) as c:
                r = c.get("/v1/audit/export")
            ok = role == "admin" or (role == "auditor" and team is None)
            assert r.status_code == (200 if ok else 403), (role, team)


def test_nobody_can_edit_the_audit_trail(governed, keys):
    for role in ROLES:
        with keys.client(role, None) as c:
            for method in ("POST", "PUT", "PATCH", "DELETE"):
                for path in ("/v1/audit", "/v1/audit/1"):
                    assert c.request(method, path, json={}).status_code in (404, 405), (role, method, path)


def test_team_scoping_leaks_nothing(governed, keys):
    """A red member's denial and guard events are visible to red's auditor and to that key, never to blue."""
    red = keys.keys[("member", "red")]
    r = chat(governed, red, "cloud", "hi", metadata={"classification": "restricted"})
    assert r.status_code == 403
    rid = r.headers["x-request-id"]
    blocked = chat(governed, red, "cloud", "my key is AKIAIOSFODNN7EXAMPLE")
    assert blocked.status_code == 403
    bid = blocked.headers["x-request-id"]

    def audit_ids(role, team):
        with keys.client(role, team) as c:
            return {e["details"].get("request_id") for e in c.get("/v1/audit?limit=1000").json()["data"]}

    assert rid in audit_ids("auditor", "red") and rid in audit_ids("auditor", None) and rid in audit_ids("admin", "blue")
    assert rid not in audit_ids("auditor", "blue")

    def guard_seen(role, team):
        with keys.client(role, team) as c:
            return any(e["request_id"] == bid for e in c.get("/v1/guard-events?limit=1000").json()["data"])

    assert guard_seen("member", "red") and guard_seen("auditor", "red") and guard_seen("admin", None)
    for role, team in (("member", "blue"), ("builder", "red"), ("reviewer", "red"), ("auditor", "blue")):
        assert not guard_seen(role, team), (role, team)


def test_review_items_by_role_and_team(governed, keys):
    r = chat(governed, keys.keys[("member", "red")], "onprem", "hello", metadata={"use_case": "support-reply"})
    rid = r.json()["review_id"]
    expected = {("admin", "red"): 200, ("admin", "blue"): 200, ("admin", None): 200,
                ("reviewer", "red"): 200, ("reviewer", None): 200, ("reviewer", "blue"): 404}
    for role in ROLES:
        for team in TEAMS:
            with keys.client(role, team) as c:
                got = c.get(f"/v1/reviews/{rid}").status_code
            want = 200 if (role, team) == ("member", "red") else expected.get((role, team), 404)
            assert got == want, (role, team, got)
            if want == 404 and role != "member":
                with keys.client(role, team) as c:
                    decided = c.post(f"/v1/reviews/{rid}/approve", json={}).status_code
                assert decided in (403, 404), (role, team, decided)
