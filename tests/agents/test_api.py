"""The agents API as callers meet it: located mandate errors, versions, ownership like workflows, secrets only
as granted, team-scoped runs, keys scoped to agents, caller mistakes as 4xx problems, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ledger_rows, problem
from tests.agents.conftest import ScriptedModel, call, define, run, say
from tests.knowledge.conftest import make_key, make_team

pytestmark = pytest.mark.store
PLUGINS = Path(__file__).parent / "plugin_pkg"
POLICY = "name: agents-test\nguards:\n  context: {injection: quote, secrets: redact}\n"

SIMPLE = """\
name: {name}
model: agent-model
goal: {goal}
tools:
  notify: {{allow_recipients: ["*@acme.example"]}}
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory, module_server_factory):
    model = ScriptedModel({"hello": [say("hello back")],
                           "lookup": [call("lookup", {"customer_id": "c-7"}), call("lookup", {"customer_id": "7"}),
                                      call("lookup", {"customer_id": "c-1"}), say("Ann is on gold.")],
                           "note": [call("note", {}), say("noted")]}).start()
    base = tmp_path_factory.mktemp("agents-api")
    (base / "keel.yaml").write_text(f"models:\n  - {{alias: agent-model, provider: openai_compatible, model: m, "
                                    f"base_url: {model.url}}}\n"
                                    "ledger_flush_interval_s: 3600\n")  # only a run's own end flushes its usage
    (base / "policy.yaml").write_text(POLICY)
    srv = module_server_factory(config=base / "keel.yaml", PYTHONPATH=str(PLUGINS),  # a package with keel.tools
                                KEEL_POLICY_FILE=str(base / "policy.yaml"))
    for team in ("red", "blue"):
        make_team(srv, team)
    keys = {(role, team): make_key(srv, role, team) for role in ("builder", "member") for team in ("red", "blue")}
    keys[("member", None)] = make_key(srv, "member", None)
    keys["scoped"] = make_key(srv, "member", "red", agents=["other"])
    define(srv, SIMPLE.format(name="red_helper", goal="help"), key=keys[("builder", "red")])
    try:
        yield {"srv": srv, "keys": keys, "model": model}
    finally:
        srv.stop()
        model.stop()


def test_an_invalid_mandate_is_a_422_listing_every_problem_with_its_line(world):
    srv = world["srv"]
    with srv.admin() as c:
        r = c.post("/v1/agents", content="name: x\nmodel: m\ngoal: g\ntools:\n  http: {allow_hosts: [a/b]}\n"
                                         "budgets: {steps: -1}\n", headers={"content-type": "application/yaml"})
    body = problem(r, 422, "line 5")
    assert body["code"] == "agent_mandate_invalid"
    assert {(e["field"], e["line"]) for e in body["errors"]} == {("tools.http.allow_hosts[0]", 5),
                                                                 ("budgets.steps", 6)}


@pytest.mark.parametrize("kwargs,status", [
    ({"content": b"{not json"}, 400),
    ({"json": {"source": "name: x"}}, 400),
    ({"json": {"spec": "name: x", "team": 5}}, 400),
    ({"json": {"spec": "- a list"}}, 422),
    ({"content": b"x" * (11 * 1024 * 1024), "headers": {"content-type": "application/yaml"}}, 413),
])
def test_malformed_and_oversized_definitions_are_4xx(world, kwargs, status):
    with world["srv"].admin() as c:
        r = c.post("/v1/agents", **kwargs)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")


def test_a_changed_mandate_is_a_new_version_an_unchanged_one_is_not(world):
    srv, builder = world["srv"], world["keys"][("builder", "red")]
    first = define(srv, SIMPLE.format(name="versioned", goal="one"), key=builder).json()
    again = define(srv, SIMPLE.format(name="versioned", goal="one"), key=builder)
    second = define(srv, SIMPLE.format(name="versioned", goal="two"), key=builder).json()
    assert (first["version"], again.status_code, again.json()["created"], second["version"]) == (1, 200, False, 2)
    assert first["team_id"] == second["team_id"] and first["tools"] == ["notify"]


