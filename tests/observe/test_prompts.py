"""The prompt registry: versions and labels owned by a team, callers referring to `name@label` on chat
completions (the official client's `extra_body`), the rendered messages reaching the model, and each ledger row
naming the version used — before and after a label is moved back (the roll back)."""

from __future__ import annotations

import json

import openai
import pytest

from conftest import eventually, problem, wait_ledger
from tests.fakes.openai_upstream import FakeOpenAI

pytestmark = pytest.mark.store

V1 = [{"role": "system", "content": "You answer for {{ product }}. Be brief."}]
V2 = [{"role": "system", "content": "You answer for {{ product }}.\nBe kind and brief."}]


@pytest.fixture(scope="module")
def fake():
    with FakeOpenAI() as upstream:
        yield upstream


@pytest.fixture(scope="module")
def world(module_server_factory, tmp_path_factory, fake):
    base = tmp_path_factory.mktemp("prompts")
    (base / "keel.yaml").write_text(f"models:\n  - {{alias: fake, provider: openai_compatible, model: m, "
                                    f"base_url: {fake.url}}}\nledger_flush_interval_s: 0.05\n")
    srv = module_server_factory(config=base / "keel.yaml", KEEL_TRACE_EXPORTER="jsonl", KEEL_TRACE_DETAIL="calls")
    with srv.admin() as admin:
        for team in ("red", "blue"):
            assert admin.post("/admin/teams", json={"name": team}).status_code in (201, 409)
        keys = {name: admin.post("/admin/keys", json={"role": role, "team": team, "name": name}).json()["key"]
                for name, role, team in (("builder", "builder", "red"), ("member", "member", "red"),
                                         ("blue_builder", "builder", "blue"), ("teamless", "builder", None))}
    return srv, keys


def refused(r, status: int, code: str) -> dict:
    body = problem(r, status)
    assert body["code"] == code, body
    return body


def upstream_messages(fake) -> list:
    return [r["body"]["messages"] for r in fake.received if r["path"].endswith("/chat/completions")][-1]


def test_versions_labels_diff_and_ownership(world):
    srv, keys = world
    with srv.client(keys["builder"]) as b:
        r = b.post("/v1/prompts", json={"name": "support-reply", "messages": V1, "labels": ["production"]})
        assert r.status_code == 201, r.text
        assert r.json()["version"] == 1 and r.json()["labels"] == ["production"]
        assert r.json()["variables"] == ["product"]
        r = b.post("/v1/prompts", json={"name": "support-reply", "messages": V2, "labels": ["staging"]})
        assert r.status_code == 201 and r.json()["version"] == 2
        again = b.post("/v1/prompts", json={"name": "support-reply", "messages": V2})
        assert again.status_code == 200 and again.json()["version"] == 2 and again.json()["created"] is False
        diff = b.get("/v1/prompts/support-reply/diff?from=1&to=2").json()["diff"]
        assert "-system: You answer for {{ product }}. Be brief." in diff and "+system: Be kind and brief." in diff
        versions = b.get("/v1/prompts/support-reply/versions").json()["data"]
        assert [(v["version"], v["labels"]) for v in versions] == [(2, ["staging"]), (1, ["production"])]
        assert b.get("/v1/prompts/support-reply?label=production").json()["version"] == 1
        refused(b.get("/v1/prompts/support-reply?label=canary"), 404, "not_found")
        refused(b.get("/v1/prompts/support-reply?version=9"), 404, "not_found")
    with srv.client(keys["member"]) as m:  # members read and use, never change
        assert [p["name"] for p in m.get("/v1/prompts").json()["data"]] == ["support-reply"]
        refused(m.post("/v1/prompts", json={"name": "support-reply", "messages": V1}), 403, "forbidden")
        refused(m.put("/v1/prompts/support-reply/labels/production", json={"version": 2}), 403, "forbidden")
    with srv.client(keys["blue_builder"]) as other:  # another team: as if it did not exist
        assert other.get("/v1/prompts").json()["data"] == []
        refused(other.get("/v1/prompts/support-reply"), 404, "not_found")
        refused(other.put("/v1/prompts/support-reply/labels/production", json={"version": 2}), 404, "not_found")
        refused(other.post("/v1/prompts", json={"name": "support-reply", "messages": V1}), 409, "conflict")
    with srv.client(keys["teamless"]) as nobody:
        refused(nobody.post("/v1/prompts", json={"name": "mine", "messages": V1}), 403, "forbidden")


