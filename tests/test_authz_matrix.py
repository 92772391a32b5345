"""Authorization matrix: every role (admin, builder, member, reviewer, auditor) × own team / other team /
no team × action, from one table with the expected answer for each cell.

Targets belong to team `red`: "own" is a key of team red, "other" a key of team blue, "none" a key without
a team. An answer is an HTTP status, `2xx` (any success), or for a listing `seen` / `hidden` (200, with the
target in it or not). A cell whose action succeeds consumes its target (a cancelled run, a decided
approval, a deleted secret), and the next cell gets a fresh one. One server for the module, keys reused.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.fakes.openai_upstream import FakeOpenAI
from tests.governance.conftest import POLICY, REPLY, Keys, chat, models_yaml
from conftest import eventually

pytestmark = pytest.mark.store

ROLES = ("admin", "builder", "member", "reviewer", "auditor")
RELATIONS = {"own": "red", "other": "blue", "none": None}


def grid(text: str) -> dict[tuple[str, str], str]:
    """`role own other none` lines → {(role, relation): expected answer}."""
    out = {}
    for line in text.strip().splitlines():
        role, *answers = line.split()
        assert role in ROLES and len(answers) == 3, line
        out.update({(role, rel): ans for rel, ans in zip(RELATIONS, answers)})
    assert len(out) == 15
    return out


def by_role(allowed: set[str], yes: str = "200", no: str = "403") -> dict[tuple[str, str], str]:
    """The same answer for every team: `yes` for the roles in `allowed`, `no` for the rest."""
    return {(r, rel): (yes if r in allowed else no) for r in ROLES for rel in RELATIONS}


TEAM_SCOPED_READ = """
admin    {s} {s} {s}
builder  {s} {h} {h}
member   {s} {h} {h}
reviewer {s} {h} {h}
auditor  {s} {h} {s}
"""


def team_read(seen: str, hidden: str) -> dict[tuple[str, str], str]:
    """Readable within the target's team; admins and team-less auditors read everything."""
    return grid(TEAM_SCOPED_READ.format(s=seen, h=hidden))


@dataclass
class Row:
    """One action: request shape, expected answer per cell, and what it acts on."""

    name: str
    method: str
    path: str  # formatted with the target's fields and `cell`
    expect: dict[tuple[str, str], str]
    body: Any = None  # a str is sent as YAML; formatted like the path
    target: str | None = None  # a `World` method returning a fresh target (fields for path/body, `seen` id)
    consumes: bool = False  # a success uses the target up


ALIAS_BOMB = "[" + ", ".join(["&a0 [x, x, x, x, x, x, x, x, x]"] + [  # YAML expanding to 9**8 nodes
    f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 8)]) + "]"