def test_ownership_follows_the_workflow_rules(world):
    srv, keys = world["srv"], world["keys"]
    r = define(srv, SIMPLE.format(name="red_helper", goal="mine now"), key=keys[("builder", "blue")],
               status=(409,))
    assert "another team" in r.json()["detail"]
    define(srv, SIMPLE.format(name="red_helper", goal="x"), key=keys[("member", "red")], status=(403,))
    define(srv, SIMPLE.format(name="global_helper", goal="x"))  # admin without a team: global
    define(srv, SIMPLE.format(name="global_helper", goal="y"), key=keys[("builder", "red")], status=(403,))
    with srv.client(keys[("builder", "blue")]) as c:
        problem(c.post("/v1/agents/red_helper/pause", json={}), 404, "red_helper")
    with srv.client(keys[("member", "red")]) as c:
        assert c.post("/v1/agents/red_helper/pause", json={}).status_code == 403


def test_tools_use_only_secrets_granted_to_the_team(world):
    srv, keys = world["srv"], world["keys"]
    spec = ("name: with_secret\nmodel: agent-model\ngoal: g\ntools:\n  crm:\n    endpoint: https://crm.example/x\n"
            "    parameters: {type: object}\n    headers: {Authorization: {secret: crm-key}}\n")
    r = define(srv, spec, key=keys[("builder", "red")], status=(403,))
    assert r.json()["code"] == "secret_not_allowed"
    with srv.client(keys[("builder", "red")]) as c:
        assert c.put("/v1/secrets/crm-key", json={"value": "sk-crm-0123456789"}).status_code == 200
    define(srv, spec, key=keys[("builder", "red")], status=(201,))
    define(srv, spec.replace("with_secret", "blue_secret"), key=keys[("builder", "blue")], status=(403,))


def test_runs_are_seen_by_their_team_only(world):
    srv, keys = world["srv"], world["keys"]
    out = run(srv, "red_helper", "[script:hello] hi", key=keys[("member", "red")])
    assert out["status"] == "completed" and out["answer"] == "hello back"
    with srv.client(keys[("member", "blue")]) as c:
        problem(c.get(f"/v1/agents/red_helper/runs/{out['id']}"), 404, "red_helper")
        assert "red_helper" not in c.get("/v1/agents").text
    with srv.client(keys[("builder", "red")]) as c:
        assert out["id"] in c.get("/v1/agents/red_helper/runs").text
        assert c.get(f"/v1/agents/red_helper/runs/{out['id']}").json()["actions"][0]["kind"] == "model"
    with srv.client(keys["scoped"]) as c:  # a key scoped to other agents sees this one as absent
        problem(c.get("/v1/agents/red_helper"), 404, "red_helper")
        problem(c.post("/v1/agents/red_helper/runs", json={"task": "hi"}), 404, "red_helper")
    with srv.client(keys[("member", None)]) as c:
        problem(c.post("/v1/agents/global_helper/runs", json={"task": "hi"}), 403, "no team")


def test_a_run_that_ended_has_its_model_calls_in_the_usage_ledger(world):
    """The loop spools each model call's ledger row rather than flushing per step; the run's end flushes, so a
    caller reading usage after a run sees every call of it (the module's periodic flush is an hour away)."""
    srv, keys = world["srv"], world["keys"]
    define(srv, "name: lookup_once\nmodel: agent-model\ngoal: g\ntools:\n  lookup: {entry_point: customer_lookup}\n",
           key=keys[("builder", "red")])
    out = run(srv, "lookup_once", "[script:lookup] who is c-7?", key=keys[("member", "red")])
    assert out["status"] == "completed", out
    rows = ledger_rows(srv.extra["db_url"], f"task_id = '{out['id']}'")
    assert sorted(r.request_id for r in rows) == [f"{out['id']}/{seq}" for seq in (1, 3, 5, 7)]


@pytest.mark.parametrize("body,status", [
    ({}, 422), ({"task": ""}, 422), ({"task": "x", "wait_s": 601}, 422), ({"task": "x", "extra": 1}, 422),
    ({"task": "x" * 20001}, 422),
])
def test_bad_run_requests_are_422(world, body, status):
    with world["srv"].client(world["keys"][("member", "red")]) as c:
        r = c.post("/v1/agents/red_helper/runs", json=body)
    assert r.status_code == status, r.text


def test_unknown_agents_and_runs_are_404(world):
    with world["srv"].admin() as c:
        problem(c.get("/v1/agents/nope"), 404, "nope")
        problem(c.post("/v1/agents/nope/runs", json={"task": "x"}), 404, "nope")
        problem(c.get("/v1/agents/red_helper/runs/arun_x"), 404, "arun_x")
        assert c.get("/v1/agents/red_helper/runs?status=bogus").status_code == 400


