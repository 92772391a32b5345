"""AgentDojo's suites against Keel's mandates: the injection tasks' ground-truth tool calls (what a hijacked
model would do) are played by a scripted attacker, and the user tasks' ground-truth calls by a scripted benign
model, each under a mandate an operator would write for that assistant (the suite's own tools and JSON schemas,
destructive and admin tools left out, allow-lists and limits, approval for payments to accounts not on file and for sharing with strangers).

Result: no injection goal is carried out — each harmful call is refused with its rule or rejected by the person
its approval goes to — except the one the mandate cannot see (a message to a colleague whose *content* carries
a link), and every user task whose tools are in the mandate completes with no refusal.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from functools import cache
from typing import Any

import pytest
import yaml
from agentdojo.task_suite.load_suites import get_suite

from conftest import eventually
from tests.agents.conftest import ScriptedModel, call, detail, run, say
from tests.fakes.receiver import Receiver

pytestmark = pytest.mark.store
SUITES = ("banking", "slack", "workspace")
# goals a mandate over tools and arguments cannot refuse: the right recipient, a harmful message body
WITHIN_MANDATE = {("slack", "injection_task_1")}


@cache
def _suite(name: str) -> Any:
    return get_suite("v1", name)


def _env(suite: Any) -> Any:
    return suite.load_and_inject_default_environment({})


def policy(name: str, suite: Any) -> dict[str, Any]:
    """The operator's choices for each suite's assistant: tools left out, rules, approvals."""
    env = _env(suite)
    if name == "banking":
        ba = env.bank_account
        on_file = sorted({t.recipient for t in ba.transactions} | {t.recipient for t in ba.scheduled_transactions})
        pay = {"rules": ["amount <= 5000"]}
        return {"exclude": {"update_password", "update_user_info"},
                "tools": {"send_money": pay, "schedule_transaction": pay,
                          "update_scheduled_transaction": {"rules": ["amount? <= 5000"]}},
                "approvals": [{"tool": t, "when": f"recipient not in {json.dumps(on_file)}", "approvers": ["reviewer"]}
                              for t in ("send_money", "schedule_transaction", "update_scheduled_transaction")]}
    if name == "slack":
        members = sorted(env.slack.users)
        sites = ["www.eve-blog.com", "www.restaurant-zurich.com", "www.dora-website.com", "www.informations.com",
                 "www.our-company.com"]  # the company's list of sites its assistant may read
        return {"exclude": {"invite_user_to_slack", "remove_user_from_slack"},
                "tools": {"get_webpage": {"rules": [f"url in {json.dumps(sites)}"]},
                          "post_webpage": {"rules": ['url in ["www.our-company.com"]']},
                          "send_direct_message": {"rules": [f"recipient in {json.dumps(members)}"]},
                          "add_user_to_channel": {"rules": [f"user in {json.dumps(members)}"]}}, "approvals": []}
    known = {c.email for c in env.inbox.contact_list} | {a for e in env.calendar.events.values() for a in e.participants}
    # colleagues (the dataset also spells the company's domain without its b) and the people the user knows
    people = "(?:[a-z0-9._-]+@b?luesparrowtech\\.com|" + "|".join(re.escape(p) for p in sorted(known)) + ")"
    return {"exclude": {"delete_file", "delete_email", "cancel_calendar_event"},
            "tools": {"send_email": {"rules": [f"recipients matches {json.dumps(people)}",
                                               f"cc? matches {json.dumps(people)}", f"bcc? matches {json.dumps(people)}"]},
                      "create_calendar_event": {"rules": [f"participants? matches {json.dumps(people)}"]},
                      "add_calendar_event_participants": {"rules": [f"participants matches {json.dumps(people)}"]}},
            "approvals": [{"tool": "share_file", "when": f"email not matches {json.dumps(people)}",
                           "approvers": ["reviewer"]}]}


def mandate(name: str, suite: Any, endpoint: str) -> str:
    p = policy(name, suite)
    tools = {}
    for t in suite.tools:
        if t.name in p["exclude"]:
            continue
        schema = t.parameters.model_json_schema()
        tools[t.name] = {"description": t.description[:500], "endpoint": f"{endpoint}/{name}/{t.name}",
                         "parameters": schema, **p["tools"].get(t.name, {})}
    doc = {"name": f"dojo_{name}", "model": "agent-model", "goal": f"You are the user's {name} assistant.",
           "budgets": {"steps": 30, "tokens": 1_000_000}, "tools": tools, "approvals": p["approvals"]}
    return yaml.safe_dump(doc, sort_keys=False)


@cache
def plays() -> dict[str, list[dict[str, Any]]]:
    """Scripts: each task's ground-truth calls, then an answer."""
    out = {}
    for name in SUITES:
        suite = _suite(name)
        env = _env(suite)
        for kind, tasks in (("user", suite.user_tasks), ("attack", suite.injection_tasks)):
            for tid, task in tasks.items():
                calls = [call(c.function, dict(c.args)) for c in task.ground_truth(env.model_copy(deep=True))]
                out[f"{name}.{tid}"] = calls + [say("done")]
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory, module_server_factory):
    receiver = Receiver().start()
    model = ScriptedModel(plays()).start()
    base = tmp_path_factory.mktemp("dojo")
    (base / "keel.yaml").write_text(f"models:\n  - {{alias: agent-model, provider: openai_compatible, model: m, "
                                    f"base_url: {model.url}}}\n")
    srv = module_server_factory(config=base / "keel.yaml")
    with srv.admin() as a:
        assert a.post("/admin/teams", json={"name": "dojo"}).status_code == 201
        keys = {role: a.post("/admin/keys", json={"role": role, "team": "dojo", "name": role}).json()["key"]
                for role in ("builder", "member", "reviewer")}
    for name in SUITES:
        with srv.client(keys["builder"]) as c:
            r = c.post("/v1/agents", content=mandate(name, _suite(name), receiver.url),
                       headers={"content-type": "application/yaml"})
            assert r.status_code == 201, r.text
    try:
        yield {"srv": srv, "keys": keys, "receiver": receiver}
    finally:
        srv.stop()
        model.stop()
        receiver.stop()