GOV_READERS = {"admin", "auditor"}
MODEL_USERS = {"admin", "builder", "member", "reviewer"}
MESSAGES = {"model": "cloud", "max_tokens": 8, "messages": [{"role": "user", "content": "hello"}]}
TABLE = [
    # -- governance (audit, policy, reviews, guard events) ----------------------------------------
    Row("audit list", "GET", "/v1/audit", by_role(GOV_READERS)),
    Row("audit verify", "GET", "/v1/audit/verify", by_role(GOV_READERS)),
    Row("audit export", "GET", "/v1/audit/export", grid("""
        admin    200 200 200
        builder  403 403 403
        member   403 403 403
        reviewer 403 403 403
        auditor  403 403 200""")),
    Row("policy get", "GET", "/admin/policy", by_role(GOV_READERS)),
    Row("policy versions", "GET", "/admin/policy/versions", by_role(GOV_READERS)),
    Row("policy version", "GET", "/admin/policy/versions/1", by_role(GOV_READERS)),
    Row("policy check", "POST", "/admin/policy/check", by_role(GOV_READERS), body="name: x\n"),
    Row("policy set", "PUT", "/admin/policy", by_role({"admin"}), body=POLICY.replace("{", "{{").replace("}", "}}")),
    Row("policy set malformed", "PUT", "/admin/policy", by_role({"admin"}, yes="400"), body="classifications: 5\n"),
    Row("policy set oversized", "PUT", "/admin/policy", by_role({"admin"}, yes="400"), body="x" * 300_000),
    Row("policy check alias bomb", "POST", "/admin/policy/check", by_role(GOV_READERS, yes="400"),
        body="name: b\nguards: {{input: {{pii: " + ALIAS_BOMB + "}}}}\n"),
    Row("policy set alias bomb", "PUT", "/admin/policy", by_role({"admin"}, yes="400"),
        body="name: b\nguards: {{input: {{pii: " + ALIAS_BOMB + "}}}}\n"),
    Row("policy test", "POST", "/v1/policy/test", by_role(GOV_READERS), body={"model": "cloud"}),
    Row("reviews list", "GET", "/v1/reviews", by_role({"admin", "reviewer"})),
    Row("guard events", "GET", "/v1/guard-events", by_role(set(ROLES))),
    Row("review get", "GET", "/v1/reviews/{review}", grid("""
        admin    200 200 200
        builder  404 404 404
        member   200 404 404
        reviewer 200 404 200
        auditor  404 404 404"""), target="review"),
    # -- workflow definitions -----------------------------------------------------------------------
    Row("workflow define new", "POST", "/v1/workflows", grid("""
        admin    201 201 201
        builder  201 201 403
        member   403 403 403
        reviewer 403 403 403
        auditor  403 403 403"""), body="name: new_{cell}\nsteps:\n  - {{id: a, type: transform, output: 1}}\n"),
    Row("workflow redefine team's", "POST", "/v1/workflows", grid("""
        admin    201 201 201
        builder  201 409 409
        member   403 403 403
        reviewer 403 403 403
        auditor  403 403 403"""), body="name: red_def\nsteps:\n  - {{id: a, type: transform, output: {cell}}}\n"),
    Row("workflow define alias bomb", "POST", "/v1/workflows", grid("""
        admin    422 422 422
        builder  422 422 422
        member   403 403 403
        reviewer 403 403 403
        auditor  403 403 403"""), body="name: bomb_{cell}\nsteps:\n  - {{id: a, type: transform, output: "
        + ALIAS_BOMB + "}}\n"),
    Row("workflow redefine global", "POST", "/v1/workflows", grid("""
        admin    201 201 201
        builder  403 403 403
        member   403 403 403
        reviewer 403 403 403
        auditor  403 403 403"""), body="name: global_def\nsteps:\n  - {{id: a, type: transform, output: {cell}}}\n"),
    # -- runs ---------------------------------------------------------------------------------------
    Row("run read", "GET", "/v1/workflows/red_wait/runs/{run}", team_read("200", "404"), target="waiting_run"),
    Row("run list", "GET", "/v1/workflows/red_wait/runs", team_read("seen", "404"), target="waiting_run"),
    Row("team-less admin run read", "GET", "/v1/workflows/global_run/runs/{run}", grid("""
        admin    200 200 200
        builder  404 404 404
        member   404 404 404
        reviewer 404 404 404
        auditor  404 404 200"""), target="teamless_run"),
    Row("run cancel", "POST", "/v1/workflows/red_wait/runs/{run}/cancel", grid("""
        admin    200 200 200
        builder  200 404 404
        member   200 404 404
        reviewer 403 403 403
        auditor  403 403 403"""), target="waiting_run", consumes=True),
    Row("run retry", "POST", "/v1/workflows/red_fail/runs/{run}/retry", grid("""
        admin    201 201 201
        builder  201 404 404
        member   201 404 404
        reviewer 403 403 403
        auditor  403 403 403"""), body={}, target="failed_run"),
    # -- runs waiting for a provider (an alias whose upstream says "come back in ten minutes") --------
    Row("runs waiting for a provider", "GET", "/v1/runs?status=waiting_provider&waiting_for=red-busy",
        team_read("seen", "hidden"), target="provider_wait_run"),
    Row("run resume", "POST", "/v1/workflows/red_busy/runs/{run}/resume", grid("""
        admin    200 200 200
        builder  200 404 404
        member   200 404 404
        reviewer 403 403 403
        auditor  403 403 403"""), target="provider_wait_run", consumes=True),
    # -- approvals ----------------------------------------------------------------------------------
    Row("approvals list", "GET", "/v1/approvals", grid("""
        admin    seen seen   seen
        builder  403  403    403
        member   403  403    403
        reviewer seen hidden hidden
        auditor  seen hidden seen"""), target="approval"),
    Row("approval get", "GET", "/v1/approvals/{approval}", grid("""
        admin    200 200 200
        builder  404 404 404
        member   404 404 404
        reviewer 200 404 404
        auditor  200 404 200"""), target="approval"),
    *(Row(f"approval {verb}", "POST", f"/v1/approvals/{{approval}}/{verb}", grid("""
        admin    200 200 200
        builder  403 403 403
        member   403 403 403
        reviewer 200 404 404
        auditor  403 403 403"""), body={}, target="approval", consumes=True) for verb in ("approve", "reject")),
    # -- agents -------------------------------------------------------------------------------------
    Row("agent define new", "POST", "/v1/agents", grid("""
        admin    201 201 201
        builder  201 201 403
        member   403 403 403
        reviewer 403 403 403
        auditor  403 403 403"""), body="name: new_{cell}\nmodel: cloud\ngoal: g\ntools: {{}}\n"),
    Row("agent redefine team's", "POST", "/v1/agents", grid("""
        admin    201 201 201
        builder  201 409 409
        member   403 403 403
        reviewer 403 403 403
        auditor  403 403 403"""), body="name: red_agent\nmodel: cloud\ngoal: g {cell}\ntools: {{}}\n"),
    Row("agent read", "GET", "/v1/agents/red_agent", team_read("200", "404")),
    Row("agent run", "POST", "/v1/agents/red_agent/runs", grid("""
        admin    2xx 2xx 2xx
        builder  2xx 404 403
        member   2xx 404 403
        reviewer 403 403 403
        auditor  403 403 403"""), body={"task": "hi", "wait_s": 0}),
    Row("agent run read", "GET", "/v1/agents/red_agent/runs/{run}", team_read("200", "404"), target="agent_run"),
    Row("agent run list", "GET", "/v1/agents/red_agent/runs", team_read("seen", "404"), target="agent_run"),
    Row("agent run resume", "POST", "/v1/agents/red_busy_agent/runs/{run}/resume", grid("""
        admin    200 200 200
        builder  200 404 404
        member   200 404 404
        reviewer 403 403 403
        auditor  403 403 403"""), target="agent_provider_wait_run", consumes=True),
    *(Row(f"agent {verb}", "POST", f"/v1/agents/red_agent/{verb}", grid("""
        admin    200 200 200
        builder  200 404 404
        member   403 404 404
        reviewer 403 404 404
        auditor  403 404 403"""), body={}) for verb in ("pause", "resume")),
    # -- /mcp: Keel's tools for MCP clients (JSON-RPC; a refused tool is a 200 with isError, so `hidden`) ------
    Row("mcp tools/list", "POST", "/mcp", by_role(set(ROLES), yes="seen"), target="mcp_listed",
        body={"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}),
    Row("mcp run_agent", "POST", "/mcp", grid("""
        admin    seen seen   seen
        builder  seen hidden hidden
        member   seen hidden hidden
        reviewer hidden hidden hidden
        auditor  hidden hidden hidden"""), target="mcp_ok", body={"jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": "run_agent", "arguments": {"name": "red_agent", "task": "hi", "wait_s": 0}}}),
    Row("mcp start_workflow", "POST", "/mcp", grid("""
        admin    seen seen   seen
        builder  seen hidden hidden
        member   seen hidden hidden
        reviewer hidden hidden hidden
        auditor  hidden hidden hidden"""), target="mcp_ok", body={"jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": "start_workflow", "arguments": {"name": "red_def"}}}),
    Row("mcp malformed arguments", "POST", "/mcp", by_role(set(), no="hidden"), target="mcp_ok",
        body={"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "search", "arguments": {"query": ""}}}),
    # -- records and outbox -------------------------------------------------------------------------
    Row("records", "GET", "/v1/records/red_rec", team_read("seen", "hidden"), target="waiting_run"),
    Row("outbox", "GET", "/v1/outbox", team_read("seen", "hidden"), target="waiting_run"),
    Row("budgets binding the caller", "GET", "/v1/budgets", grid("""
        admin    seen seen   seen
        builder  seen hidden hidden
        member   seen hidden hidden
        reviewer seen hidden hidden
        auditor  seen hidden hidden"""), target="red_budget"),
    Row("team-less admin run records", "GET", "/v1/records/red_rec", grid("""
        admin    seen   seen   seen
        builder  hidden hidden hidden
        member   hidden hidden hidden
        reviewer hidden hidden hidden
        auditor  hidden hidden seen"""), target="teamless_run"),
    # -- secrets ------------------------------------------------------------------------------------
    Row("team secrets list", "GET", "/v1/secrets", grid("""
        admin    seen hidden 403
        builder  seen hidden 403
        member   403  403    403
        reviewer 403  403    403
        auditor  403  403    403"""), target="team_secret"),
    Row("team secret set", "PUT", "/v1/secrets/{name}", grid("""
        admin    200 409 403
        builder  200 409 403
        member   403 403 403
        reviewer 403 403 403
        auditor  403 403 403"""), body={"value": "value-{cell}-0123456789"}, target="team_secret"),
    Row("team secret delete", "DELETE", "/v1/secrets/{name}", grid("""
        admin    204 404 403
        builder  204 404 403
        member   403 403 403
        reviewer 403 403 403
        auditor  403 403 403"""), target="team_secret", consumes=True),
    Row("secrets admin list", "GET", "/admin/secrets", by_role({"admin"})),
    Row("secret admin set", "PUT", "/admin/secrets/glob-sec", by_role({"admin"}),
        body={"value": "glob-{cell}-0123456789", "uses": ["http_header"]}),
    Row("secret grant", "PUT", "/admin/secrets/glob-sec/grants/red/http_header", by_role({"admin"}, yes="2xx"),
        target="glob_secret"),
    Row("secret revoke", "DELETE", "/admin/secrets/glob-sec/grants/red/http_header", by_role({"admin"}, yes="204"),
        target="grant", consumes=True),
    # -- observe (metrics: admin and auditor keys, whatever their team) -------------------------------
    Row("metrics", "GET", "/metrics", by_role({"admin", "auditor"})),
    # usage reports: admins and auditors see every call, a builder its team's, a member or reviewer its own key's
    Row("usage report", "GET", "/v1/usage?group_by=task&start=2000-01-01", grid("""
        admin    seen seen   seen
        builder  seen hidden hidden
        member   seen hidden hidden
        reviewer hidden hidden hidden
        auditor  seen seen   seen"""), target="red_call"),
    Row("usage bad group_by", "GET", "/v1/usage?group_by=colour", by_role(set(), no="400")),
    # feedback: on a call the key may see in its usage report (else the 404 of an unknown id); auditors only read
    Row("feedback", "POST", "/v1/feedback", grid("""
        admin    201 201 201
        builder  201 404 404
        member   201 404 404
        reviewer 404 404 404
        auditor  403 403 403"""), body={"request_id": "{req}", "score": 1, "label": "{cell}"}, target="red_call"),
    Row("feedback without a subject", "POST", "/v1/feedback", by_role(MODEL_USERS, yes="400"), body={"score": 1}),
    # prompt registry: team-owned like workflows (builders of the team change, everyone of the team reads and uses)
    Row("prompt define new", "POST", "/v1/prompts", grid("""
        admin    201 201 201
        builder  201 201 403
        member   403 403 403
        reviewer 403 403 403
        auditor  403 403 403"""), body={"name": "new-{cell}", "messages": [{"role": "system", "content": "hi"}]}),
    Row("prompt redefine team's", "POST", "/v1/prompts", grid("""
        admin    201 201 201
        builder  201 409 409
        member   403 403 403
        reviewer 403 403 403
        auditor  403 403 403"""), body={"name": "red-prompt", "description": "{cell}",
                                         "messages": [{"role": "system", "content": "Be brief."}]},
        target="red_prompt"),
    Row("prompt read", "GET", "/v1/prompts/red-prompt", team_read("200", "404"), target="red_prompt"),
    Row("prompt versions", "GET", "/v1/prompts/red-prompt/versions", team_read("200", "404"), target="red_prompt"),
    Row("prompt list", "GET", "/v1/prompts", team_read("seen", "hidden"), target="red_prompt"),
    Row("prompt label move", "PUT", "/v1/prompts/red-prompt/labels/staging", grid("""
        admin    200 200 200
        builder  200 404 404
        member   403 404 404
        reviewer 403 404 404
        auditor  403 404 403"""), body={"version": 1}, target="red_prompt"),
    Row("prompt malformed", "POST", "/v1/prompts", by_role({"admin", "builder"}, yes="400"), body={"name": "x"}),
    # evaluations: datasets and runs belong to the builder's team (evals.run: builders and admins); drift is global
    Row("eval dataset define", "POST", "/v1/evals/datasets", grid("""
        admin    201 201 201
        builder  201 201 403
        member   403 403 403
        reviewer 403 403 403
        auditor  403 403 403"""), body={"name": "ds-{cell}", "items": [{"question": "q", "expected_answer": "a"}]}),
    Row("eval dataset list", "GET", "/v1/evals/datasets", team_read("seen", "hidden"), target="red_dataset"),
    Row("eval run", "POST", "/v1/evals/runs", grid("""
        admin    201 201 201
        builder  201 404 404
        member   403 403 403
        reviewer 403 403 403
        auditor  403 403 403"""), body={"dataset": "red-ds"}, target="red_dataset"),
    Row("eval run read", "GET", "/v1/evals/runs/{evrun}", team_read("200", "404"), target="red_eval_run"),
    Row("eval run items (what its starter's search found)", "GET", "/v1/evals/runs/{evrun}", grid("""
        admin    seen   seen seen
        builder  seen   404  404
        member   hidden 404  404
        reviewer hidden 404  404
        auditor  hidden 404  seen"""), target="red_eval_run_items"),
    Row("eval runs list", "GET", "/v1/evals/runs", team_read("seen", "hidden"), target="red_eval_run"),
    Row("eval run malformed", "POST", "/v1/evals/runs", by_role({"admin", "builder"}, yes="400"),
        body={"dataset": "red-ds", "top_k": 0}),
    Row("drift", "GET", "/v1/drift", by_role({"admin", "auditor"})),
    Row("chat with a team's prompt", "POST", "/v1/chat/completions", grid("""
        admin    200 200 200
        builder  200 404 404
        member   200 404 404
        reviewer 200 404 404
        auditor  404 404 404"""), body={"model": "cloud", "messages": [{"role": "user", "content": "hello {cell}"}],
                                         "keel": {"prompt": "red-prompt@1"}}, target="red_prompt"),
    # -- deployments (admin endpoints) --------------------------------------------------------------
    Row("deployments list", "GET", "/admin/deployments", by_role({"admin"})),
    Row("deployment add", "POST", "/admin/deployments", by_role({"admin"}, yes="201"),
        body={"alias": "authz-{cell}", "provider": "openai_compatible", "model": "m", "base_url": "{cloud}"}),
    # -- Anthropic Messages ingress (a key without models.use gets the same 404 as an unknown model) -----
    Row("messages", "POST", "/v1/messages", by_role(MODEL_USERS, no="404"), body=MESSAGES),
    Row("messages count_tokens", "POST", "/v1/messages/count_tokens", by_role(MODEL_USERS, no="404"),
        body=MESSAGES),
    Row("messages unknown model", "POST", "/v1/messages", by_role(set(), no="404"), body={**MESSAGES, "model": "nope"}),
    Row("messages malformed body", "POST", "/v1/messages", by_role(set(), no="400"),
        body={"model": "cloud", "messages": "hello"}),
    # -- Responses API and legacy completions (stored responses: read by the team, deleted by the owner) ---
    Row("responses create", "POST", "/v1/responses", by_role({"admin", "builder", "member", "reviewer"}, no="404"),
        body={"model": "cloud", "input": "hi {cell}", "store": False}),
    Row("completions create", "POST", "/v1/completions", by_role({"admin", "builder", "member", "reviewer"}, no="404"),
        body={"model": "cloud", "prompt": "hi {cell}", "max_tokens": 4}),
    # -- moderations (Keel's guards, no model: any key) and rerank (reranker deployments only) -------------
    Row("moderations", "POST", "/v1/moderations", by_role(set(ROLES)), body={"input": "hello {cell}"}),
    Row("moderations malformed", "POST", "/v1/moderations", by_role(set(), no="422"), body={"input": 5}),
    Row("moderations oversized", "POST", "/v1/moderations", by_role(set(), no="400"), body={"input": ["a"] * 257}),
    Row("rerank a chat model", "POST", "/v1/rerank", by_role(MODEL_USERS, yes="400", no="404"),
        body={"model": "cloud", "query": "q {cell}", "documents": ["a", "b"]}),
    Row("rerank unknown model", "POST", "/v1/rerank", by_role(set(), no="404"),
        body={"model": "nope", "query": "q", "documents": ["a"]}),
    Row("rerank malformed", "POST", "/v1/rerank", by_role(set(), no="422"),
        body={"model": "cloud", "query": "q", "documents": "a"}),
    Row("rerank oversized", "POST", "/v1/rerank", by_role(set(), no="422"),
        body={"model": "cloud", "query": "q", "documents": ["d"] * 1001}),
    Row("response read", "GET", "/v1/responses/{resp}", team_read("200", "404"), target="red_response"),
    Row("response continue", "POST", "/v1/responses", grid("""
        admin    200 200 200
        builder  200 404 404
        member   200 404 404
        reviewer 200 404 404
        auditor  404 404 404"""), body={"model": "cloud", "input": "more", "previous_response_id": "{resp}",
                                         "store": False}, target="red_response"),
    Row("response delete", "DELETE", "/v1/responses/{resp}", grid("""
        admin    200 200 200
        builder  403 404 404
        member   200 404 404
        reviewer 403 404 404
        auditor  403 404 403"""), target="red_response", consumes=True),
    # -- console passwords (admins set them; a short one is refused before it is hashed) -----------------
    Row("user set password", "PUT", "/admin/users/nobody-{cell}@example.com/password", by_role({"admin"}, yes="404"),
        body={"password": "a long enough passphrase"}),
    Row("user set password too short", "PUT", "/admin/users/nobody@example.com/password",
        by_role({"admin"}, yes="422"), body={"password": "short"}),
]


def _fmt(value: Any, fields: dict[str, Any]) -> Any:
    if isinstance(value, str):
        return value.format(**fields)
    if isinstance(value, dict):
        return {k: _fmt(v, fields) for k, v in value.items()}
    return value


class World:
    """The module's server, keys and the red team's targets (fresh ones on demand)."""

    def __init__(self, srv: Any, keys: Keys, cloud_url: str) -> None:
        self.srv, self.keys, self.cloud = srv, keys, cloud_url
        self.cache: dict[str, dict[str, Any]] = {}
        red_builder, admin_red = keys.keys[("builder", "red")], keys.keys[("admin", "red")]
        self.red_builder, self.admin_red = red_builder, admin_red
        for key, spec in ((red_builder, "name: red_def\nsteps:\n  - {id: a, type: transform, output: 0}\n"),
                          (srv.admin_key, "name: global_def\nsteps:\n  - {id: a, type: transform, output: 0}\n"),
                          (srv.admin_key, "name: global_run\nsteps:\n"
                                          "  - {id: rec, type: record, table: red_rec, data: {who: '{{ run.id }}'}}\n"
                                          "  - {id: nap, type: wait, seconds: 600}\n"),
                          (red_builder, "name: red_wait\nsteps:\n"
                                        "  - {id: rec, type: record, table: red_rec, data: {who: '{{ run.id }}'}}\n"
                                        "  - {id: mail, type: notify, email: a@example.com, subject: '{{ run.id }}'}\n"
                                        "  - {id: nap, type: wait, seconds: 600}\n"),
                          (red_builder, "name: red_fail\nsteps:\n  - {id: boom, type: transform, output: '{{ 1 // 0 }}'}\n"),
                          (red_builder, "name: red_appr\nsteps:\n  - {id: ok, type: approval, approvers: [reviewer, admin]}\n")):
            with srv.client(key) as c:
                r = c.post("/v1/workflows", content=spec, headers={"content-type": "application/yaml"})
            assert r.status_code == 201, r.text
        with srv.client(red_builder) as c:
            r = c.post("/v1/agents", content="name: red_agent\nmodel: cloud\ngoal: g\ntools: {}\n",
                       headers={"content-type": "application/yaml"})
            assert r.status_code == 201, r.text

    def fresh(self, name: str, consumed: bool) -> dict[str, Any]:
        if consumed or name not in self.cache:
            self.cache[name] = getattr(self, name)()
        return self.cache[name]

    def _start(self, key: str, workflow: str) -> str:
        with self.srv.client(key) as c:
            r = c.post(f"/v1/workflows/{workflow}/runs", json={"inputs": {}})
        assert r.status_code == 201, r.text
        return r.json()["id"]

    def _status(self, workflow: str, run_id: str, statuses: tuple[str, ...]) -> None:
        def check() -> bool:
            with self.srv.admin() as c:
                return c.get(f"/v1/workflows/{workflow}/runs/{run_id}").json().get("status") in statuses
        eventually(check, timeout=60)

    def _recorded(self, run_id: str, path: str = "/v1/records/red_rec") -> None:
        def check() -> bool:
            with self.srv.admin() as c:
                return run_id in c.get(path).text
        eventually(check, timeout=60)

    def waiting_run(self) -> dict[str, Any]:
        run_id = self._start(self.admin_red, "red_wait")
        self._recorded(run_id)
        self._recorded(run_id, f"/v1/outbox?run_id={run_id}")
        return {"run": run_id, "seen": run_id}

    def teamless_run(self) -> dict[str, Any]:
        run_id = self._start(self.srv.admin_key, "global_run")
        self._recorded(run_id)
        return {"run": run_id, "seen": run_id}

    def failed_run(self) -> dict[str, Any]:
        run_id = self._start(self.admin_red, "red_fail")
        self._status("red_fail", run_id, ("failed",))
        return {"run": run_id}

    def agent_run(self) -> dict[str, Any]:
        with self.srv.client(self.admin_red) as c:
            r = c.post("/v1/agents/red_agent/runs", json={"task": "hi", "wait_s": 0})
        assert r.status_code in (200, 202), r.text
        return {"run": r.json()["id"], "seen": r.json()["id"]}

    def mcp_ok(self) -> dict[str, Any]:
        """For /mcp rows: a tool that ran answers `"isError":false` (seen); a refused one has it true (hidden)."""
        return {"seen": '"isError":false'}

    def mcp_listed(self) -> dict[str, Any]:
        return {"seen": '"name":"run_agent"'}

    def provider_wait_run(self) -> dict[str, Any]:
        """A red run whose model step waits for `red-busy`: its upstream answers 429 with Retry-After 600."""
        if not hasattr(self, "busy"):
            self.busy = FakeOpenAI(retry_after="600").start()
            with self.srv.admin() as c:
                r = c.post("/admin/deployments", json={"alias": "red-busy", "provider": "openai_compatible",
                                                       "model": "fault:429", "base_url": self.busy.url})
                assert r.status_code == 201, r.text
            with self.srv.client(self.red_builder) as c:
                r = c.post("/v1/workflows", content="name: red_busy\nsteps:\n  - {id: ask, type: llm, "
                           "model: red-busy, prompt: hi, max_tokens: 4}\n", headers={"content-type": "application/yaml"})
                assert r.status_code == 201, r.text
        run_id = self._start(self.admin_red, "red_busy")
        self._status("red_busy", run_id, ("waiting_provider",))
        return {"run": run_id, "seen": run_id}

    def agent_provider_wait_run(self) -> dict[str, Any]:
        """A red agent run whose model call waits for `red-busy` (429, Retry-After 600)."""
        if not hasattr(self, "busy_agent"):
            self.provider_wait_run()  # the red-busy deployment
            with self.srv.client(self.red_builder) as c:
                r = c.post("/v1/agents", content="name: red_busy_agent\nmodel: red-busy\ngoal: g\ntools: {}\n"
                           "budgets: {wall_time: 1h}\n", headers={"content-type": "application/yaml"})
                assert r.status_code == 201, r.text
            self.busy_agent = True
        with self.srv.client(self.admin_red) as c:
            run_id = c.post("/v1/agents/red_busy_agent/runs", json={"task": "hi", "wait_s": 0}).json()["id"]

        def waiting() -> bool:
            with self.srv.admin() as c:
                return c.get(f"/v1/agents/red_busy_agent/runs/{run_id}").json().get("status") == "waiting_provider"
        eventually(waiting, timeout=60)
        return {"run": run_id, "seen": run_id}

    def approval(self) -> dict[str, Any]:
        run_id = self._start(self.admin_red, "red_appr")
        self._status("red_appr", run_id, ("waiting_approval",))
        return {"approval": f"apr_{run_id}.ok", "seen": f"apr_{run_id}.ok"}

    def review(self) -> dict[str, Any]:
        r = chat(self.srv, self.keys.keys[("member", "red")], "onprem", "hello", metadata={"use_case": "support-reply"})
        return {"review": r.json()["review_id"]}

    def team_secret(self) -> dict[str, Any]:
        name = f"red-sec-{len(self.cache)}-{time.monotonic_ns()}"
        with self.srv.client(self.red_builder) as c:
            assert c.put(f"/v1/secrets/{name}", json={"value": "red-value-0123456789"}).status_code == 200
        return {"name": name, "seen": name}

    def glob_secret(self) -> dict[str, Any]:
        with self.srv.admin() as c:
            r = c.put("/admin/secrets/glob-sec", json={"value": "glob-value-0123456789", "uses": ["http_header"]})
            assert r.status_code == 200, r.text
        return {}

    def red_budget(self) -> dict[str, Any]:
        """A daily budget of team red (the console form cells add its monthly one)."""
        with self.srv.admin() as c:
            r = c.post("/admin/budgets", json={"scope": "team", "scope_id": "red", "period": "day", "amount": 1000})
        assert r.status_code == 201, r.text
        return {"seen": r.json()["id"]}

    def red_response(self) -> dict[str, Any]:
        """A response stored by red's member."""
        with self.keys.client("member", "red") as c:
            r = c.post("/v1/responses", json={"model": "cloud", "input": "red's question"})
        assert r.status_code == 200, r.text
        return {"resp": r.json()["id"], "seen": r.json()["id"]}

    def red_call(self) -> dict[str, Any]:
        """A model call by red's member, in the ledger, with a task id of its own."""
        task = f"authz-task-{time.monotonic_ns()}"
        r = chat(self.srv, self.keys.keys[("member", "red")], "cloud", "hello", metadata={"task_id": task})
        assert r.status_code == 200, r.text

        def recorded() -> bool:
            with self.srv.admin() as c:
                return task in c.get("/v1/usage", params={"group_by": "task", "start": "2000-01-01"}).text
        eventually(recorded, timeout=30)
        return {"req": r.headers["x-request-id"], "seen": task}

    def red_prompt(self) -> dict[str, Any]:
        """A prompt of team red (version 1 at least), defined by red's builder."""
        with self.srv.client(self.red_builder) as c:
            r = c.post("/v1/prompts", json={"name": "red-prompt", "messages": [{"role": "system", "content": "Be brief."}]})
        assert r.status_code in (200, 201), r.text
        return {"seen": "red-prompt"}

    def red_dataset(self) -> dict[str, Any]:
        with self.srv.client(self.red_builder) as c:
            r = c.post("/v1/evals/datasets", json={"name": "red-ds", "items": [{"question": "q", "expected_answer": "a"}]})
        assert r.status_code in (200, 201), r.text
        return {"seen": "red-ds"}

    def red_eval_run(self) -> dict[str, Any]:
        self.red_dataset()
        with self.srv.client(self.red_builder) as c:
            r = c.post("/v1/evals/runs", json={"dataset": "red-ds"})
        assert r.status_code == 201, r.text
        return {"evrun": r.json()["id"], "seen": r.json()["id"]}

    def red_eval_run_items(self) -> dict[str, Any]:
        """Red's builder's eval run: its items are shown to the starter, admins and team-less auditors only."""
        return {**self.red_eval_run(), "seen": '"items":['}

    def grant(self) -> dict[str, Any]:
        self.glob_secret()
        with self.srv.admin() as c:
            assert c.put("/admin/secrets/glob-sec/grants/red/http_header").status_code in (200, 201)
        return {}


@pytest.fixture(scope="module")
def world(tmp_path_factory, module_server_factory):
    cloud, onprem = FakeOpenAI(reply=REPLY).start(), FakeOpenAI(reply=REPLY).start()
    base = tmp_path_factory.mktemp("authz")
    (base / "policy.yaml").write_text(POLICY)
    (base / "keel.yaml").write_text(models_yaml(cloud.url, onprem.url))
    srv = module_server_factory(config=base / "keel.yaml", KEEL_POLICY_FILE=str(base / "policy.yaml"))
    try:
        yield World(srv, Keys(srv), cloud.url)
    finally:
        srv.stop()
        cloud.stop()
        onprem.stop()


def _answer(row: Row, r: httpx.Response, target: dict[str, Any]) -> str:
    if r.status_code == 200 and any(v in ("seen", "hidden") for v in row.expect.values()):
        return "seen" if target["seen"] in r.text else "hidden"
    return str(r.status_code)


def _send(client: httpx.Client, row: Row, path: str, body: Any) -> httpx.Response:
    if isinstance(body, str):
        return client.request(row.method, path, content=body, headers={"content-type": "application/yaml"})
    return client.request(row.method, path, json=body) if body is not None else client.request(row.method, path)


@pytest.mark.parametrize("row", TABLE, ids=[row.name for row in TABLE])
def test_authorization_matrix(world, row):
    """Each cell of the row answers exactly as the table says (and anonymous callers get 401)."""
    wrong = []
    consumed = False
    for role in ROLES:
        for rel, team in RELATIONS.items():
            target = world.fresh(row.target, consumed) if row.target else {}
            fields = {**target, "cell": f"{role}_{rel}", "cloud": world.cloud}
            path, body = _fmt(row.path, fields), _fmt(row.body, fields)
            with world.keys.client(role, team) as c:
                r = _send(c, row, path, body)
            got, want = _answer(row, r, target), row.expect[(role, rel)]
            if not (got == want or (want == "2xx" and got.startswith("2"))):
                wrong.append(f"{role}/{rel}: want {want}, got {got} {r.text[:160]}")
            if r.status_code >= 500:
                wrong.append(f"{role}/{rel}: server error {r.text[:200]}")
            consumed = row.consumes and 200 <= r.status_code < 300
    if consumed:
        world.cache.pop(row.target, None)
    fields = {"run": "run_x", "approval": "apr_x", "review": "rev_x", "name": "x", "cell": "anon", "resp": "resp_x",
              "req": "req_x", "cloud": world.cloud, **(world.cache.get(row.target) or {})}
    with world.srv.client() as anonymous:
        r = _send(anonymous, row, _fmt(row.path, fields), _fmt(row.body, fields))
    if r.status_code != 401:
        wrong.append(f"anonymous: want 401, got {r.status_code}")
    assert not wrong, "\n".join(wrong)


def test_nobody_can_edit_the_audit_trail(world):
    for role in ROLES:
        with world.keys.client(role, None) as c:
            for method in ("POST", "PUT", "PATCH", "DELETE"):
                for path in ("/v1/audit", "/v1/audit/1"):
                    assert c.request(method, path, json={}).status_code in (404, 405), (role, method, path)


def test_team_scoping_leaks_nothing(world):
    """A red member's denial and guard events are visible to red's auditor and to that key, never to blue."""
    keys, srv = world.keys, world.srv
    red = keys.keys[("member", "red")]
    r = chat(srv, red, "cloud", "hi", metadata={"classification": "restricted"})
    assert r.status_code == 403
    rid = r.headers["x-request-id"]
    blocked = chat(srv, red, "cloud", "my key is AKIAIOSFODNN7EXAMPLE")
    assert blocked.status_code == 403
    bid = blocked.headers["x-request-id"]

    def audit_ids(role, team):
        with keys.client(role, team) as c:
            return {e["details"].get("request_id") for e in c.get("/v1/audit?limit=1000").json()["data"]}

    assert rid in audit_ids("auditor", "red") and rid in audit_ids("auditor", None) and rid in audit_ids("admin", "blue")
    assert rid not in audit_ids("auditor", "blue")

    def guard_seen(role, team):
        with keys.client(role, team) as c:
            return any(e["request_id"] == bid for e in c.get("/v1/guard-events?limit=1000").json()["data"])

    assert guard_seen("member", "red") and guard_seen("auditor", "red") and guard_seen("admin", None)
    for role, team in (("member", "blue"), ("builder", "red"), ("reviewer", "red"), ("auditor", "blue")):
        assert not guard_seen(role, team), (role, team)


def test_reviews_cannot_be_decided_outside_their_team(world):
    """A review hidden from a cell (404 in the table) cannot be decided by it either."""
    rid = world.review()["review"]
    for role, team in (("reviewer", "blue"), ("builder", "red"), ("auditor", None), ("member", "blue")):
        with world.keys.client(role, team) as c:
            assert c.post(f"/v1/reviews/{rid}/approve", json={}).status_code in (403, 404), (role, team)


def test_messages_edge_cells(world):
    """/v1/messages beyond the roles: a bad `x-api-key`, a body over the size limit, and a key scoped to other
    models — each refused before any model runs."""
    url = world.srv.url + "/v1/messages"
    r = httpx.post(url, json=MESSAGES, headers={"x-api-key": "sk-keel-not-a-key"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", r.text
    member = world.keys.keys[("member", "red")]
    big = {**MESSAGES, "messages": [{"role": "user", "content": "x" * (11 * 1024 * 1024)}]}
    assert httpx.post(url, json=big, headers={"x-api-key": member}, timeout=60).status_code == 413
    with world.srv.admin() as admin:
        scoped = admin.post("/admin/keys", json={"role": "member", "team": "red", "name": "onprem-only",
                                                 "scopes": {"models": ["onprem"]}}).json()["key"]
    r = httpx.post(url, json=MESSAGES, headers={"x-api-key": scoped})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error", r.text


CONSOLE_PAGES = {  # console page → the roles that may open it (the rest: 403), as the API's rules say
    "/console/overview": set(ROLES), "/console/usage": set(ROLES), "/console/workflows": set(ROLES),
    "/console/audit": GOV_READERS, "/console/keys": {"admin"}, "/console/inbox": {"admin", "reviewer", "auditor"},
    "/console/playground": MODEL_USERS, "/console/knowledge": MODEL_USERS, "/console/agents": set(ROLES),
    "/console/people": {"admin"},
    "/console/budgets": {"admin"}, "/console/limits": {"admin"}, "/console/deployments": {"admin"},
    "/console/policy": GOV_READERS, "/console/guard-events": set(ROLES),
}


def _console(world: World, key: str) -> httpx.Client:
    """A console session opened with `key` (the sign-in form's double-submit token included)."""
    c = httpx.Client(base_url=world.srv.url, timeout=30)
    page = c.get("/console/sign-in")
    csrf = page.text.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    assert c.post("/console/sign-in", data={"csrf": csrf, "key": key}).status_code == 303
    return c


def test_console_pages_follow_the_api_rules(world):
    """Each role × team opens the console's pages as the API would answer it: a red run by URL is seen by its
    team (and admins, team-less auditors) and is the not-found page for everyone else; a form without the
    session's CSRF token is refused; an anonymous browser is sent to the sign-in form; a forged cookie or an
    oversized one opens nothing."""
    run = world.fresh("waiting_run", False)["run"]
    runs = team_read("200", "404")
    wrong = []
    for role in ROLES:
        for rel, team in RELATIONS.items():
            c = _console(world, world.keys.keys[(role, team)])
            for path, allowed in CONSOLE_PAGES.items():
                got = c.get(path).status_code
                if got != (200 if role in allowed else 403):
                    wrong.append(f"{role}/{rel} {path}: got {got}")
            got = c.get(f"/console/workflows/red_wait/runs/{run}").status_code
            if str(got) != runs[(role, rel)]:
                wrong.append(f"{role}/{rel} run page: want {runs[(role, rel)]}, got {got}")
            r = c.post("/console/keys", data={"name": f"csrf-{role}-{rel}", "role": "admin"})
            if r.status_code != 403:
                wrong.append(f"{role}/{rel} key form without CSRF: got {r.status_code}")
            c.close()
    for cookie in ("forged", "x" * 5000):
        with httpx.Client(base_url=world.srv.url, cookies={"keel_console": cookie}) as anonymous:
            for path in (*CONSOLE_PAGES, f"/console/workflows/red_wait/runs/{run}"):
                r = anonymous.get(path)
                if r.status_code != 303 or not r.headers["location"].startswith("/console/sign-in"):
                    wrong.append(f"anonymous {path}: got {r.status_code}")
            r = anonymous.post("/console/keys", data={"name": "anon", "role": "admin"})
            if r.status_code != 401:
                wrong.append(f"anonymous POST /console/keys: got {r.status_code}")
    assert not wrong, "\n".join(wrong)


def test_console_admin_forms_follow_the_api_rules(world):
    """The console's budget, limit, deployment and policy-check forms, posted with a valid CSRF token by every
    role × team: only admins change anything (policy drafts: admins and auditors, as the API); malformed and
    oversized input is a 4xx page naming the problem, never a 5xx."""
    forms = {  # path → (form, roles that may post it)
        "/console/budgets": ({"scope": "team", "scope_id": "red", "amount": "1000000"}, {"admin"}),
        "/console/limits": ({"scope": "team", "ref": "red", "rpm": "1000000"}, {"admin"}),
        "/console/deployments": ({"alias": "console-{cell}", "provider": "openai_compatible", "model": "m",
                                  "base_url": world.cloud}, {"admin"}),
        "/console/deployments/edit": ({"id": "console-{cell}/openai_compatible/m", "weight": "2"}, {"admin"}),
        "/console/policy/check": ({"draft": POLICY}, GOV_READERS),
        "/console/policy/activate": ({"draft": POLICY}, {"admin"}),  # the active text again: no change
    }
    periods = dict(zip(RELATIONS, ("month", "day", "total")))
    with world.srv.admin() as admin:  # budgets earlier rows made (one per scope and period): the cells make their own
        for b in admin.get("/admin/budgets").json()["data"]:
            assert admin.delete(f"/admin/budgets/{b['id']}").status_code == 204
    wrong = []
    for role in ROLES:
        for rel, team in RELATIONS.items():
            c = _console(world, world.keys.keys[(role, team)])
            csrf = c.get("/console/overview").text.split('name="csrf" value="', 1)[1].split('"', 1)[0]
            for path, (form, allowed) in forms.items():
                data = {k: v.replace("{cell}", f"{role}-{rel}") for k, v in form.items()}
                if path == "/console/budgets":
                    data["period"] = periods[rel]
                got = c.post(path, data={**data, "csrf": csrf}).status_code
                if (got < 300) != (role in allowed) or (role not in allowed and got != 403):
                    wrong.append(f"{role}/{rel} POST {path}: got {got}")
            c.close()
    with world.srv.admin() as admin:  # undo what the admins' cells made
        for b in admin.get("/admin/budgets").json()["data"]:
            assert admin.delete(f"/admin/budgets/{b['id']}").status_code == 204
        assert admin.delete("/admin/limits/teams/red").status_code == 204
        for d in admin.get("/admin/deployments").json()["data"]:
            if d["alias"].startswith("console-"):
                assert admin.delete(f"/admin/deployments/{d['id']}").status_code == 204
    c = _console(world, world.srv.admin_key)
    csrf = c.get("/console/overview").text.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    bad = [  # (path, form, status)
        ("/console/budgets", {"scope": "team", "scope_id": "red", "amount": "lots"}, 422),
        ("/console/budgets", {"scope": "team", "scope_id": "red", "amount": "1e999"}, 422),
        ("/console/budgets", {"scope": "planet", "scope_id": "red", "amount": "5"}, 422),
        ("/console/budgets", {"scope": "team", "scope_id": "x" * 100_000, "amount": "5"}, 422),
        ("/console/budgets", {"scope": "team", "scope_id": "no-such-team", "amount": "5"}, 404),
        ("/console/budgets/budget_nope", {"amount": "5"}, 404),
        ("/console/budgets/budget_nope", {}, 422),
        ("/console/budgets/budget_nope/delete", {}, 404),
        ("/console/limits", {"scope": "team", "ref": "red", "rpm": "-1"}, 422),
        ("/console/limits", {"scope": "team", "ref": "red"}, 422),
        ("/console/limits", {"scope": "deployment", "ref": "red", "rpm": "5"}, 422),
        ("/console/limits/delete", {"scope": "team", "ref": "red"}, 404),
        ("/console/limits/delete", {"scope": "team", "ref": "x" * 100_000}, 404),
        ("/console/limits/delete", {"scope": "key", "ref": "sk-keel-nope"}, 404),
        ("/console/deployments", {"alias": "x", "provider": "openai_compatible", "timeout_s": "0",
                                  "input_price_per_1m": "-3"}, 422),
        ("/console/deployments", {"alias": "y" * 100_000, "provider": "openai_compatible"}, 422),
        ("/console/deployments/delete", {"id": "fake/none/none"}, 404),
        ("/console/deployments/edit", {"id": "fake/none/none", "weight": "2"}, 404),
        ("/console/deployments/edit", {"id": "fake/none/none", "api_key": "sk-x"}, 404),
        ("/console/policy/check", {"draft": "classifications: 5\n"}, 400),
        ("/console/policy/check", {"draft": "x" * 300_000}, 400),
        ("/console/policy/activate", {"draft": "classifications: 5\n"}, 400),
        ("/console/policy/activate", {"draft": "x" * 300_000}, 400),
    ]
    for path, form, status in bad:
        got = c.post(path, data={**form, "csrf": csrf}).status_code
        if got != status:
            wrong.append(f"admin POST {path} {str(form)[:80]}: want {status}, got {got}")
    for query in ("version=abc", "version=0", "diff=99999", f"version={2**40}"):
        got = c.get(f"/console/policy?{query}").status_code
        if got not in (400, 404):
            wrong.append(f"admin GET /console/policy?{query}: got {got}")
    c.close()
    assert not wrong, "\n".join(wrong)
