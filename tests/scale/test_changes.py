"""Changes made through one replica's API reach the other replica at once (PostgreSQL LISTEN/NOTIFY): new
deployments, a key revocation (with a key cache far longer than a second), an agent pause, a policy; workflow and
agent definitions are read from the store, so the other replica serves them on its next request. One pair of
replicas for the module."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from conftest import TEST_DB, KeelServer, eventually, new_db_url, problem, start_server
from tests.workflows.conftest import define, start

pytestmark = [pytest.mark.store,
              pytest.mark.skipif(TEST_DB != "postgres", reason="replicas share a PostgreSQL store")]
MANDATE = "name: {name}\nmodel: {model}\ngoal: help\ntools:\n  notify: {{allow_recipients: ['*@acme.example']}}\n"


def within_a_second(check) -> float:  # noqa: ANN001
    began = time.monotonic()
    eventually(check, timeout=1.0, interval=0.02)
    return time.monotonic() - began


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, pg_server) -> Iterator[tuple[KeelServer, KeelServer]]:  # noqa: ANN001
    base = tmp_path_factory.mktemp("replicas")
    db_url = new_db_url(base, pg_server)
    a = start_server(base / "a", db_url)
    try:
        b = start_server(base / "b", db_url, KEEL_AUTH_CACHE_TTL_S="60")
        try:
            yield a, b
        finally:
            b.stop()
    finally:
        a.stop()


@pytest.mark.timeout(300)
def test_changes_on_one_replica_reach_the_other_within_a_second(replicas: tuple[KeelServer, KeelServer]) -> None:
    """Guards the change feed: each of three new deployments, made on replica A, is served by replica B within a
    second (B otherwise re-reads them every 5 s); a key B trusts for 60 s is refused by B within a second of
    its revocation on A; an agent paused on A cannot be started on B."""
    a, b = replicas
    waits = []
    with a.admin() as ca, b.admin() as cb:
        for i in range(3):
            alias = f"fresh-{i}"
            r = ca.post("/admin/deployments", json={"alias": alias, "provider": "openai_compatible", "model": "m",
                                                    "base_url": "http://127.0.0.1:9/v1"})
            assert r.status_code == 201, r.text
            waits.append(within_a_second(
                lambda: alias in {m["id"] for m in cb.get("/v1/models").json()["data"]}))

        key = ca.post("/admin/keys", json={"role": "member", "name": "short-lived"}).json()
        with b.client(key["key"]) as member:
            assert member.get("/v1/models").status_code == 200  # now trusted by B for 60 s
            assert ca.post(f"/admin/keys/{key['id']}/revoke").status_code == 200
            waits.append(within_a_second(lambda: member.get("/v1/models").status_code == 401))

        r = ca.post("/v1/agents", json={"spec": MANDATE.format(name="helper", model="fresh-0")})
        assert r.status_code == 201, r.text
        assert ca.post("/v1/agents/helper/pause", json={}).status_code == 200
        problem(cb.post("/v1/agents/helper/runs", json={"task": "hi"}), 409, "paused")
    print("seconds until the other replica saw each change:", [round(w, 3) for w in waits])


POLICY = """
name: from-the-api-{n}
data_rules:
  - {{name: restricted-local-only, classification: restricted, providers: [local]}}
"""
FLOW = "name: {name}\nsteps:\n  - {{id: noop, type: transform, output: done}}\n"


@pytest.mark.timeout(300)
def test_policies_and_definitions_reach_the_other_replica(replicas: tuple[KeelServer, KeelServer],
                                                          tmp_path_factory) -> None:  # noqa: ANN001
    """Guards policies across replicas: a policy set through A's API is B's active policy within a second (B has
    no policy file to poll), twice over; a replica started afterwards takes it too (the latest change wins over
    a policy text already stored). A workflow defined on A runs on B at once; an agent defined on A is B's."""
    a, b = replicas
    waits = []
    with a.admin() as ca, b.admin() as cb:
        for n in (1, 2):
            r = ca.put("/admin/policy", content=POLICY.format(n=n), headers={"content-type": "application/yaml"})
            assert r.status_code == 200, r.text
            version = r.json()["version"]
            assert r.json()["name"] == f"from-the-api-{n}" and ca.get("/admin/policy").json()["version"] == version
            waits.append(within_a_second(lambda: cb.get("/admin/policy").json()["version"] == version))
        assert cb.get("/admin/policy").json()["name"] == "from-the-api-2"
        problem(ca.put("/admin/policy", content="data_rules: 5\n"), 400, "data_rules")
        assert cb.get("/admin/policy").json()["version"] == version  # a rejected policy changes nothing
        activations = cb.get("/v1/audit?action=policy.*").json()["data"]
        assert [e["details"]["source"] for e in activations[:2]] == ["api", "api"], activations

        define(a, FLOW.format(name="from-a"))
        assert start(b, "from-a")  # no waiting: B reads definitions from the store
        assert cb.get("/v1/agents/helper").status_code == 200  # defined on A by the test before
    c = start_server(tmp_path_factory.mktemp("c"), a.extra["db_url"])
    try:
        with c.admin() as cc:
            assert cc.get("/admin/policy").json()["version"] == version
    finally:
        c.stop()
    print("seconds until the other replica had the new policy:", [round(w, 3) for w in waits])
