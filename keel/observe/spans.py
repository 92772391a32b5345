"""Wrappers that put Keel's parts into the request's span tree, each used only when tracing is on:

    POST /v1/chat/completions          server span (`TraceRequests`; continues the caller's traceparent)
    ├── auth                            (`TracedAuthenticator`)
    └── chat <alias>                    the gateway's call span: GenAI attributes, usage, content if allowed
        └── rate_limiter › policy › guard › budgets › cache › router   one span per stage (`traced_step`)
            │                └── guard pii / secrets / injection      (`TracedGuard`, one per scan)
            └── chat <model>            one client span per router attempt: the provider call (`TracedUpstream`)

They wrap instead of flagging: with tracing off the app factory never builds them, so they cost nothing.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from keel.observe.tracing import PROPAGATOR, activate, fail, span

_TRACE_HEADERS = {b"traceparent": "traceparent", b"tracestate": "tracestate"}


class TraceRequests:
    """Pure ASGI middleware, outermost: one server span per HTTP request, the child of the caller's
    W3C `traceparent` when it sent one (a malformed one is ignored, and a new trace starts)."""

    def __init__(self, app: ASGIApp, tracer: trace.Tracer, stages: bool = True) -> None:
        self.app = app
        self.tracer = tracer
        self.stages = stages  # stage, guard and auth spans inside (`trace_detail: stages`)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        carrier = {}
        for k, v in scope["headers"]:
            name = _TRACE_HEADERS.get(k)
            if name is not None:
                carrier[name] = v.decode("latin-1")
        parent = PROPAGATOR.extract(carrier) if carrier else otel_context.Context()
        method = scope["method"]
        s = self.tracer.start_span(f"{method} {scope['path']}", context=parent, kind=trace.SpanKind.SERVER,
                                   attributes={"http.request.method": method, "url.path": scope["path"]})
        if not s.is_recording():  # sampled out: current, so what runs inside makes no span either
            with activate(s, self.tracer, self.stages):
                await self.app(scope, receive, send)
            return
        status = 0

        async def traced_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                for k, v in message.get("headers", ()):
                    if k == b"x-request-id":
                        s.set_attribute("keel.request_id", v.decode("latin-1"))
            await send(message)

        try:
            with activate(s, self.tracer, self.stages):
                await self.app(scope, receive, traced_send)
        except BaseException as exc:
            fail(s, exc)
            raise
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None)
            if path:
                s.set_attribute("http.route", path)
                s.update_name(f"{method} {path}")
            if status:
                s.set_attribute("http.response.status_code", status)
                if status >= 500:
                    s.set_status(trace.Status(trace.StatusCode.ERROR, str(status)))
            s.end()


class TracedAuthenticator:
    """The authenticator with each key check as an `auth` span (the principal's role and team on it)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def authenticate(self, key: str) -> Any:
        with span("auth", stage=True) as s:
            p = await self.inner.authenticate(key)
            if s is not None:
                s.set_attribute("keel.key_id", p.key_id)
                s.set_attribute("keel.role", p.role)
                if p.team_id:
                    s.set_attribute("keel.team_id", p.team_id)
            return p

    def invalidate(self) -> None:
        self.inner.invalidate()

    async def refresh(self) -> None:
        await self.inner.refresh()

    async def close(self) -> None:
        await self.inner.close()


_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")


def stage_name(stage: object) -> str:
    """A stage's span name: its `trace_name`, else its class name in snake case without `Stage`."""
    name = getattr(stage, "trace_name", None)
    if isinstance(name, str):
        return name
    cls = type(stage).__name__
    return _CAMEL.sub("_", cls.removesuffix("Stage") or cls).lower()


def traced_step(name: str, nxt: Callable[[Any], Awaitable[Any]]) -> Callable[[Any], Awaitable[Any]]:
    """`nxt` (a stage with everything after it) inside a span `name`."""

    async def run(call: Any) -> Any:
        with span(name, stage=True):
            return await nxt(call)

    return run


class TracedUpstream:
    """The router's upstream with each attempt as a client span carrying the GenAI semantic conventions
    (`gen_ai.system`, request and response model, token usage, finish reasons) and the deployment."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.deployments = inner.deployments

    def resolve(self, call: Any) -> Any:
        return self.inner.resolve(call)

    def check_capabilities(self, call: Any, cfg: Any, prov: Any) -> None:
        self.inner.check_capabilities(call, cfg, prov)

    async def invoke(self, call: Any, cfg: Any) -> Any:
        if not trace.get_current_span().is_recording():  # an untraced or sampled-out call
            return await self.inner.invoke(call, cfg)
        op = "chat" if call.kind == "chat" else "embeddings"
        model = cfg.model or cfg.alias
        attrs: dict[str, Any] = {"gen_ai.operation.name": op, "gen_ai.system": cfg.provider,
                                 "gen_ai.request.model": model, "keel.deployment": cfg.deployment_id()}
        n = call.annotations.get("trace_attempt", 0) + 1
        call.annotations["trace_attempt"] = n
        attrs["keel.attempt"] = n
        with span(f"{op} {model}", attrs, kind=trace.SpanKind.CLIENT) as s:
            result = await self.inner.invoke(call, cfg)
            if s is not None:
                usage = getattr(result, "usage", None)
                if usage is not None:
                    s.set_attribute("gen_ai.usage.input_tokens", usage.prompt_tokens)
                    s.set_attribute("gen_ai.usage.output_tokens", usage.completion_tokens)
                elif isinstance(getattr(result, "prompt_tokens", None), int):
                    s.set_attribute("gen_ai.usage.input_tokens", result.prompt_tokens)
                finish = getattr(result, "finish_reason", None)
                if isinstance(finish, str):
                    s.set_attribute("gen_ai.response.finish_reasons", [finish])
                s.set_attribute("gen_ai.response.model", getattr(result, "model", "") or model)
            return result


class TracedGuard:
    """A guard whose every scan is a `guard <name>` span with the number of findings (never their text)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = inner.name

    def scan(self, text: str) -> Any:
        with span(f"guard {self.name}", {"keel.guard": self.name}, stage=True) as s:
            findings = self.inner.scan(text)
            if s is not None:
                s.set_attribute("keel.guard.findings", len(findings))
            return findings

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.inner, attr)
