"""The built-in tools and endpoint tools, run only after the mandate allowed the call (`policy.py`).

Each runs inside one DBOS step; a side effect carries the idempotency key run id + position, so the one
repeat a crash between the effect and its checkpoint may cause is dropped (by Keel's own effect table, or by
the receiving service for `http` and endpoint tools).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from keel.agents import plugins
from keel.agents.mandate import Mandate, ToolSpec
from keel.agents.store import AgentStore
from keel.identity.principal import Principal
from keel.workflows.effects import Egress

RESULT_CHARS = 4000  # what the model sees of a tool's result


@dataclass(frozen=True)
class ToolParts:
    """The services tools use, built once by the engine."""

    store: AgentStore
    knowledge: Any  # keel.knowledge's service
    vault: Any  # keel.identity.vault.Vault
    egress: Egress
    mcp: Any = None  # keel.agents.mcp_client.McpClients
    workflows: Any = None  # keel.workflows' service, for start_workflow


@dataclass(frozen=True)
class ToolCall:
    """One allowed call, with what it may touch: the run's principal and team, the mandate's owner team."""

    run_id: str
    seq: int
    agent: str
    team_id: str | None
    owner_team: str | None
    principal: Principal
    mandate: Mandate
    tool: ToolSpec
    args: dict[str, Any]
    user_id: str | None = None  # the end user the run is for

    @property
    def idempotency_key(self) -> str:
        return f"{self.run_id}.{self.seq}"


def as_text(result: Any) -> str:
    text = result if isinstance(result, str) else json.dumps(result, ensure_ascii=False, default=str)
    return text if len(text) <= RESULT_CHARS else text[:RESULT_CHARS] + " …(truncated)"


def _headers(parts: ToolParts, c: ToolCall) -> dict[str, str]:
    """Secret headers, read from the vault now: only secrets the mandate's team may use as headers."""
    return {h: parts.vault.resolve(secret, c.owner_team, "http_header") for h, secret in c.tool.headers.items()}


async def run_retrieve(parts: ToolParts, c: ToolCall) -> Any:
    from keel.knowledge.search import Query, search

    q = Query(text=c.args["query"], collections=list(c.args.get("collections") or c.mandate.collections),
              top_k=int(c.args.get("top_k") or 5))
    hits, _ = await search(parts.knowledge, c.principal, q, f"{c.run_id}/{c.seq}")
    return {"hits": [{"title": h.title, "section": h.section, "text": h.text[:1000]} for h in hits]}


async def run_http(parts: ToolParts, c: ToolCall) -> Any:
    headers = await asyncio.to_thread(_headers, parts, c)
    out = await parts.egress.request(c.args.get("method", "GET"), c.args["url"], headers=headers,
                                     body=c.args.get("body"), allow_hosts=c.tool.allow_hosts,
                                     idempotency_key=c.idempotency_key)
    return {"status": out["status"], "body": out["body"]}


async def run_endpoint(parts: ToolParts, c: ToolCall) -> Any:
    """POST the arguments as JSON to the tool's endpoint (its host:port is the only host allowed)."""
    endpoint = str(c.tool.endpoint)
    split = urlsplit(endpoint)
    port = split.port or (443 if split.scheme == "https" else 80)
    headers = await asyncio.to_thread(_headers, parts, c)
    out = await parts.egress.request("POST", endpoint, headers=headers, body=c.args,
                                     allow_hosts=[f"{split.hostname}:{port}"], idempotency_key=c.idempotency_key)
    return {"status": out["status"], "body": out["body"]}


async def run_record(parts: ToolParts, c: ToolCall) -> Any:
    row = {"idempotency_key": c.idempotency_key, "run_id": c.run_id, "agent": c.agent, "team_id": c.team_id,
           "kind": "record", "target": c.args["table"], "data": {"key": c.args.get("key"), "data": c.args["data"]}}
    return {"id": await asyncio.to_thread(parts.store.effect, row), "table": c.args["table"]}


