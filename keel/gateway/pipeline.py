"""The one governed path every model call takes.

    identity ─► stages (policy, guards, budget, cache, …) ─► router ─► provider
                                     └─► ledger row · trace span, whatever happens

A stage is one object with one method, `handle(call, nxt)`: it may inspect or change the call,
refuse it with a KeelError, or wrap what `nxt` returns. The gateway knows no stage by name; the
app factory hands it the list, so a test can run the path bare.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from opentelemetry import trace

from keel.core.clock import utcnow
from keel.core.errors import KeelError, NotFound, NotSupported
from keel.core.logs import client_request_id_var
from keel.core.settings import DeploymentConfig
from keel.gateway.deployments import Deployments
from keel.gateway.protocol import ChatDelta, ChatRequest, ChatResult, EmbedResult, Provider, Usage
from keel.gateway.reranking import RerankRequest, RerankResult
from keel.identity.principal import Principal
from keel.observe.ledger import Ledger
from keel.observe.spans import stage_name, traced_step
from keel.observe.tracing import activate, content
from keel.observe.prices import DEFAULT as DEFAULT_PRICES

log = logging.getLogger("keel.gateway")


PROMPT_VERSION = "prompt_version"  # annotation: the registry prompt (`name@version`) the call's messages came from


@dataclass
class Call:
    """One model call on its way through the path; stages read and annotate it."""

    request_id: str
    principal: Principal
    kind: str  # "chat" | "embedding" | "rerank"
    alias: str
    chat: ChatRequest | None = None
    texts: list[str] | None = None
    rerank: RerankRequest | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    deployment: DeploymentConfig | None = None
    provider: Provider | None = None
    usage: Usage = field(default_factory=Usage)
    started: float = field(default_factory=time.perf_counter)
    ttft_ms: float | None = None
    upstream_ms: float = 0.0
    cache_hit: bool = False
    saved_cost: float = 0.0
    annotations: dict[str, Any] = field(default_factory=dict)
    # Sends a chat answer to the client as soon as no stage may still change it: straight from the
    # provider when no stage on the path holds it (before the router's and the stages' bookkeeping), else
    # once every stage that holds it returned it. Set by the HTTP layer when it can; the pipeline decides
    # when it is called (see `Stage`), and calls it at most once.
    answer: Callable[[ChatResult], None] | None = None
    holding: set[int] | None = None  # the stages that hold this call's answer (ids), see `release_answer`

    def send_answer(self, result: ChatResult) -> None:
        """Send the early answer, if it is still to be sent: at most once per call."""
        answer = self.answer
        if answer is not None:
            self.answer = None
            answer(result)

    def release_answer(self, stage: object) -> None:
        """`stage` will not change or refuse this call's answer once `nxt` returned it: the answer need not
        wait for the stage (a per-call decision of a stage whose `changes_answer` is true)."""
        if self.holding:
            self.holding.discard(id(stage))

    @property
    def stream(self) -> bool:
        return bool(self.chat and self.chat.stream)

    def cost(self, usage: Usage | None = None) -> float:
        """Dollars for the call's usage: the deployment's prices, or the default price table's."""
        d, u = self.deployment, usage or self.usage
        if d is None:
            return 0.0
        if d.input_price_per_1m or d.output_price_per_1m:
            return (u.prompt_tokens * d.input_price_per_1m + u.completion_tokens * d.output_price_per_1m) / 1e6
        return DEFAULT_PRICES.cost(d, u.prompt_tokens, u.completion_tokens, cached=u.cached_tokens)


Next = Callable[["Call"], Awaitable[Any]]


class Stage(Protocol):
    """A step on the governed path. Returns what `nxt(call)` returns (a ChatResult, an async
    iterator of ChatDelta for streams, or an EmbedResult), possibly wrapped; or raises a KeelError.

    The early answer is the pipeline's decision: a stage holds each chat answer until it returned it
    (it may change or refuse it), unless its class says `changes_answer = False` (it never does: limits,
    budgets, the cache), or it calls `call.release_answer(self)` for a call it will leave alone. A stage
    that declares nothing holds the answer, so forgetting can delay an answer but never leak one.

    A stage with background work (flushes, reloads) also has `async start()` and `async stop()`; the
    gateway runs them with the app's lifecycle, and `stop()` writes what the stage still holds while the
    store is open.
    """

    async def handle(self, call: Call, nxt: Next) -> Any: ...


