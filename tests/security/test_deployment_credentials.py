"""A deployment's provider key lives in the vault under the deployment's credential name. Adding a deployment whose
id already exists is refused (409) — and must change nothing: before, the new `api_key` was written over the
existing deployment's vault secret first, so a refused duplicate (through the API or the console's form) silently
swapped the live provider key and broke, or redirected the billing of, every call of the working deployment."""

from __future__ import annotations

import re

import httpx
import pytest

from tests.fakes.openai_upstream import FakeOpenAI

pytestmark = pytest.mark.store
GOOD, WRONG = "sk-upstream-good-" + "1" * 20, "sk-upstream-wrong-" + "2" * 20


@pytest.fixture(scope="module")
def world(module_server_factory):
    fake = FakeOpenAI(reply="ok", api_key=GOOD).start()
    srv = module_server_factory()
    yield srv, fake
    fake.stop()


def _chat(srv, alias: str) -> int:
    with srv.admin() as c:
        return c.post("/v1/chat/completions", json={"model": alias, "messages": [{"role": "user", "content": "hi"}]}
                      ).status_code


def test_a_refused_duplicate_keeps_the_live_key(world, module_server_factory):
    """Guards: POST /admin/deployments and the console's add form overwriting the vault secret before the 409
    (seen by another replica, or this one after a restart: a running one keeps the key it resolved)."""
    srv, fake = world
    body = {"alias": "live", "provider": "openai_compatible", "model": "m", "base_url": fake.url}
    with srv.admin() as c:
        assert c.post("/admin/deployments", json={**body, "api_key": GOOD}).status_code == 201
    assert _chat(srv, "live") == 200
    with srv.admin() as c:
        assert c.post("/admin/deployments", json={**body, "api_key": WRONG}).status_code == 409
    replica = module_server_factory(db_url=srv.extra["db_url"])  # another replica on the same store
    assert _chat(replica, "live") == 200, "the refused API request replaced the live key"

    with httpx.Client(base_url=srv.url, timeout=60) as console:
        csrf = re.search(r'name="csrf" value="([^"]+)"', console.get("/console/sign-in").text).group(1)
        assert console.post("/console/sign-in", data={"csrf": csrf, "key": srv.admin_key}).status_code == 303
        csrf = re.search(r'name="csrf" value="([^"]+)"', console.get("/console/deployments").text).group(1)
        r = console.post("/console/deployments", data={**body, "api_key": WRONG, "csrf": csrf})
        assert r.status_code == 409, r.status_code
    replica = module_server_factory(db_url=srv.extra["db_url"])  # another replica on the same store
    assert _chat(replica, "live") == 200, "the refused console form replaced the live key"


def test_a_refused_change_keeps_the_live_key(world, module_server_factory):
    """Guards: PUT /admin/deployments/{id} storing the new api_key before the change itself was refused (an invalid
    field), swapping the live key of a deployment whose config stayed as it was."""
    srv, fake = world
    body = {"alias": "steady", "provider": "openai_compatible", "model": "m", "base_url": fake.url}
    with srv.admin() as c:
        r = c.post("/admin/deployments", json={**body, "api_key": GOOD})
        assert r.status_code == 201, r.text
        did = r.json()["id"]
        r = c.put(f"/admin/deployments/{did}", json={"timeout_s": 0, "api_key": WRONG})
        assert 400 <= r.status_code < 500, r.text
    replica = module_server_factory(db_url=srv.extra["db_url"])  # another replica on the same store
    assert _chat(replica, "steady") == 200, "the refused change replaced the live key"
