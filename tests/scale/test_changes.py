"""Changes made through one replica's API reach the other replica at once (PostgreSQL LISTEN/NOTIFY): new
deployments, a key revocation (with a key cache far longer than a second), an agent pause."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from conftest import TEST_DB, eventually, problem, start_server

pytestmark = [pytest.mark.store,
              pytest.mark.skipif(TEST_DB != "postgres", reason="replicas share a PostgreSQL store")]
MANDATE = "name: {name}\nmodel: {model}\ngoal: help\ntools:\n  notify: {{allow_recipients: ['*@acme.example']}}\n"


def within_a_second(check) -> float:  # noqa: ANN001
    began = time.monotonic()
    eventually(check, timeout=1.0, interval=0.02)
    return time.monotonic() - began


@pytest.mark.timeout(300)
def test_changes_on_one_replica_reach_the_other_within_a_second(tmp_path: Path, db_url: str) -> None:
    """Guards the change feed: each of three new deployments, made on replica A, is served by replica B within a
    second (B otherwise re-reads them every 5 s); a key B trusts for 60 s is refused by B within a second of
    its revocation on A; an agent paused on A cannot be started on B."""
    a = start_server(tmp_path / "a", db_url)
    b = start_server(tmp_path / "b", db_url, KEEL_AUTH_CACHE_TTL_S="60")
    try:
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
    finally:
        a.stop()
        b.stop()