def holds_answer(stage: Stage) -> bool:
    """Whether the pipeline holds the early answer around `stage` (its `changes_answer`, true if unset)."""
    return bool(getattr(stage, "changes_answer", True))


def _step(stage: Stage, nxt: Next, sends: bool) -> Next:
    """`stage` around `nxt`. A stage that may change the answer is entered as one of the call's holders;
    around the outermost one (`sends`) the held answer leaves once every holder has returned it."""
    handle = stage.handle
    if not holds_answer(stage):
        return lambda call: handle(call, nxt)
    sid = id(stage)

    def held(call: Call) -> Awaitable[Any]:
        if call.answer is None:  # a stream, an embedding, an internal call: nothing to hold
            return handle(call, nxt)
        if call.holding is None:
            call.holding = {sid}
        else:
            call.holding.add(sid)
        return _send_after(call, handle(call, nxt)) if sends else handle(call, nxt)

    return held


async def _send_after(call: Call, pending: Awaitable[Any]) -> Any:
    result = await pending
    if isinstance(result, ChatResult):
        call.send_answer(result)
    return result


ENDPOINTS = {"chat": "/v1/chat/completions", "embedding": "/v1/embeddings", "rerank": "/v1/rerank"}


def deployment_kind(call: Call) -> str:
    """The deployment kind that can serve `call`: `embedding`, `rerank`, or `chat` for every chat shape."""
    return call.kind if call.kind in ("embedding", "rerank") else "chat"


def pick_weighted(candidates: list[DeploymentConfig]) -> DeploymentConfig:
    if len(candidates) == 1:
        return candidates[0]
    return random.choices(candidates, weights=[c.weight for c in candidates])[0]


class Upstream(Protocol):
    """What the terminal step calls: the deployments behind a call's alias, and one attempt on one of them.

    `resolve(call)` gives the alias's deployments after the key's scope check (NotFound / NotSupported
    otherwise); `invoke(call, cfg)` calls `cfg`'s provider once and records it on the call; a wrapper
    (deployment rate limits) keeps the same shape and delegates the rest.

    >>> upstream = Providers(deployments)
    >>> result = await upstream.invoke(call, upstream.resolve(call)[0])
    """

    deployments: Deployments

    def resolve(self, call: Call) -> list[DeploymentConfig]: ...

    def check_capabilities(self, call: Call, cfg: DeploymentConfig, prov: Provider) -> None: ...

    async def invoke(self, call: Call, cfg: DeploymentConfig) -> Any: ...


class Terminal(Protocol):
    """The last step of the path, after every stage: the router (retries, fallbacks, breakers) or `Direct`."""

    def call(self, call: Call) -> Awaitable[Any]: ...


