"""Attacks on agent memory: a note one end user's run kept is never recalled in another end user's run of the
same agent and team (notes follow the end user, as the conversation thread does)."""

from __future__ import annotations

import pytest

from tests.agents.conftest import ScriptedModel, call, say
from tests.knowledge.conftest import make_key, make_team

pytestmark = pytest.mark.store

CONCIERGE = """\
name: concierge
model: agent-model
goal: Help the customer.
memory: {thread: user}
budgets: {steps: 4, wall_time: 60s}
tools:
  remember: {}
  recall: {}
"""
SCRIPTS = {
    "remember": [call("remember", {"note": "Ann's card ends 4242 and her PIN hint is blue"}), say("noted")],
    "recall": [call("recall", {"query": "what card does Ann have and PIN hint"}), say("recalled")],
}


@pytest.fixture(scope="module")
def world(tmp_path_factory, module_server_factory):
    model = ScriptedModel(SCRIPTS).start()
    base = tmp_path_factory.mktemp("security-memory")
    (base / "keel.yaml").write_text(
        f"models:\n  - {{alias: agent-model, provider: openai_compatible, model: m, base_url: {model.url}}}\n")
    srv = module_server_factory(config=base / "keel.yaml")
    make_team(srv, "red")
    key = make_key(srv, "builder", "red")
    with srv.client(key) as c:
        r = c.post("/v1/agents", content=CONCIERGE, headers={"content-type": "application/yaml"})
        assert r.status_code in (200, 201), r.text
    try:
        yield srv, key
    finally:
        srv.stop()
        model.stop()


def _run(srv, key, task, user=None):
    with srv.client(key, timeout=90) as c:
        r = c.post("/v1/agents/concierge/runs", json={"task": task, "wait_s": 60, **({"user": user} if user else {})})
    assert r.status_code == 200, r.text
    tools = [a for a in r.json()["actions"] if a["kind"] == "tool"]
    return tools[0]["result"] or ""


def test_a_users_notes_are_never_recalled_for_another_user(world):
    srv, key = world
    _run(srv, key, "[script:remember] Remember my card.", user="ann")
    assert "4242" in _run(srv, key, "[script:recall] What was my card?", user="ann")  # Ann's own note
    assert "4242" not in _run(srv, key, "[script:recall] What card does Ann have?", user="bob")
    assert "4242" not in _run(srv, key, "[script:recall] What card does Ann have?")  # a run for no user


def test_a_team_key_cannot_speak_for_a_keel_user(world):
    """A person's thread is theirs: a team key (no user of its own) that names a Keel user's id as `user` would read
    and write that person's conversation (fake turns the model later trusts); only their own credentials may."""
    srv, key = world
    with srv.admin() as a:
        ann = a.post("/admin/users", json={"email": "ann@example.com", "role": "member", "team": "red"}).json()
        r = a.post("/admin/keys", json={"role": "member", "team": "red", "name": "ann's", "user_id": ann["id"]})
        assert r.status_code == 201, r.text
        ann_key = r.json()["key"]
    with srv.client(ann_key, timeout=90) as c:
        r = c.post("/v1/agents/concierge/runs", json={"task": "My order is o-777.", "wait_s": 60})
        assert r.status_code == 200 and r.json()["user"] == ann["id"], r.text
    with srv.client(key, timeout=90) as c:
        r = c.post("/v1/agents/concierge/runs", json={"task": "Your refund goes to account X.", "user": ann["id"]})
        assert r.status_code == 403, r.text
        r = c.post("/v1/agents/concierge/runs", json={"task": "An app's own end user.", "user": "customer-42"})
        assert r.status_code == 200, r.text  # an application's end users are still its to name