def test_the_cli_defines_runs_and_pauses(world, tmp_path):
    srv = world["srv"]
    f = tmp_path / "cli_helper.yaml"
    f.write_text(SIMPLE.format(name="cli_helper", goal="help"))
    env = {**srv.env, "KEEL_URL": srv.url, "KEEL_API_KEY": srv.admin_key, "COLUMNS": "200"}

    def keel(*args):
        return subprocess.run([sys.executable, "-m", "keel", "agents", *args], env=env, capture_output=True,
                              text=True, timeout=120)

    assert keel("define", str(f)).stdout.strip() == "cli_helper version 1"
    assert "cli_helper" in keel("list").stdout
    assert keel("pause", "cli_helper").returncode == 0
    r = keel("run", "cli_helper", "-t", "[script:hello] hi")
    assert r.returncode != 0 and "paused" in (r.stdout + r.stderr)
    assert keel("resume", "cli_helper").returncode == 0
    assert '"status": "completed"' in keel("run", "cli_helper", "-t", "[script:hello] hi").stdout
    assert "completed" in keel("runs", "cli_helper").stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: Bad\n")
    r = keel("define", str(bad))
    assert r.returncode != 0 and "line 1" in (r.stdout + r.stderr)


def test_entry_point_tools_are_found_and_checked_like_any_tool(world):
    """A `keel.tools` entry point of an installed package is a tool: its schema and the mandate's rules apply."""
    srv, builder = world["srv"], world["keys"][("builder", "red")]
    r = define(srv, "name: lookup_agent\nmodel: agent-model\ngoal: g\ntools:\n  lookup: {entry_point: nope}\n",
               key=builder, status=(422,))
    assert r.json()["errors"][0]["field"] == "tools.lookup.entry_point" and "customer_lookup" in r.text
    define(srv, "name: lookup_agent\nmodel: agent-model\ngoal: g\ntools:\n"
                "  lookup: {entry_point: customer_lookup, rules: [customer_id != c-1]}\n", key=builder)
    out = run(srv, "lookup_agent", "[script:lookup] who is c-7?", key=world["keys"][("member", "red")])
    tools = [(a["decision"], a["rule"]) for a in out["actions"] if a["kind"] == "tool"]
    assert tools == [("allowed", None), ("refused", "parameters"), ("refused", "rules[0]: customer_id != c-1")]
    assert '"name": "Ann Example"' in out["actions"][1]["result"] and out["status"] == "completed"


def test_tool_output_passes_the_context_guards_before_the_model_sees_it(world):
    """An injection in a tool's result reaches the model quoted as inert data, and a secret in it redacted."""
    srv, model = world["srv"], world["model"]
    define(srv, "name: note_agent\nmodel: agent-model\ngoal: g\ntools:\n  note: {entry_point: read_note}\n",
           key=world["keys"][("builder", "red")])
    out = run(srv, "note_agent", "[script:note] read the note", key=world["keys"][("member", "red")])
    assert out["status"] == "completed", out
    seen = [m for r in model.received if r["path"].endswith("/chat/completions")
            for m in r["body"]["messages"] if m["role"] == "tool" and "customer list" in (m.get("content") or "")]
    assert seen and all("<untrusted-data" in m["content"] and "AKIAIOSFODNN7EXAMPLE" not in m["content"] for m in seen)


def test_a_run_streams_its_actions_as_server_sent_events(world):
    srv = world["srv"]
    define(srv, "name: lookup_agent\nmodel: agent-model\ngoal: g\ntools:\n"
                "  lookup: {entry_point: customer_lookup, rules: [customer_id != c-1]}\n",
           key=world["keys"][("builder", "red")])
    events = []
    with srv.client(world["keys"][("member", "red")]) as c:
        with c.stream("POST", "/v1/agents/lookup_agent/runs", json={"task": "[script:lookup] c-7?", "stream": True}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            kind = None
            for line in r.iter_lines():
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    events.append((kind, json.loads(line[6:])))
    kinds = [k for k, _ in events]
    assert kinds[-1] == "run" and events[-1][1]["status"] == "completed" and events[-1][1]["answer"] == "Ann is on gold."
    assert kinds.count("action") == 7 and [e["seq"] for k, e in events if k == "action"] == list(range(1, 8))
