"""Tools of MCP servers, reached through the `mcp` SDK, for mandates that name them.

A mandate lists its servers (`mcp_servers`) and, as tools of kind `mcp`, which of their tools it may use. A
server is either `command: NAME`, a command line an admin allowed in the setting `mcp_commands` (a builder names
one, never writes one: no arguments, no environment of theirs, so a mandate cannot start an arbitrary process),
run over stdio with only the SDK's safe environment; or `url:`, streamable HTTP, where the URL's host and port
are the only ones allowed and the address is checked when the connection is made, as for `http` tools (never a
link-local, multicast or unspecified address; a private or loopback one only where the URL names that exact
address, or `localhost`). Its `headers` are vault secrets granted to the agent's team. The SDK's httpx2 client
carries Keel's outbound settings (`keel.core.outbound`): its CA bundle and client certificate, and the
environment's HTTP proxy unless `NO_PROXY` covers the host, asked for the checked address rather than the name.

When a run starts, each server's listing gives the JSON Schema and description of the tools the mandate names
(the model sees those); every call is then checked against the schema and the mandate's rules (`policy.py`)
before it reaches the server. Each call opens its own short session.

Example: `await McpClients({"billing": ["python", "-m", "billing_mcp"]}).tools(spec, {})`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

import httpcore2
import httpx2
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

from keel.agents.mandate import Mandate, McpServerSpec
from keel.core.errors import KeelError
from keel.core.http1 import Proxy
from keel.core.outbound import Outbound
from keel.workflows.effects import refusal

CALL_TIMEOUT_S = 60.0


class McpCommandNotAllowed(KeelError):
    """A mandate names a stdio MCP server command that no admin allowed."""

    code, status, title = "agent_mcp_command_not_allowed", 422, "MCP command not allowed"


class McpEgressDenied(KeelError):
    """An MCP server's URL leads to an address Keel may not reach."""

    code, status, title = "agent_mcp_egress_denied", 403, "MCP egress denied"


class McpUnavailable(KeelError):
    """An MCP server could not be reached, or did not answer as MCP."""

    code, status, title = "agent_mcp_unavailable", 502, "MCP server unavailable"


class McpToolFailed(KeelError):
    """An MCP server's tool answered with an error."""

    code, status, title = "agent_mcp_tool_failed", 502, "MCP tool failed"


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


async def checked_address(host: str, port: int) -> str:
    """The address to connect to for `host`, resolved here so that the address checked against Keel's egress rules
    is the one connected to; raises `McpEgressDenied` when any address the name has is forbidden."""
    name = host.lower().rstrip(".")
    literal = _ip(name)
    if literal is not None:
        addresses = [literal]
    else:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = [ipaddress.ip_address(str(i[4][0]).split("%", 1)[0]) for i in infos]
    if not addresses:
        raise McpEgressDenied(f"{name} has no address", fix="check the MCP server's url", host=name)
    for ip in addresses:
        why = refusal(ip, listed=literal is not None, loopback_only=name == "localhost")
        if why:
            raise McpEgressDenied(f"{name} resolves to {ip} ({why}); an MCP server by name must be public",
                                  fix=f"to reach an internal MCP server on purpose, put its exact address "
                                      f"({ip}) or localhost in the url", host=name)
    return str(addresses[0])


class CheckedBackend(httpcore2.AsyncNetworkBackend):
    """Connects only to addresses that pass Keel's egress rules (`checked_address`); TLS still verifies the name."""

    def __init__(self) -> None:
        self.inner = httpcore2.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                          socket_options: Iterable[Any] | None = None) -> httpcore2.AsyncNetworkStream:
        address = await checked_address(host, port)
        return await self.inner.connect_tcp(address, port, timeout, local_address, socket_options)

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Iterable[Any] | None = None) -> httpcore2.AsyncNetworkStream:
        raise McpEgressDenied("an MCP server is reached over TCP only", fix="use an http(s) url")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


class _Body(httpx2.AsyncByteStream):
    def __init__(self, stream: Any) -> None:
        self.stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for part in self.stream:
            yield part

    async def aclose(self) -> None:
        await self.stream.aclose()


