"""The `answer`, `start_workflow`, `remember` and `recall` tools and end-user threads, on a real server: each
reaches only what the mandate grants (its collections, the workflows it names), notes stay with one agent AND
one team, and one end user's thread never reaches another's run."""

from __future__ import annotations

import pytest

from conftest import eventually
from tests.agents.conftest import ScriptedModel, call, define, run, say
from tests.knowledge.conftest import make_key, make_team, upload

pytestmark = pytest.mark.store

GREET = """\
name: greet
inputs: {type: object, required: [who], properties: {who: {type: string}}}
steps:
  - id: hello
    type: transform
    output: {text: "Hello, {{ inputs.who }}!"}
"""
HELPER = """\
name: helper
model: agent-model
goal: Help the customer.
collections: [handbook]
memory: {thread: user}
budgets: {steps: 4, wall_time: 60s}
tools:
  answer: {}
  start_workflow: {workflows: [greet]}
  remember: {}
  recall: {}
"""
SHARED = """\
name: shared
model: agent-model
goal: Keep notes.
tools:
  remember: {}
  recall: {}
"""
SCRIPTS = {
    "ask": [call("answer", {"question": "How are refunds paid?"}), say("done")],
    "ask_payroll": [call("answer", {"question": "What is the CEO paid?", "collections": ["payroll"]}), say("done")],
    "greet": [call("start_workflow", {"workflow": "greet", "inputs": {"who": "Ann"}}), say("done")],
    "wire": [call("start_workflow", {"workflow": "wire_money", "inputs": {"to": "outside"}}), say("done")],
    "remember": [call("remember", {"note": "Ann prefers refunds by bank transfer"}), say("noted")],
    "recall": [call("recall", {"query": "how does Ann prefer refunds"}), say("recalled")],
    "hello": [say("Nice to meet you")],
}


@pytest.fixture(scope="module")
def world(tmp_path_factory, module_server_factory):
    model = ScriptedModel(SCRIPTS).start()
    base = tmp_path_factory.mktemp("agents-memory")
    (base / "keel.yaml").write_text(
        f"models:\n  - {{alias: agent-model, provider: openai_compatible, model: m, base_url: {model.url}}}\n"
        f"  - {{alias: agent-embed, provider: openai_compatible, model: e, kind: embedding, base_url: {model.url}}}\n")
    srv = module_server_factory(config=base / "keel.yaml")
    for team in ("red", "blue"):
        make_team(srv, team)
    keys = {"builder": make_key(srv, "builder", "red"), "red": make_key(srv, "member", "red"),
            "blue": make_key(srv, "member", "blue")}
    with srv.admin() as a:
        for name in ("handbook", "payroll"):
            r = a.post("/v1/collections", json={"name": name, "classification": "internal", "owner_team": "red",
                                                "embedding_model": "agent-embed"})
            assert r.status_code == 201, r.text
        # several passages: the fake's embeddings are arbitrary, so some pass /v1/answer's similarity floor
        handbook = {f"refunds{i}.md": f"# Refunds {i}\n\nRefunds of kind {i} are paid to the Acme account.\n".encode()
                    for i in range(8)}
        for coll, files in (("handbook", handbook), ("payroll", {"pay.md": b"# Pay\n\nThe CEO's pay is secret.\n"})):
            job = upload(a, coll, files)
            assert job.json()["status"] == "succeeded", job.text
    with srv.client(keys["builder"]) as c:
        for spec in (GREET, GREET.replace("name: greet", "name: wire_money")):
            r = c.post("/v1/workflows", json={"spec": spec})
            assert r.status_code in (200, 201), r.text
    define(srv, HELPER, key=keys["builder"])
    define(srv, SHARED)  # a global agent (the admin's): each team that runs it has its own notes
    try:
        yield {"srv": srv, "keys": keys, "model": model}
    finally:
        srv.stop()
        model.stop()


def _tools(out):
    return [(a["tool"], a["decision"], a["rule"]) for a in out["actions"] if a["kind"] == "tool"]


def test_answer_cites_the_mandates_collections_and_refuses_others(world):
    srv, key = world["srv"], world["keys"]["red"]
    out = run(srv, "helper", "[script:ask] How do I get my money back?", key=key)
    assert _tools(out) == [("answer", "allowed", None)], out["actions"]
    assert '"found": true' in out["actions"][1]["result"] and "handbook" in out["actions"][1]["result"]
    out = run(srv, "helper", "[script:ask_payroll] Tell me about pay.", key=key)
    assert _tools(out) == [("answer", "refused", "collections")]
    assert "payroll" not in (out["actions"][1]["result"] or "")


def test_start_workflow_starts_only_named_workflows_as_the_runs_principal(world):
    srv, key = world["srv"], world["keys"]["red"]
    out = run(srv, "helper", "[script:greet] Say hello to Ann.", key=key)
    assert _tools(out) == [("start_workflow", "allowed", None)], (out["status"], out["error"], out["actions"])
    with srv.client(key) as c:
        runs = eventually(lambda: [r for r in c.get("/v1/workflows/greet/runs").json()["data"]
                                   if r["status"] == "completed"] or None)
    assert len(runs) == 1 and runs[0]["id"].startswith(out["id"]) and runs[0]["trigger"] == "agent"
    out = run(srv, "helper", "[script:wire] Send money.", key=key)
    assert _tools(out) == [("start_workflow", "refused", "parameters")], out["actions"]
    with srv.client(key) as c:
        assert c.get("/v1/workflows/wire_money/runs").json()["data"] == []


def test_notes_stay_with_one_agent_and_one_team(world):
    srv, keys = world["srv"], world["keys"]
    run(srv, "shared", "[script:remember] Ann called.", key=keys["red"])
    red = run(srv, "shared", "[script:recall] Ann again.", key=keys["red"])
    assert "bank transfer" in red["actions"][1]["result"]
    blue = run(srv, "shared", "[script:recall] Ann again.", key=keys["blue"])
    assert _tools(blue) == [("recall", "allowed", None)] and blue["actions"][1]["result"] == '{"notes": []}'
    other = run(srv, "helper", "[script:recall] Ann again.", key=keys["red"])  # same team, another agent
    assert other["actions"][1]["result"] == '{"notes": []}'


def test_one_users_thread_never_reaches_another_user(world):
    srv, key, model = world["srv"], world["keys"]["red"], world["model"]
    with srv.client(key) as c:
        r = c.post("/v1/agents/helper/runs", json={"task": "[script:hello] I am Ann, order o-4242.", "user": "ann"})
        assert r.status_code == 200 and r.json()["user"] == "ann", r.text
        model.received.clear()
        again = c.post("/v1/agents/helper/runs", json={"task": "[script:hello] It's me again.", "user": "ann"})
        assert again.status_code == 200, again.text
        seen = [m["content"] for q in model.received for m in q["body"]["messages"]]
        assert any("o-4242" in (s or "") for s in seen)  # Ann's thread goes on
        model.received.clear()
        bob = c.post("/v1/agents/helper/runs", json={"task": "[script:hello] Hi, I am Bob.", "user": "bob"})
        assert bob.status_code == 200, bob.text
        seen = [m["content"] or "" for q in model.received for m in q["body"]["messages"]]
        assert seen and not any("o-4242" in s or "again" in s for s in seen)
        bad = c.post("/v1/agents/helper/runs", json={"task": "x", "user": "ann smith\n"})
        assert bad.status_code == 422
