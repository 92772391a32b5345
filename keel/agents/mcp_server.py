"""Keel's governed tools for MCP clients (desktop and IDE assistants) at `/mcp`: `search`, `answer`,
`start_workflow` and `run_agent`, served with the `mcp` SDK's server over streamable HTTP.

Every request carries a Keel API key (`Authorization: Bearer …`), checked exactly as the API checks it: no key or
a bad one is a 401 problem before MCP sees the request. Each tool runs as that key's principal through the same
service functions as `/v1/search`, `/v1/answer`, `/v1/workflows/{name}/runs` and `/v1/agents/{name}/runs`, so
every permission rule (collections' ACLs and classifications, the key's collection and agent scopes, teams'
workflows and agents), guard, ledger row and audit event applies. Stateless (no MCP session kept), so any
replica answers any request.

Example (a desktop assistant's config): `{"url": "http://keel:8080/mcp", "headers": {"Authorization": "Bearer sk-keel-…"}}`.
"""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack
from typing import Annotated, Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings
from mcp.shared.exceptions import MCPError
from mcp.types import INVALID_PARAMS
from pydantic import Field
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from keel import __version__
from keel.core.errors import KeelError, MethodNotAllowed
from keel.core.http import problem_response
from keel.core.ids import new_id
from keel.core.logs import request_id_var
from keel.identity.auth import principal
from keel.identity.principal import Principal

log = logging.getLogger("keel.agents.mcp")
PATH = "/mcp"
INSTRUCTIONS = ("Keel: search and ask your company's knowledge (with citations), start workflows and run agents. "
                "Everything runs with your API key's permissions and is audited.")


def _caller(ctx: Context) -> Principal:
    """The principal the `/mcp` endpoint authenticated for this request."""
    p = getattr(getattr(ctx.request_context.request, "state", None), "principal", None)
    if not isinstance(p, Principal):
        raise ToolError("no authenticated caller")
    return p


def _refused(exc: KeelError) -> ToolError:
    """A Keel error as the tool's error text: its stable code, what happened and the fix."""
    return ToolError(f"{exc.code}: {exc.detail}" + (f" (fix: {exc.fix})" if exc.fix else ""))


class KeelMcp:
    """The MCP server and the ASGI endpoint that authenticates each request before handing it to the SDK."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.server: MCPServer = MCPServer("keel", instructions=INSTRUCTIONS, version=__version__)
        self._tools()
        self.server.middleware.append(_no_prompts)
        # the bearer key, not the Host header, is what protects /mcp: no ambient credential for a rebinding to use
        self.server.streamable_http_app(stateless_http=True, json_response=True, host="0.0.0.0",
                                        transport_security=TransportSecuritySettings(
                                            enable_dns_rebinding_protection=False))
        self.manager = self.server.session_manager
        self._stack = AsyncExitStack()

    async def start(self) -> None:
        await self._stack.enter_async_context(self.manager.run())

    async def stop(self) -> None:
        await self._stack.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        try:
            await principal(request)  # 401 without a valid key; the principal waits in the request's state
            if scope["method"] != "POST":  # stateless: no stream to open (GET) and no session to end (DELETE)
                raise MethodNotAllowed(f"{scope['method']} {PATH}: Keel's MCP endpoint is stateless and answers "
                                       "POSTed JSON-RPC only", fix=f"POST MCP requests to {PATH}")
        except KeelError as exc:
            await problem_response(exc)(scope, receive, send)
            return
        await self.manager.handle_request(scope, receive, send)

    # -- the tools --------------------------------------------------------------------------------
    def _tools(self) -> None:
        state = self.app.state
        tool = self.server.tool

        @tool()
        async def search(ctx: Context, query: Annotated[str, Field(min_length=1, max_length=4000)],
                         collections: Annotated[list[str] | None, Field(max_length=50)] = None,
                         top_k: Annotated[int, Field(ge=1, le=50)] = 5) -> dict[str, Any]:
            """Search the knowledge collections you may read; returns the best passages with their sources."""
            from keel.knowledge.search import Query, search as run_search

            try:
                hits, _ = await run_search(state.knowledge, _caller(ctx),
                                           Query(text=query, collections=collections, top_k=top_k), _rid())
            except KeelError as exc:
                raise _refused(exc) from None
            return {"hits": [h.public() for h in hits]}

        @tool()
        async def answer(ctx: Context, question: Annotated[str, Field(min_length=1, max_length=4000)],
                         collections: Annotated[list[str] | None, Field(max_length=50)] = None,
                         model: Annotated[str | None, Field(max_length=200)] = None) -> dict[str, Any]:
            """Answer a question from the knowledge collections you may read, citing the passages it used."""
            from keel.knowledge import answer as answers

            kn = state.knowledge
            req = answers.AnswerRequest(question=question, collections=collections,
                                        model=model or kn.config.answer_model)
            try:
                return await answers.answer(kn, _caller(ctx), req, _rid())
            except KeelError as exc:
                raise _refused(exc) from None

        @tool()
        async def start_workflow(ctx: Context, name: Annotated[str, Field(min_length=1, max_length=100)],
                                 inputs: dict[str, Any] | None = None) -> dict[str, Any]:
            """Start a run of a workflow you may run; returns the run (poll it in Keel for its status)."""
            try:
                return await state.workflows.start(name, inputs or {}, _caller(ctx), trigger="mcp")
            except KeelError as exc:
                raise _refused(exc) from None

        @tool()
        async def run_agent(ctx: Context, name: Annotated[str, Field(min_length=1, max_length=100)],
                            task: Annotated[str, Field(min_length=1, max_length=20000)],
                            wait_s: Annotated[float, Field(ge=0, le=300)] = 60) -> dict[str, Any]:
            """Run an agent you may use on a task, within its mandate; returns its answer and status (a run that
            waits for a person's approval is returned as waiting)."""
            try:
                out = await state.agents.start(name, task, _caller(ctx), wait_s=wait_s)
            except KeelError as exc:
                raise _refused(exc) from None
            return {k: out.get(k) for k in ("id", "agent", "version", "status", "answer", "error")}


async def _no_prompts(ctx: Any, call_next: Any) -> Any:
    """Keel serves no MCP prompts: `prompts/get` names an unknown prompt, answered as INVALID_PARAMS with one log
    line (the SDK would log a traceback at error level for it, which any key holder could repeat at will)."""
    if ctx.method == "prompts/get":
        name = str((ctx.params or {}).get("name"))[:100]
        log.info("mcp prompts/get: unknown prompt %r", name)
        raise MCPError(code=INVALID_PARAMS, message=f"Unknown prompt: {name}")
    return await call_next(ctx)


def _rid() -> str:
    return request_id_var.get() or new_id("req")


def mount(app: Any) -> KeelMcp:
    """Serve Keel's tools at `/mcp` in `app` (after knowledge, workflows and agents are attached)."""
    mcp = KeelMcp(app)
    app.add_route(PATH, mcp, include_in_schema=False)
    app.state.lifecycle.startup.append(mcp.start)
    app.state.lifecycle.shutdown.append(mcp.stop)
    return mcp
