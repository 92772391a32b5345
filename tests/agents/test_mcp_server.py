"""Keel as an MCP server at /mcp, driven by the official SDK's client over streamable HTTP: the caller's API key
is its identity (no key or a bad one: 401 before MCP), a member finds only its team's collections, another
team's workflow or agent is refused like a missing one, key scopes hold, and each action is audited as the key."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from conftest import EMBEDDED, problem
from tests.agents.conftest import ScriptedModel, define, say
from tests.knowledge.conftest import make_key, make_team, upload

pytestmark = pytest.mark.store
RED_DOC = b"# Merger\n\nThe zebracorn merger plan closes in March; the price is confidential.\n"
BLUE_DOC = b"# Zebracorn\n\nBlue's zebracorn notes: the blue team's own plan.\n"
FLOW = "name: {name}\nsteps:\n  - id: out\n    type: transform\n    output: done\n"
AGENT = "name: {name}\nmodel: agent-model\ngoal: help\ntools:\n  notify: {{allow_recipients: ['*@acme.example']}}\n"


async def _mcp(url: str, key: str, tool: str | None, args: dict[str, Any] | None = None) -> Any:
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=120) as http:
        async with Client(streamable_http_client(url + "/mcp", http_client=http), cache=None) as c:
            if tool is None:
                return sorted(t.name for t in (await c.list_tools()).tools)
            res = await c.call_tool(tool, args or {})
            return res.model_dump(by_alias=True, mode="json", exclude_none=True)


def mcp(world: dict[str, Any], who: Any, tool: str | None = None, **args: Any) -> Any:
    return asyncio.run(_mcp(world["srv"].url, world["keys"][who], tool, args))


def error_text(res: dict[str, Any]) -> str:
    assert res.get("isError"), res
    return " ".join(c.get("text", "") for c in res["content"])


@pytest.fixture(scope="module")
def world(tmp_path_factory, module_server_factory):
    model = ScriptedModel({"hi": [say("hello from red's agent")]}).start()
    base = tmp_path_factory.mktemp("agents-mcp-server")
    (base / "keel.yaml").write_text(f"models:\n  - {{alias: agent-model, provider: openai_compatible, model: m, "
                                    f"base_url: {model.url}}}\n")
    srv = module_server_factory(config=base / "keel.yaml", **EMBEDDED)  # local-embed for search
    for team in ("red", "blue"):
        make_team(srv, team)
    keys = {(role, team): make_key(srv, role, team) for role in ("builder", "member") for team in ("red", "blue")}
    keys["nobody"] = make_key(srv, "member", None)
    keys["red_scoped"] = make_key(srv, "member", "red", agents=["other"], collections=["other"])
    for team, doc in (("red", RED_DOC), ("blue", BLUE_DOC)):
        with srv.client(keys[("builder", team)]) as c:
            assert c.post("/v1/collections", json={"name": f"{team}-docs", "classification": "internal"}
                          ).status_code == 201
            assert upload(c, f"{team}-docs", {f"{team}.md": doc}).json()["status"] == "succeeded"
            assert c.post("/v1/workflows", content=FLOW.format(name=f"{team}_flow"),
                          headers={"content-type": "application/yaml"}).status_code == 201
        define(srv, AGENT.format(name=f"{team}_agent"), key=keys[("builder", team)])
    try:
        yield {"srv": srv, "keys": keys, "model": model}
    finally:
        srv.stop()
        model.stop()


def test_no_key_or_a_bad_key_is_a_401_problem_before_mcp(world):
    init = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
    with httpx2.Client(timeout=30) as c:
        for headers in ({}, {"Authorization": "Bearer sk-keel-not-a-key"}):
            r = c.post(world["srv"].url + "/mcp", json=init,
                       headers={**headers, "Accept": "application/json, text/event-stream"})
            assert r.status_code == 401, r.text
            assert r.headers["content-type"].startswith("application/problem+json")
            assert r.json()["code"] in ("unauthorized", "invalid_api_key"), r.text


def test_the_tools_listed_are_keels_governed_ones(world):
    assert mcp(world, ("member", "red")) == ["answer", "run_agent", "search", "start_workflow"]


def test_a_member_finds_only_its_teams_collections(world):
    red = mcp(world, ("member", "red"), "search", query="zebracorn merger plan")
    blue = mcp(world, ("member", "blue"), "search", query="zebracorn merger plan")
    assert {h["source"] for h in red["structuredContent"]["hits"]} == {"red.md"}
    assert {h["source"] for h in blue["structuredContent"]["hits"]} == {"blue.md"}
    asked = mcp(world, ("member", "blue"), "search", query="zebracorn", collections=["red-docs"])
    assert "not_found: collection 'red-docs' does not exist" in error_text(asked)  # as if it did not exist
    assert "red.md" not in str(asked)
    scoped = mcp(world, "red_scoped", "search", query="zebracorn")  # a key scoped to other collections
    assert scoped["structuredContent"]["hits"] == []
    answered = mcp(world, ("member", "blue"), "answer", question="When does the zebracorn merger close?",
                   model="agent-model")
    assert {c["source"] for c in answered["structuredContent"]["citations"]} == {"blue.md"}
    assert "red.md" not in str(answered) and "March" not in str(answered)


def test_another_teams_workflow_or_agent_is_refused(world):
    started = mcp(world, ("member", "red"), "start_workflow", name="red_flow", inputs={})
    assert started["structuredContent"]["status"] == "running", started
    assert "not found" in error_text(mcp(world, ("member", "blue"), "start_workflow", name="red_flow"))
    ran = mcp(world, ("member", "red"), "run_agent", name="red_agent", task="[script:hi] hello")
    assert ran["structuredContent"]["status"] == "completed"
    assert ran["structuredContent"]["answer"] == "hello from red's agent"
    assert "not_found: agent 'red_agent' not found" in error_text(
        mcp(world, ("member", "blue"), "run_agent", name="red_agent", task="hi"))
    assert "not found" in error_text(mcp(world, "red_scoped", "run_agent", name="red_agent", task="hi"))
    assert "team" in error_text(mcp(world, "nobody", "run_agent", name="red_agent", task="hi"))
    with world["srv"].admin() as a:
        audited = a.get("/v1/audit", params={"action": "agent.run.started", "limit": 100}).json()["data"]
    runs = {e["details"]["run_id"]: e for e in audited}
    assert runs[ran["structuredContent"]["id"]]["actor"] != "system"  # audited as the caller, as over the API


def test_malformed_mcp_input_is_a_client_error_not_a_crash(world):
    res = mcp(world, ("member", "red"), "search", query="")
    assert res.get("isError"), res
    with httpx2.Client(timeout=30) as c:
        r = c.post(world["srv"].url + "/mcp", content=b"{not json",
                   headers={"Authorization": f"Bearer {world['keys'][('member', 'red')]}",
                            "Content-Type": "application/json", "Accept": "application/json, text/event-stream"})
    assert 400 <= r.status_code < 500, r.text
    with world["srv"].client(world["keys"][("member", "red")]) as c:
        for method in ("GET", "DELETE", "PUT"):  # no stream or session to open or end: stateless
            r = c.request(method, "/mcp", headers={"Accept": "application/json, text/event-stream"})
            assert 400 <= r.status_code < 500, (method, r.status_code, r.text)
    with world["srv"].client(world["keys"][("member", "red")]) as c:
        problem(c.post("/mcp", content=b"x" * (11 * 1024 * 1024)), 413)