@pytest.mark.parametrize("body, field", [
    ({"name": "bad name!", "messages": V1}, "name"),
    ({"name": "x", "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0]"),
    ({"name": "x", "messages": V1, "template": "also"}, "exactly one"),
    ({"name": "x", "messages": V1, "labels": ["Prod uction"]}, "label"),
    ({"name": "x", "messages": V1, "colour": "red"}, "colour"),
    ({"name": "x", "messages": [{"role": "user", "content": "x" * 100_001}]}, "messages[0]"),
    ([1, 2], "JSON object"),
])
def test_malformed_definitions_are_400s(world, body, field):
    srv, keys = world
    with srv.client(keys["builder"]) as b:
        assert field in refused(b.post("/v1/prompts", json=body), 400, "bad_request")["detail"]
        problem(b.post("/v1/prompts", content=b"{nope", headers={"content-type": "application/json"}), 400)
        refused(b.post("/v1/prompts", content=b"x" * (1024 * 1024 + 1)), 400, "bad_request")


def test_callers_use_a_label_and_the_ledger_names_the_version_through_a_roll_back(world, fake):
    srv, keys = world
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key=keys["member"], max_retries=0)

    def ask(ref: str, **variables: str):
        r = client.chat.completions.with_raw_response.create(
            model="fake", messages=[{"role": "user", "content": "Where is my order?"}],
            extra_body={"keel": {"prompt": ref, "variables": variables}})
        return r.headers["x-request-id"]

    rid = ask("support-reply@production", product="Acme Shop")
    assert upstream_messages(fake) == [{"role": "system", "content": "You answer for Acme Shop. Be brief."},
                                       {"role": "user", "content": "Where is my order?"}]
    assert wait_ledger(srv.extra["db_url"], f"request_id = '{rid}'")[0].prompt_version == "support-reply@1"
    rid = ask("support-reply", product="Acme")  # a bare name: its production label
    assert wait_ledger(srv.extra["db_url"], f"request_id = '{rid}'")[0].prompt_version == "support-reply@1"

    with srv.client(keys["builder"]) as b:  # promote staging's version, then roll back
        assert b.put("/v1/prompts/support-reply/labels/production", json={"version": 2}).status_code == 200
        rid = ask("support-reply@production", product="Acme")
        assert upstream_messages(fake)[0]["content"] == "You answer for Acme.\nBe kind and brief."
        assert wait_ledger(srv.extra["db_url"], f"request_id = '{rid}'")[0].prompt_version == "support-reply@2"
        assert b.put("/v1/prompts/support-reply/labels/production", json={"version": 1}).json()["version"] == 1
    rid = ask("support-reply@production", product="Acme")
    assert wait_ledger(srv.extra["db_url"], f"request_id = '{rid}'")[0].prompt_version == "support-reply@1"
    rid = ask("support-reply@2", product="Acme")
    assert wait_ledger(srv.extra["db_url"], f"request_id = '{rid}'")[0].prompt_version == "support-reply@2"
    traces = srv.data_dir / "traces.jsonl"  # the gateway call's span names the version too
    eventually(lambda: traces.exists() and rid in traces.read_text())
    spans = [json.loads(line) for line in traces.read_text().splitlines() if rid in line]
    assert any(sp["attributes"].get("keel.prompt.version") == "support-reply@2" for sp in spans), spans


def test_a_bad_reference_is_a_4xx_before_any_model_call(world, fake):
    srv, keys = world
    before = len(fake.received)
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
    with srv.client(keys["member"]) as m:
        r = m.post("/v1/chat/completions", json={**body, "keel": {"prompt": "support-reply@production"}})
        assert "'product'" in refused(r, 400, "prompt_variable_missing")["detail"]
        problem(m.post("/v1/chat/completions", json={**body, "keel": {"prompt": "nope@production"}}), 404)
        problem(m.post("/v1/chat/completions", json={**body, "keel": {"prompt": 5}}), 400)
        problem(m.post("/v1/chat/completions", json={**body, "keel": {"prompt": "support-reply",
                                                                       "variables": "product"}}), 400)
    with srv.client(keys["blue_builder"]) as other:  # another team's prompt: the 404 of an unknown one
        problem(other.post("/v1/chat/completions", json={**body, "keel": {"prompt": "support-reply",
                                                                           "variables": {"product": "x"}}}), 404)
    assert len(fake.received) == before


