"""Regression tests for issue 16, holes 1-3: a builder cannot reach a secret its team was not given,
cannot change a workflow it does not own, and nobody sees or acts on a run outside its team."""

from __future__ import annotations

import httpx
import pytest

from conftest import eventually
from tests.workflows.conftest import define, receiver, start, steps_by_id, wait_run

pytestmark = pytest.mark.store

PROVIDER_KEY = "sk-live-provider-" + "P" * 24


@pytest.fixture(scope="module")
def rcv():
    with receiver() as url:
        yield url


@pytest.fixture(scope="module")
def srv(module_server_factory):
    return module_server_factory()


@pytest.fixture(scope="module")
def keys(srv):
    out: dict[tuple[str, str | None], str] = {}
    with srv.admin() as c:
        for team in ("red", "blue"):
            assert c.post("/admin/teams", json={"name": team}).status_code in (201, 409)
        for role in ("builder", "member", "reviewer"):
            for team in ("red", "blue", None):
                r = c.post("/admin/keys", json={"role": role, "team": team, "name": f"{role}-{team}"})
                assert r.status_code == 201, r.text
                out[(role, team)] = r.json()["key"]
        team_ids = {t["name"]: t["id"] for t in c.get("/admin/teams").json()["data"]}
    out["team_ids"] = team_ids  # type: ignore[assignment]
    return out


def post_spec(srv, key: str, source: str) -> httpx.Response:
    with srv.client(key) as c:
        return c.post("/v1/workflows", content=source, headers={"content-type": "application/yaml"})


def leak_spec(name: str, rcv: str, secret: str) -> str:
    host = rcv.split("://", 1)[1]
    return f"""
name: {name}
allow_hosts: ["{host}"]
steps:
  - id: push
    type: http
    method: POST
    url: "{rcv}/leak/{name}"
    headers: {{Authorization: "Bearer {{{{ secrets['{secret}'] }}}}"}}
    body: {{x: 1}}
"""


def received(rcv: str, name: str) -> list[dict]:
    return [r for r in httpx.get(rcv + "/_stats").json()["requests"] if r["path"] == f"/leak/{name}"]


# -- hole 1: secrets ------------------------------------------------------------------------------

def test_builder_cannot_send_a_provider_key_to_own_host(srv, keys, rcv):
    """Guards hole 1: an admin's provider key can never be named in a builder's http header; the
    definition is refused with the secret, the field and the fix, and nothing reaches the host."""
    with srv.admin() as c:
        assert c.put("/admin/secrets/openai-key", json={"value": PROVIDER_KEY}).status_code == 200
    r = post_spec(srv, keys[("builder", "red")], leak_spec("exfil", rcv, "openai-key"))
    assert r.status_code == 403, r.text
    body = r.json()
    assert body["code"] == "secret_not_allowed" and body["secret"] == "openai-key"
    assert body["field"] == "steps[0].headers.Authorization" and body["use"] == "http_header"
    assert "grant" in body["fix"]
    assert PROVIDER_KEY not in r.text
    assert received(rcv, "exfil") == []


def test_a_provider_only_secret_can_never_be_rendered_into_a_header(srv, keys, rcv):
    """Guards hole 1's class: a provider-only secret cannot be granted for headers, and even a global
    workflow (admin-defined) cannot put it into one."""
    with srv.admin() as c:
        assert c.put("/admin/secrets/anthropic-key", json={"value": PROVIDER_KEY, "uses": ["provider"]}).status_code == 200
        red = keys["team_ids"]["red"]
        r = c.put(f"/admin/secrets/anthropic-key/grants/{red}/http_header")
        assert r.status_code == 409 and r.json()["code"] == "secret_use_not_allowed", r.text
        r = c.post("/v1/workflows", content=leak_spec("admin_leak", rcv, "anthropic-key"),
                   headers={"content-type": "application/yaml"})
        assert r.status_code == 403 and r.json()["code"] == "secret_not_allowed", r.text