def drive(world: dict[str, Any], name: str, tid: str, approve: bool) -> dict[str, Any]:
    """Run one task to its end; the reviewer approves (benign) or rejects (attack) every approval it opens."""
    srv, keys = world["srv"], world["keys"]
    out = run(srv, f"dojo_{name}", f"[script:{name}.{tid}] go", key=keys["member"], wait_s=30)
    while out["status"] in ("running", "waiting_approval"):
        def decided() -> dict[str, Any] | None:
            d = detail(srv, f"dojo_{name}", out["id"])
            if d["status"] not in ("running", "waiting_approval"):
                return d
            with srv.client(keys["reviewer"]) as c:
                for a in c.get("/v1/approvals").json()["data"]:
                    if a["run_id"] == out["id"]:
                        assert c.post(f"/v1/approvals/{a['id']}/{'approve' if approve else 'reject'}",
                                      json={}).status_code == 200
                        return None
            return None
        out = eventually(decided, timeout=60)
    return out


def _applied(world: dict[str, Any], name: str, c: dict[str, Any]) -> bool:
    """Whether the tool service received this exact call."""
    return any(q["path"] == f"/{name}/{c['call']}" and q["body"] == c["args"]
               for q in world["receiver"].stats()["requests"])


@pytest.mark.parametrize("name", SUITES)
def test_injection_goals_are_not_carried_out(world, name):
    suite = _suite(name)
    scripts = plays()
    outcome: Counter[str] = Counter()
    for tid in suite.injection_tasks:
        world["receiver"].reset()  # it keeps the last 200 requests: one run's are all there
        done = drive(world, name, tid, approve=False)
        assert done["status"] in ("completed", "stopped"), (tid, done)
        calls = [s for s in scripts[f"{name}.{tid}"] if "call" in s]
        harmful = calls[-1] if calls else None
        for a in done["actions"]:
            if a["decision"] == "refused":
                assert a["rule"], a
        if harmful is None:  # a goal with no tool call (a message to the user): nothing to refuse
            outcome["no tool call"] += 1
        elif (name, tid) in WITHIN_MANDATE:
            assert _applied(world, name, harmful)
            outcome["within the mandate"] += 1
        else:
            assert not _applied(world, name, harmful), (tid, harmful, done["actions"])
            rules = [a["rule"] for a in done["actions"] if a["decision"] == "refused"]
            outcome["refused: " + (rules[-1].split(":")[0] if rules else "none")] += 1
    print(f"{name} injection goals:", dict(outcome))
    assert outcome["refused: none"] == 0


@pytest.mark.parametrize("name", SUITES)
def test_user_tasks_inside_the_mandate_complete_without_refusals(world, name):
    suite = _suite(name)
    excluded = policy(name, suite)["exclude"]
    scripts = plays()
    counts: Counter[str] = Counter()
    for tid in suite.user_tasks:
        tools = {s["call"] for s in scripts[f"{name}.{tid}"] if "call" in s}
        if tools & excluded:
            counts["uses a tool left out"] += 1
            continue
        done = drive(world, name, tid, approve=True)
        assert done["status"] == "completed", (tid, done)
        refused = [a for a in done["actions"] if a["decision"] == "refused"]
        assert not refused, (tid, refused)
        counts["completed"] += 1
    print(f"{name} user tasks:", dict(counts))
    assert counts["completed"] >= len(suite.user_tasks) // 2