class Providers:
    """The `Upstream` that calls providers: resolution, capability checks and the one provider call."""

    def __init__(self, deployments: Deployments) -> None:
        self.deployments = deployments

    def resolve(self, call: Call) -> list[DeploymentConfig]:
        """The deployments behind the call's alias, after the key's scope check."""
        self.deployments.maybe_reload()
        candidates = self.deployments.for_alias(call.alias)
        if not candidates or not call.principal.may_use_model(call.alias):
            visible = ", ".join(visible_aliases(self.deployments, call.principal)) or "none"
            raise NotFound(f"model {call.alias!r} does not exist or this key may not use it",
                           fix=f"use one of: {visible}", model=call.alias)
        kinds = {c.kind for c in candidates}
        wanted = deployment_kind(call)
        if wanted not in kinds:
            have = kinds.pop()
            raise NotSupported(f"model {call.alias!r} is a {have} model, not a {wanted} model",
                               fix=f"send it to the {ENDPOINTS.get(have, '/v1/chat/completions')} endpoint, "
                                   "or pick another model", model=call.alias)
        return candidates

    @staticmethod
    def check_capabilities(call: Call, cfg: DeploymentConfig, prov: Provider) -> None:
        req = call.chat
        if req is None:
            return
        did = cfg.deployment_id()
        if req.tools and not prov.supports_tools:
            raise NotSupported(f"deployment {did} ({cfg.provider}) does not support tools",
                               fix="remove `tools`, or route to a model that supports them", deployment=did)
        rf = (req.response_format or {}).get("type")
        if rf in ("json_object", "json_schema") and not prov.supports_json_mode:
            raise NotSupported(f"deployment {did} ({cfg.provider}) does not support response_format {rf}",
                               fix="remove `response_format`, or pick another model", deployment=did)
        if req.stream and not prov.can_stream:
            raise NotSupported(f"deployment {did} cannot stream", fix="send `stream: false`", deployment=did)

    async def invoke(self, call: Call, cfg: DeploymentConfig) -> Any:
        prov = self.deployments.provider(cfg)
        call.deployment, call.provider = cfg, prov
        t0 = time.perf_counter()
        try:
            if call.kind == "embedding":
                return await prov.embed(call.texts or [])
            if call.kind == "rerank":
                if not getattr(prov, "can_rerank", False):
                    raise NotSupported(f"deployment {cfg.deployment_id()} ({cfg.provider}) cannot rerank",
                                       fix="give the deployment a provider that reranks (local_rerank, rerank)",
                                       deployment=cfg.deployment_id())
                return await prov.rerank(call.rerank)  # type: ignore[attr-defined,arg-type]
            self.check_capabilities(call, cfg, prov)
            if call.stream:
                return prov.stream(call.chat)  # type: ignore[arg-type]
            result = await prov.chat(call.chat)  # type: ignore[arg-type]
        finally:
            call.upstream_ms += (time.perf_counter() - t0) * 1000
        # With no stage holding it, a provider's answer is final (the router never retries a success): it
        # leaves here, before the router's, the deployment limit's and the stages' bookkeeping.
        if not call.holding:
            call.send_answer(result)
        return result