class CheckedTransport(httpx2.AsyncBaseTransport):
    """An httpx2 transport on an httpcore2 pool: straight to the address `CheckedBackend` checked, or, with `proxy`
    (Keel's `Outbound.proxy_for`), through that HTTP proxy (CONNECT for https) to the address checked here first:
    the proxy is asked for that address, never the name, so it cannot resolve the name to a forbidden one."""

    def __init__(self, tls: ssl.SSLContext, proxy: Proxy | None = None) -> None:
        self.proxied = proxy is not None
        if proxy is None:
            self.pool: httpcore2.AsyncConnectionPool = httpcore2.AsyncConnectionPool(
                ssl_context=tls, network_backend=CheckedBackend(), max_connections=4)
        else:  # the proxy is the operator's (its own address is not checked); the target's is
            url, auth = proxy
            self.pool = httpcore2.AsyncHTTPProxy(str(url), ssl_context=tls, max_connections=4,
                                                 proxy_headers={"Proxy-Authorization": auth} if auth else None)

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        url, host, extensions = request.url, request.url.raw_host, dict(request.extensions)
        if self.proxied:
            name = host.decode("ascii")
            address = await checked_address(name, url.port or (443 if url.scheme == "https" else 80))
            host = (f"[{address}]" if ":" in address else address).encode("ascii")
            extensions["sni_hostname"] = name  # TLS verifies the name the URL gave
        req = httpcore2.Request(method=request.method, url=httpcore2.URL(
            scheme=url.raw_scheme, host=host, port=url.port, target=url.raw_path),
            headers=request.headers.raw, content=request.stream, extensions=extensions)
        resp = await self.pool.handle_async_request(req)
        return httpx2.Response(status_code=resp.status, headers=resp.headers, stream=_Body(resp.stream),
                               extensions=resp.extensions)

    async def aclose(self) -> None:
        await self.pool.aclose()


def _keel_error(exc: BaseException) -> KeelError | None:
    """The first KeelError inside `exc` (the SDK's task groups wrap errors in exception groups)."""
    if isinstance(exc, KeelError):
        return exc
    for inner in getattr(exc, "exceptions", ()) or ():
        if (found := _keel_error(inner)) is not None:
            return found
    cause = exc.__cause__ or exc.__context__
    return _keel_error(cause) if cause is not None and cause is not exc else None


def _describe(exc: BaseException) -> str:
    while getattr(exc, "exceptions", None):
        exc = exc.exceptions[0]  # type: ignore[attr-defined]
    return f"{type(exc).__name__}: {exc}"[:300]