def test_a_revoked_grant_fails_the_run_before_anything_is_sent(srv, keys, rcv):
    """Guards hole 1 at run time: a grant revoked after definition makes the http step fail with a typed
    error, and the request is never sent."""
    red = keys["team_ids"]["red"]
    with srv.admin() as c:
        r = c.put("/admin/secrets/crm-shared", json={"value": "sk-crm-shared-0123456789", "uses": ["http_header"]})
        assert r.status_code == 200, r.text
        assert c.put(f"/admin/secrets/crm-shared/grants/{red}/http_header").status_code in (200, 201)
    builder = keys[("builder", "red")]
    assert post_spec(srv, builder, leak_spec("granted", rcv, "crm-shared")).status_code == 201
    d = wait_run(srv, "granted", start(srv, "granted", key=builder))
    assert d["status"] == "completed", d
    assert len(received(rcv, "granted")) == 1
    with srv.admin() as c:
        assert c.delete(f"/admin/secrets/crm-shared/grants/{red}/http_header").status_code == 204
    d = wait_run(srv, "granted", start(srv, "granted", key=builder))
    assert d["status"] == "failed" and d["error"]["code"] == "secret_not_allowed", d
    assert len(received(rcv, "granted")) == 1
    with srv.admin() as c:
        actions = [e["action"] for e in c.get("/v1/audit?action=secret.*&limit=100").json()["data"]]
    assert {"secret.put", "secret.grant", "secret.revoke"} <= set(actions)


def test_a_team_secret_serves_its_own_team_only(srv, keys, rcv):
    """Guards hole 1's class: a builder manages its team's secrets (never seeing a value back); another
    team's builder can neither name nor overwrite nor delete them."""
    red_b, blue_b = keys[("builder", "red")], keys[("builder", "blue")]
    with srv.client(red_b) as c:
        r = c.put("/v1/secrets/red-token", json={"value": "red-token-value-0123456789"})
        assert r.status_code == 200 and "red-token-value" not in r.text, r.text
        listed = c.get("/v1/secrets").json()["data"]
        assert [s["name"] for s in listed if s["name"] == "red-token"] == ["red-token"]
        assert "openai-key" not in [s["name"] for s in listed]
    assert post_spec(srv, red_b, leak_spec("red_push", rcv, "red-token")).status_code == 201
    r = post_spec(srv, blue_b, leak_spec("blue_push", rcv, "red-token"))
    assert r.status_code == 403 and r.json()["secret"] == "red-token"
    with srv.client(blue_b) as c:
        assert c.put("/v1/secrets/red-token", json={"value": "blue-overwrite-0123456789"}).status_code == 409
        assert c.delete("/v1/secrets/red-token").status_code == 404
        assert c.put("/v1/secrets/openai-key", json={"value": "squat-0123456789"}).status_code == 409
    with srv.client(keys[("builder", None)]) as c:
        assert c.get("/v1/secrets").status_code == 403
    with srv.client(keys[("member", "red")]) as c:
        assert c.get("/v1/secrets").status_code == 403


# -- hole 2: ownership of definitions ---------------------------------------------------------------

GLOBAL = "name: shared_flow\nsteps:\n  - id: out\n    type: transform\n    output: from-admin\n"


def test_builder_cannot_redefine_a_global_workflow(srv, keys):
    """Guards hole 2: a global workflow (defined by a team-less admin) takes no version from a builder, so
    the next run by any team still executes the admin's steps."""
    v1 = define(srv, GLOBAL)
    assert v1["team_id"] is None
    evil = GLOBAL.replace("from-admin", "from-builder")
    for key in (keys[("builder", "red")], keys[("builder", None)]):
        r = post_spec(srv, key, evil)
        assert r.status_code == 403 and r.json()["code"] == "forbidden", r.text
        assert r.json()["fix"]
    d = wait_run(srv, "shared_flow", start(srv, "shared_flow", key=keys[("member", "blue")]))
    assert d["version"] == v1["version"]
    assert steps_by_id(d)["out"]["output"]["value"] == "from-admin"


def test_only_the_owning_team_redefines_its_workflow(srv, keys):
    """Guards hole 2's class: a team's workflow takes new versions from its own builders (and admins), not
    from another team's; a team-less builder cannot own a workflow at all."""
    spec = "name: red_flow\nsteps:\n  - id: out\n    type: transform\n    output: v1\n"
    assert post_spec(srv, keys[("builder", "red")], spec).status_code == 201
    r = post_spec(srv, keys[("builder", "blue")], spec.replace("v1", "v2"))
    assert r.status_code in (403, 409) and r.json()["code"] in ("forbidden", "conflict"), r.text
    assert post_spec(srv, keys[("builder", "red")], spec.replace("v1", "v2")).status_code == 201
    r = post_spec(srv, keys[("builder", None)], "name: lonely\nsteps:\n  - id: a\n    type: transform\n    output: 1\n")
    assert r.status_code == 403 and "team" in r.json()["fix"], r.text