class Direct:
    """The terminal step without a router: one weighted choice among the alias's deployments, one attempt."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream

    async def call(self, call: Call) -> Any:
        return await self.upstream.invoke(call, pick_weighted(self.upstream.resolve(call)))


def visible_aliases(deployments: Deployments, principal: Principal) -> dict[str, str]:
    deployments.maybe_reload()
    return {a: k for a, k in sorted(deployments.aliases().items()) if principal.may_use_model(a)}


class Gateway:
    """Runs calls through the stages to its terminal step and meters every one of them.

    >>> gateway = Gateway(deployments, ledger, tracer, stages=[limiter, policy, guards, budgets, cache],
    ...                   router=Router(DeploymentLimits(Providers(deployments), limiter), settings))
    """

    def __init__(self, deployments: Deployments, ledger: Ledger, tracer: trace.Tracer, *,
                 stages: Sequence[Stage] = (), router: Terminal | None = None) -> None:
        self.deployments = deployments
        self.ledger = ledger
        self.tracer = tracer
        self.stages: list[Stage] = list(stages)
        self.router: Terminal = router if router is not None else Direct(Providers(deployments))
        self._terminal: Next = self.router.call
        self._chain_key: tuple[Stage, ...] | None = None
        self._plain: Next = self._terminal
        self._traced: Next = self._terminal

    def visible_aliases(self, principal: Principal) -> dict[str, str]:
        return visible_aliases(self.deployments, principal)

    # -- lifecycle (the app's startup and shutdown) -----------------------------------------
    async def start(self) -> None:
        """Watch the deployments, then start the stages' background work."""
        await self.deployments.start()
        for stage in self.stages:
            start = getattr(stage, "start", None)
            if start is not None:
                await start()

    async def stop(self) -> None:
        """Stop the stages' background work, last stage first, each writing what it holds; then close the
        providers. Runs before the store closes; one stage's failure does not keep the others from stopping."""
        for stage in reversed(self.stages):
            stop = getattr(stage, "stop", None)
            if stop is not None:
                try:
                    await stop()
                except Exception:
                    log.exception("stopping a stage failed", extra={"stage": type(stage).__name__})
        await self.deployments.close()

    def _chain(self, span: trace.Span | None) -> Next:
        """The stages wrapped around the terminal step, each in a span of its own when the call's `span`
        records (a sampled-out call takes the plain chain: no stage span would be kept). Built once, and again
        only if a test changed the stage list, never per request."""
        key = tuple(self.stages)
        if self._chain_key != key:
            self._chain_key = key
            self._plain = self._build(traced=False)
            self._traced = self._build(traced=type(self.tracer) is not trace.NoOpTracer)
        return self._traced if span is not None and span.is_recording() else self._plain

    def _build(self, traced: bool) -> Next:
        nxt: Next = traced_step("router", self._terminal) if traced else self._terminal
        outermost = next((s for s in self.stages if holds_answer(s)), None)
        for stage in reversed(self.stages):
            nxt = _step(stage, nxt, sends=stage is outermost)
            if traced:
                nxt = traced_step(stage_name(stage), nxt)
        return nxt

    # -- entry points ---------------------------------------------------------------------
    async def chat(self, call: Call) -> ChatResult:
        span = self._span(call)
        try:
            if span is None:
                result: ChatResult = await self._chain(span)(call)
            else:
                with activate(span, self.tracer):
                    result = await self._chain(span)(call)
        except BaseException as exc:
            self._finish(call, span, error=exc)
            raise
        call.send_answer(result)  # served without the provider (a cache hit): final now
        call.usage = result.usage
        if span is not None and span.is_recording():
            self._answer_attributes(call, span, result)
        self._finish(call, span)
        return result

    async def embed(self, call: Call) -> EmbedResult:
        result: EmbedResult = await self._tokens_in(call, lambda r: r.prompt_tokens)
        return result

    async def rerank(self, call: Call) -> RerankResult:
        """Score `call.rerank`'s documents on a reranker deployment; metered like an embedding (tokens in)."""
        result: RerankResult = await self._tokens_in(call, lambda r: r.tokens)
        return result

    async def _tokens_in(self, call: Call, tokens: Callable[[Any], int]) -> Any:
        """Run a call whose usage is its input tokens only (`tokens(result)`), under its span, and meter it."""
        span = self._span(call)
        try:
            if span is None:
                result = await self._chain(span)(call)
            else:
                with activate(span, self.tracer):
                    result = await self._chain(span)(call)
        except BaseException as exc:
            self._finish(call, span, error=exc)
            raise
        call.usage = Usage(prompt_tokens=tokens(result))
        self._finish(call, span)
        return result

    async def chat_stream(self, call: Call) -> AsyncIterator[ChatDelta]:
        """Metered stream: a row is written when it ends, fails, or the client goes away."""
        span = self._span(call)
        inner: AsyncIterator[ChatDelta] | None = None
        texts: list[str] = []
        error: BaseException | None = None
        try:
            if span is None:
                inner = await self._chain(span)(call)
            else:
                with activate(span, self.tracer):
                    inner = await self._chain(span)(call)
            async for delta in inner:
                if call.ttft_ms is None and (delta.content or delta.tool_calls):
                    call.ttft_ms = (time.perf_counter() - call.started) * 1000
                if delta.content:
                    texts.append(delta.content)
                if delta.usage is not None:
                    call.usage = delta.usage
                if delta.finish_reason is not None and span is not None:
                    span.set_attribute("gen_ai.response.finish_reasons", [delta.finish_reason])
                yield delta
        except BaseException as exc:  # GeneratorExit (client gone) and CancelledError included
            error = exc
            raise
        finally:
            if inner is not None and hasattr(inner, "aclose"):
                await inner.aclose()
            if call.usage.total_tokens == 0 and call.provider is not None and call.chat is not None:
                call.usage = self._estimate(call, "".join(texts))
            if span is not None and call.annotations.get("trace_content") and call.chat is not None \
                    and span.is_recording():  # the prompt as the guards left it; a streamed answer is not kept
                span.set_attribute("gen_ai.input.messages", content(call.chat.messages))
            self._finish(call, span, error=error)

    @staticmethod
    def _estimate(call: Call, text: str) -> Usage:
        prov = call.provider
        assert prov is not None and call.chat is not None
        prompt = prov.count_tokens(call.chat.messages)
        out = prov.count_tokens([{"role": "assistant", "content": text}]) if text else 0
        return Usage(prompt_tokens=prompt, completion_tokens=out)

    # -- metering -------------------------------------------------------------------------
    def _span(self, call: Call) -> trace.Span | None:
        """The call's span; None when tracing is off (`make_tracer` gives a NoOpTracer), so no span is made."""
        if type(self.tracer) is trace.NoOpTracer:
            return None
        parent = trace.get_current_span()
        if not parent.is_recording() and parent.get_span_context().is_valid:
            # Inside a sampled-out trace, nothing more is made: the SDK's samplers (parent-based, or by trace
            # id) would drop every span under it anyway.
            return None
        op = {"chat": "chat", "rerank": "rerank"}.get(call.kind, "embeddings")
        span = self.tracer.start_span(f"{op} {call.alias}")
        if not span.is_recording():
            return span
        span.set_attribute("gen_ai.operation.name", op)
        span.set_attribute("gen_ai.request.model", call.alias)
        span.set_attribute("keel.request_id", call.request_id)
        if PROMPT_VERSION in call.annotations:
            span.set_attribute("keel.prompt.version", call.annotations[PROMPT_VERSION])
        if call.chat is not None:
            for attr, value in (("gen_ai.request.max_tokens", call.chat.max_tokens),
                                ("gen_ai.request.temperature", call.chat.temperature)):
                if value is not None:
                    span.set_attribute(attr, value)
        return span

    @staticmethod
    def _answer_attributes(call: Call, span: trace.Span, result: ChatResult) -> None:
        """The answer's finish reason and, where the policy allows it (`trace_content`, set by its stage),
        the prompt and completion as the guards left them: redacted, never with the caller's values put back."""
        span.set_attribute("gen_ai.response.finish_reasons", [result.finish_reason])
        if call.annotations.get("trace_content") and call.chat is not None:
            span.set_attribute("gen_ai.input.messages", content(call.chat.messages))
            output = call.annotations.get("output_guarded", result.content)
            span.set_attribute("gen_ai.output.messages", content(
                [{"role": "assistant", "content": output, "finish_reason": result.finish_reason}]))

    def _finish(self, call: Call, span: trace.Span | None, error: BaseException | None = None) -> None:
        latency = (time.perf_counter() - call.started) * 1000
        if error is None:
            status, http_status, code = "ok", 200, None
        elif isinstance(error, KeelError):
            status, http_status, code = "error", error.status, error.code
        elif isinstance(error, (GeneratorExit,)) or type(error).__name__ == "CancelledError":
            status, http_status, code = "cancelled", 499, "client_disconnected"
        else:
            status, http_status, code = "error", 500, "internal_error"
        cfg = call.deployment
        meta = call.metadata or None
        self.ledger.record({
            "request_id": call.request_id, "ts": utcnow(), "key_id": call.principal.key_id,
            "team_id": call.principal.team_id, "user_id": call.principal.user_id, "kind": call.kind,
            "alias": call.alias, "deployment": cfg.deployment_id() if cfg else None,
            "provider": cfg.provider if cfg else None, "tokens_in": call.usage.prompt_tokens,
            "tokens_out": call.usage.completion_tokens, "cost": 0.0 if call.cache_hit else call.cost(),
            "latency_ms": round(latency, 3), "ttft_ms": round(call.ttft_ms, 3) if call.ttft_ms else None,
            "status": status, "http_status": http_status, "error_code": code, "stream": call.stream,
            "cache_hit": call.cache_hit, "saved_cost": call.saved_cost,
            "use_case": str(meta.get("use_case"))[:200] if meta and meta.get("use_case") else None,
            "task_id": str(meta.get("task_id"))[:200] if meta and meta.get("task_id") else None, "meta": meta,
            "client_request_id": client_request_id_var.get(),  # the HTTP client's own id, for correlation
            "prompt_version": call.annotations.get(PROMPT_VERSION),
        })
        if span is None:
            return
        if not span.is_recording():
            span.end()
            return
        if cfg is not None:
            span.set_attribute("gen_ai.system", cfg.provider)
            span.set_attribute("gen_ai.response.model", cfg.model or cfg.alias)
            span.set_attribute("keel.deployment", cfg.deployment_id())
        if call.principal.team_id:
            span.set_attribute("keel.team_id", call.principal.team_id)
        span.set_attribute("keel.cache_hit", call.cache_hit)
        span.set_attribute("gen_ai.usage.input_tokens", call.usage.prompt_tokens)
        span.set_attribute("gen_ai.usage.output_tokens", call.usage.completion_tokens)
        span.set_attribute("keel.status", status)
        if code:
            span.set_attribute("error.type", code)
            span.set_status(trace.Status(trace.StatusCode.ERROR, code))
        span.end()