async def run_notify(parts: ToolParts, c: ToolCall) -> Any:
    row = {"idempotency_key": c.idempotency_key, "run_id": c.run_id, "agent": c.agent, "team_id": c.team_id,
           "kind": "notify", "target": c.args["to"],
           "data": {"subject": c.args["subject"], "body": c.args.get("body", "")}}
    await asyncio.to_thread(parts.store.effect, row)
    return {"to": c.args["to"], "status": "outbox"}


async def run_python(parts: ToolParts, c: ToolCall) -> Any:
    """A `keel.tools` entry point's tool, with the checked arguments and what it may know of the run."""
    tool = plugins.get(str(c.tool.entry_point))
    return await tool.call(dict(c.args), {"run_id": c.run_id, "agent": c.agent, "team_id": c.team_id,
                                          "idempotency_key": c.idempotency_key})


def mcp_headers(parts: ToolParts, owner_team: str | None) -> Any:
    """An MCP server's secret headers, read from the vault now (only secrets the team may send as headers)."""
    return lambda server: {h: parts.vault.resolve(secret, owner_team, "http_header")
                           for h, secret in server.headers.items()}


async def run_mcp(parts: ToolParts, c: ToolCall) -> Any:
    """A tool of an MCP server (`mcp_client.py`), called with the checked arguments."""
    server = c.mandate.mcp_servers[str(c.tool.mcp_server)]
    headers = await asyncio.to_thread(mcp_headers(parts, c.owner_team), server)
    return await parts.mcp.call(server, str(c.tool.remote), dict(c.args), headers)


async def run_answer(parts: ToolParts, c: ToolCall) -> Any:
    """An answer with citations through the governed path of `/v1/answer`, as the run's principal, over the
    mandate's collections (the policy check refused any other)."""
    from keel.knowledge.answer import AnswerRequest, answer

    req = AnswerRequest(question=c.args["question"], collections=list(c.args.get("collections") or c.mandate.collections),
                        model=c.mandate.model, max_tokens=min(256, c.mandate.budgets.max_tokens_per_call))
    out = await answer(parts.knowledge, c.principal, req, f"{c.run_id}/{c.seq}")
    return {"answer": out["answer"], "found": out["found"],
            "citations": [{"n": x["n"], "title": x["title"], "section": x["section"], "collection": x["collection"],
                           "cited": x["cited"]} for x in out["citations"]]}


async def run_start_workflow(parts: ToolParts, c: ToolCall) -> Any:
    """Start a workflow the mandate names, as the run's principal (its permissions and team); the workflow run's
    id is derived from the agent run and position, so a replayed step starts it once. It starts as a run of its
    own (in a fresh context: DBOS starts no workflow from inside a step), not as a child of the agent's loop."""
    start = parts.workflows.start(c.args["workflow"], c.args.get("inputs") or {}, c.principal, trigger="agent",
                                  run_id=f"{c.run_id}.wf{c.seq}")
    out = await asyncio.get_running_loop().create_task(start, context=contextvars.Context())
    return {"workflow": out["workflow"], "run_id": out["id"], "status": out["status"]}


async def run_remember(parts: ToolParts, c: ToolCall) -> Any:
    row = {"idempotency_key": c.idempotency_key, "agent": c.agent, "team_id": c.team_id, "run_id": c.run_id,
           "user_id": c.user_id, "text": c.args["note"]}
    return {"remembered": await asyncio.to_thread(parts.store.add_note, row)}


async def run_recall(parts: ToolParts, c: ToolCall) -> Any:
    """Notes of this agent AND this team only (and of this run's end user, never another's), best matches first."""
    return {"notes": await asyncio.to_thread(parts.store.recall, c.agent, c.team_id, c.args["query"],
                                             user_id=c.user_id)}


EXECUTORS = {"retrieve": run_retrieve, "http": run_http, "endpoint": run_endpoint, "record": run_record,
             "notify": run_notify, "python": run_python, "mcp": run_mcp,
             "answer": run_answer, "start_workflow": run_start_workflow, "remember": run_remember,
             "recall": run_recall}