def test_the_cli_pushes_labels_and_diffs(world, tmp_path):
    from typer.testing import CliRunner

    from keel.cli import app

    srv, keys = world
    env = {"KEEL_URL": srv.url, "KEEL_API_KEY": keys["builder"]}

    def keel(*args: str) -> str:
        r = CliRunner().invoke(app, ["prompts", *args], env=env)
        assert r.exit_code == 0, r.output
        return r.output

    (tmp_path / "greet.txt").write_text("Greet {{ who }}.")
    assert "greet@1" in keel("push", "greet", str(tmp_path / "greet.txt"), "--label", "staging")
    (tmp_path / "greet.json").write_text(json.dumps([{"role": "user", "content": "Greet {{ who }} warmly."}]))
    assert "greet@2" in keel("push", "greet", str(tmp_path / "greet.json"))
    assert "-user: Greet {{ who }}." in keel("diff", "greet", "1", "2")
    assert "version 2" in keel("label", "greet", "production", "2")
    listed = keel("list")
    assert "production@2" in listed and "staging@1" in listed
    assert "warmly" in keel("show", "greet@production")
    r = CliRunner().invoke(app, ["prompts", "show", "greet@canary"], env=env)
    assert r.exit_code == 1 and "no label 'canary'" in r.output


def test_a_workflow_llm_step_uses_a_registry_prompt(world, fake):
    """An llm step's `prompt: {ref, variables}` is resolved when the step runs, as the run's principal, with the
    run's templates filled into the variables; its ledger row names the version. A malformed ref is a spec error."""
    srv, keys = world
    spec = ("name: reply\ninputs: {type: object, properties: {product: {type: string}}}\nsteps:\n"
            "  - id: ask\n    type: llm\n    model: fake\n"
            "    prompt: {ref: support-reply@production, variables: {product: '{{ inputs.product }}'}}\n")
    with srv.client(keys["builder"]) as b:
        bad = b.post("/v1/workflows", content=spec.replace("support-reply@production", "bad ref!"),
                     headers={"content-type": "application/yaml"})
        assert bad.status_code in (400, 422) and "prompt.ref" in bad.text, bad.text
        assert b.post("/v1/workflows", content=spec, headers={"content-type": "application/yaml"}).status_code == 201
    with srv.client(keys["member"]) as m:
        run = m.post("/v1/workflows/reply/runs", json={"inputs": {"product": "Widgets"}}).json()["id"]
        eventually(lambda: m.get(f"/v1/workflows/reply/runs/{run}").json()["status"] in ("completed", "failed"))
        assert m.get(f"/v1/workflows/reply/runs/{run}").json()["status"] == "completed"
    version = wait_ledger(srv.extra["db_url"], f"task_id = '{run}'")[0].prompt_version
    assert version.startswith("support-reply@")
    assert upstream_messages(fake)[0]["content"].startswith("You answer for Widgets.")


def test_an_agent_mandate_uses_a_registry_prompt(world, fake):
    """A mandate's `prompt: name@label` replaces goal + instructions as the system messages (variables goal,
    instructions and task), resolved once per run as its principal; each model call's ledger row names the version.
    A malformed reference is a mandate error with its line."""
    srv, keys = world
    mandate = "name: helper\nmodel: fake\ngoal: help with orders\nprompt: agent-sys@production\ntools: {}\n"
    with srv.client(keys["builder"]) as b:
        assert b.post("/v1/prompts", json={"name": "agent-sys", "labels": ["production"], "messages": [
            {"role": "system", "content": "You are Acme's agent. Your goal: {{ goal }}."}]}).status_code == 201
        bad = b.post("/v1/agents", content=mandate.replace("agent-sys@production", "x y"),
                     headers={"content-type": "application/yaml"})
        assert bad.status_code in (400, 422) and "prompt" in bad.text, bad.text
        r = b.post("/v1/agents", content=mandate, headers={"content-type": "application/yaml"})
        assert r.status_code == 201, r.text
    with srv.client(keys["member"]) as m:
        run = m.post("/v1/agents/helper/runs", json={"task": "Where is order 42?", "wait_s": 30}).json()
        eventually(lambda: m.get(f"/v1/agents/helper/runs/{run['id']}").json()["status"] in ("completed", "failed"))
        assert m.get(f"/v1/agents/helper/runs/{run['id']}").json()["status"] == "completed"
    assert wait_ledger(srv.extra["db_url"], f"task_id = '{run['id']}'")[0].prompt_version == "agent-sys@1"
    sent = upstream_messages(fake)
    assert sent[0] == {"role": "system", "content": "You are Acme's agent. Your goal: help with orders."}
    assert sent[-1] == {"role": "user", "content": "Where is order 42?"}