class McpClients:
    """Opens MCP sessions for agent runs: stdio only for admin-allowed commands, HTTP only to checked addresses,
    with Keel's outbound settings: `outbound`'s proxy for each URL (read per session) and its TLS context, or
    `tls` (one `outbound.ssl_context()` made before)."""

    def __init__(self, commands: Mapping[str, list[str]] | None = None, *, outbound: Outbound = Outbound(),
                 tls: ssl.SSLContext | bool | None = None, timeout_s: float = CALL_TIMEOUT_S) -> None:
        self.commands = {k: list(v) for k, v in (commands or {}).items()}
        self.outbound = outbound
        if tls is None:
            tls = outbound.ssl_context("MCP servers")
        if isinstance(tls, bool):
            ctx = ssl.create_default_context()
            if not tls:
                ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            tls = ctx
        self.tls, self.timeout_s = tls, timeout_s

    # -- when a mandate is defined ----------------------------------------------------------------
    def check(self, m: Mandate) -> None:
        """Refuse a mandate whose stdio server is not an allowed command, or whose URL is a forbidden address."""
        for s in m.mcp_servers.values():
            if s.command is not None and s.command not in self.commands:
                raise McpCommandNotAllowed(
                    f"MCP server {s.name!r} of agent {m.name!r} names command {s.command!r}, which is not in the "
                    f"admin setting mcp_commands ({', '.join(sorted(self.commands)) or 'none'})",
                    fix="use an allowed command name, or ask an admin to add it to mcp_commands in keel.yaml",
                    agent=m.name, server=s.name)
            if s.url is not None:
                split = urlsplit(s.url)
                ip = _ip(split.hostname or "")
                if split.username or split.password:
                    raise McpEgressDenied(f"MCP server {s.name!r}: a url may not carry credentials",
                                          fix="send them as headers from the vault", agent=m.name, server=s.name)
                if ip is not None and (why := refusal(ip, listed=True)):
                    raise McpEgressDenied(f"MCP server {s.name!r}: {ip} is {why}", fix="use another address",
                                          agent=m.name, server=s.name)

    # -- sessions ---------------------------------------------------------------------------------
    def _client(self, s: McpServerSpec, headers: dict[str, str]) -> tuple[Client, httpx2.AsyncClient | None]:
        if s.command is not None:
            argv = self.commands.get(s.command)
            if not argv:  # checked when defined; the setting may have changed since
                raise McpCommandNotAllowed(f"MCP command {s.command!r} is no longer allowed (setting mcp_commands)",
                                           fix="ask an admin to allow it again, or change the mandate", server=s.name)
            return Client(StdioServerParameters(command=argv[0], args=argv[1:]), cache=None,
                          read_timeout_seconds=self.timeout_s), None
        transport = CheckedTransport(self.tls, self.outbound.proxy_for(str(s.url)))  # the proxy, given explicitly
        http = httpx2.AsyncClient(headers=headers, transport=transport, timeout=httpx2.Timeout(self.timeout_s),
                                  trust_env=False)
        return Client(streamable_http_client(str(s.url), http_client=http), cache=None,
                      read_timeout_seconds=self.timeout_s), http

    async def _session(self, s: McpServerSpec, headers: dict[str, str], work: Any) -> Any:
        client, http = self._client(s, headers)
        try:
            async with asyncio.timeout(self.timeout_s):
                async with client:
                    return await work(client)
        except Exception as exc:  # the SDK's errors (often exception groups) become one Keel error
            found = _keel_error(exc)
            if found is not None:
                raise found from None
            raise McpUnavailable(f"MCP server {s.name!r}: {_describe(exc)}",
                                 fix="check that the server runs and speaks MCP", server=s.name) from None
        finally:
            if http is not None:
                await http.aclose()

    async def tools(self, s: McpServerSpec, headers: dict[str, str]) -> dict[str, dict[str, Any]]:
        """The server's tools by name: `{"description", "parameters"}` (the listed JSON Schema)."""
        async def work(client: Client) -> dict[str, dict[str, Any]]:
            out, cursor = {}, None
            for _ in range(100):
                page = await client.list_tools(cursor=cursor)
                for t in page.tools:
                    d = t.model_dump(by_alias=True, mode="json", exclude_none=True)
                    out[t.name] = {"description": d.get("description") or t.name,
                                   "parameters": d.get("inputSchema") or {"type": "object"}}
                cursor = page.next_cursor
                if cursor is None:
                    break
            return out

        return await self._session(s, headers, work)

    async def call(self, s: McpServerSpec, tool: str, args: dict[str, Any], headers: dict[str, str]) -> Any:
        """Call `tool` with checked `args`: its structured content, else its text; an error result raises."""
        async def work(client: Client) -> Any:
            return (await client.call_tool(tool, args)).model_dump(by_alias=True, mode="json", exclude_none=True)

        res = await self._session(s, headers, work)
        texts = [c.get("text", "") for c in res.get("content") or [] if c.get("type") == "text"]
        if res.get("isError"):
            raise McpToolFailed(f"MCP tool {tool!r} of {s.name!r} failed: {' '.join(texts)[:500]}", server=s.name)
        if res.get("structuredContent") is not None:
            return res["structuredContent"]
        return "\n".join(texts) if texts else res.get("content")

    async def resolve(self, m: Mandate, headers: Any) -> Mandate:
        """`m` with each `mcp` tool's schema and description from its server's listing (`headers(server)` gives a
        server's secret headers); a named tool the server does not list is an error."""
        used = {t.mcp_server for t in m.tools.values() if t.kind == "mcp"}
        if not used:
            return m
        listed = {}
        for name in sorted(str(u) for u in used):
            s = m.mcp_servers[name]
            listed[name] = await self.tools(s, await asyncio.to_thread(headers, s))
        tools = dict(m.tools)
        for t in m.tools.values():
            if t.kind != "mcp":
                continue
            found = listed[str(t.mcp_server)].get(str(t.remote))
            if found is None:
                raise McpUnavailable(f"MCP server {t.mcp_server!r} has no tool {t.remote!r} (it lists "
                                     f"{', '.join(sorted(listed[str(t.mcp_server)])) or 'none'})",
                                     fix="correct the tool's `tool:` in the mandate", server=t.mcp_server)
            listed_params = found["parameters"] if isinstance(found["parameters"], dict) else {"type": "object"}
            params = {"additionalProperties": False, **listed_params}  # as endpoint tools: no unlisted argument
            try:
                Draft202012Validator.check_schema(params)
            except SchemaError as exc:
                raise McpUnavailable(f"MCP server {t.mcp_server!r} lists tool {t.remote!r} with an invalid JSON "
                                     f"Schema ({exc.message[:200]})", fix="fix the server's tool definition",
                                     server=t.mcp_server) from None
            tools[t.name] = replace(t, parameters=params, description=t.description if t.description != t.name
                                    else str(found["description"])[:1000])
        return replace(m, tools=tools)