# -- hole 3: runs, records, outbox -------------------------------------------------------------------

SECRETIVE = """
name: admin_only_run
inputs: {type: object, properties: {note: {type: string}}}
steps:
  - id: keep
    type: record
    table: private_notes
    data: {note: "{{ inputs.note }}"}
  - id: mail
    type: notify
    email: boss@example.com
    subject: "{{ inputs.note }}"
  - id: nap
    type: wait
    seconds: 60
"""


def test_team_less_admin_run_is_hidden_from_every_team(srv, keys):
    """Guards hole 3: a run started by a team-less admin key (its inputs, records and mail) is invisible
    to every team's member, builder and reviewer, who can neither cancel nor retry it."""
    define(srv, SECRETIVE)
    run_id = start(srv, "admin_only_run", {"note": "acquisition-target-zeta"})
    with srv.admin() as c:
        eventually(lambda: c.get(f"/v1/outbox?run_id={run_id}").json()["data"])
    for role in ("member", "builder", "reviewer"):
        for team in ("red", "blue", None):
            with srv.client(keys[(role, team)]) as c:
                base = f"/v1/workflows/admin_only_run/runs/{run_id}"
                assert c.get(base).status_code == 404, (role, team)
                assert run_id not in c.get("/v1/workflows/admin_only_run/runs").text, (role, team)
                assert c.post(base + "/cancel").status_code in (403, 404), (role, team)
                assert c.post(base + "/retry", json={}).status_code in (403, 404), (role, team)
                assert "acquisition-target-zeta" not in c.get("/v1/records/private_notes").text, (role, team)
                assert "acquisition-target-zeta" not in c.get("/v1/outbox").text, (role, team)
    with srv.admin() as c:
        assert c.post(f"/v1/workflows/admin_only_run/runs/{run_id}/cancel").status_code == 200


def test_a_team_run_of_a_global_workflow_stays_in_that_team(srv, keys):
    """Guards hole 3's class: a red member's run of a global workflow belongs to red; blue sees none of it,
    and a retry stays in red."""
    define(srv, "name: global_fail\ninputs: {type: object, properties: {d: {type: integer}}}\nsteps:\n"
                "  - id: note\n    type: record\n    table: red_notes\n    data: {d: \"{{ inputs.d }}\"}\n"
                "  - id: boom\n    type: transform\n    output: \"{{ 1 // inputs.d }}\"\n")
    red = keys[("member", "red")]
    run_id = start(srv, "global_fail", {"d": 0}, key=red)
    assert wait_run(srv, "global_fail", run_id)["status"] == "failed"
    with srv.client(keys[("member", "blue")]) as c:
        assert c.get(f"/v1/workflows/global_fail/runs/{run_id}").status_code == 404
        assert c.post(f"/v1/workflows/global_fail/runs/{run_id}/retry", json={}).status_code == 404
        assert run_id not in c.get("/v1/records/red_notes").text
    with srv.client(red) as c:
        assert run_id in c.get("/v1/records/red_notes").text
        r = c.post(f"/v1/workflows/global_fail/runs/{run_id}/retry", json={})
        assert r.status_code == 201, r.text
        retry_id = r.json()["id"]
    with srv.client(keys[("member", "blue")]) as c:
        assert c.get(f"/v1/workflows/global_fail/runs/{retry_id}").status_code == 404
    with srv.client(red) as c:
        assert c.get(f"/v1/workflows/global_fail/runs/{retry_id}").status_code == 200


def test_team_less_non_admin_keys_cannot_start_runs(srv, keys):
    """Guards hole 3's class: a team-less member's run would be visible to admins only, so it is refused
    up front with a fix instead of vanishing from its starter's view."""
    with srv.client(keys[("member", None)]) as c:
        r = c.post("/v1/workflows/shared_flow/runs", json={"inputs": {}})
    assert r.status_code == 403 and "team" in r.json()["fix"], r.text
