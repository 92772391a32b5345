"""The OpenAI-compatible API (`/v1/chat/completions`, `/v1/embeddings`, `/v1/models`) and
`/admin/deployments`."""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Depends, Request, Response
from starlette.concurrency import run_in_threadpool

from keel.core.errors import BadRequest, KeelError, MalformedJSON, NotFound, NotSupported
from keel.core.http import (
    SEND_NOW, HotEndpoint, JSONAnswer, StreamedResponse, hot_json_endpoint, json_response,
)
from keel.core.logs import request_id_var
from keel.gateway import control_routes
from keel.gateway.admission import prompt_tokens
from keel.gateway.cache import router as cache_router
from keel.gateway.limits import RATE_LIMITS, rate_headers
from keel.gateway.pipeline import PROMPT_VERSION, Call, Gateway
from keel.gateway.protocol import ChatDelta, ChatRequest, ChatResult, Usage
from keel.gateway.schemas import ChatCompletionBody, EmbeddingsBody, fast_chat_body
from keel.identity.auth import admin, principal
from keel.identity.principal import Principal
from keel.observe.prices import DEFAULT as DEFAULT_PRICES

router = APIRouter()
_NOT_FORWARDED = {"metadata", "keel", "stream_options"}


def _gateway(request: Request) -> Gateway:
    return request.app.state.gateway


def _headers(call: Call, usage: Usage | None = None) -> dict[str, str]:
    """Keel's answer headers: overhead, deployment, cache, `x-keel-cost` (dollars for `usage`; a stream's,
    sent before its usage is known, is its upper bound and says so) and the caller's `x-ratelimit-*`."""
    total = (time.perf_counter() - call.started) * 1000
    h = {"x-keel-overhead-ms": f"{max(total - call.upstream_ms, 0.0):.3f}"}
    if call.deployment is not None:
        h["x-keel-deployment"] = call.deployment.deployment_id()
    if call.cache_hit:
        h["x-keel-cache"] = "hit"
        h["x-keel-cost"] = "0"
    elif usage is not None:
        h["x-keel-cost"] = usd(call.cost(usage))
    elif call.stream:
        h["x-keel-cost"] = usd(stream_cost_bound(call))
        h["x-keel-cost-estimated"] = "upper-bound"
    taken = call.annotations.get(RATE_LIMITS)
    if taken:
        h.update(rate_headers(taken, time.time()))
    return h


def usd(dollars: float) -> str:
    """Dollars in plain decimal notation, to the nano-dollar (no exponent for a header parser to meet)."""
    return f"{dollars:.9f}".rstrip("0").rstrip(".") or "0"


def stream_cost_bound(call: Call) -> float:
    """A stream's most cost, known before its first byte: the prompt as the provider counts it plus
    `max_tokens` (the prompt alone without one), at the deployment's prices."""
    cfg, req = call.deployment, call.chat
    if cfg is None or req is None or not DEFAULT_PRICES.priced(cfg):
        return 0.0
    return call.cost(Usage(prompt_tokens=prompt_tokens(call, call.provider), completion_tokens=req.max_tokens or 0))


def chat_body(body: ChatCompletionBody | dict[str, Any]) -> dict[str, Any]:
    """The validated request as JSON: the fields the client set, None values left out (top level and
    messages), as `fast_chat_body` gives it."""
    if isinstance(body, dict):
        return body
    return body.model_dump(exclude_unset=True, exclude_none=True)


def chat_request(data: dict[str, Any]) -> ChatRequest:
    raw = {k: v for k, v in data.items() if k not in _NOT_FORWARDED}
    stop, keel = data.get("stop"), data.get("keel")
    return ChatRequest(
        model=data["model"], messages=raw["messages"],
        max_tokens=data.get("max_tokens") or data.get("max_completion_tokens"), temperature=data.get("temperature"),
        top_p=data.get("top_p"), stop=[stop] if isinstance(stop, str) else stop, seed=data.get("seed"),
        tools=data.get("tools"), tool_choice=data.get("tool_choice"), response_format=data.get("response_format"),
        stream=bool(data.get("stream")), include_usage=bool((data.get("stream_options") or {}).get("include_usage")),
        body={**raw, "keel": keel} if keel else raw)


def completion_json(call: Call, result: ChatResult) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": result.content}
    if result.tool_calls:
        message["tool_calls"] = result.tool_calls
    u = result.usage
    return {
        "id": f"chatcmpl-{call.request_id}", "object": "chat.completion", "created": int(time.time()),
        "model": call.alias, "system_fingerprint": None,
        "choices": [{"index": 0, "message": message, "finish_reason": result.finish_reason, "logprobs": None}],
        "usage": {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                  "total_tokens": u.total_tokens},
    }


def _completion(call: Call, result: ChatResult) -> JSONAnswer:
    return JSONAnswer(orjson.dumps(completion_json(call, result)), _headers(call, result.usage))


def _chunk(call: Call, created: int, delta: ChatDelta) -> bytes:
    d: dict[str, Any] = {}
    if delta.role:
        d["role"] = delta.role
    if delta.content is not None:
        d["content"] = delta.content
    if delta.tool_calls:
        d["tool_calls"] = delta.tool_calls
    body = {"id": f"chatcmpl-{call.request_id}", "object": "chat.completion.chunk", "created": created,
            "model": call.alias, "choices": [{"index": 0, "delta": d, "finish_reason": delta.finish_reason}]}
    return b"data: " + orjson.dumps(body) + b"\n\n"


def _usage_chunk(call: Call, created: int) -> bytes:
    u = call.usage
    body = {"id": f"chatcmpl-{call.request_id}", "object": "chat.completion.chunk", "created": created,
            "model": call.alias, "choices": [],
            "usage": {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                      "total_tokens": u.total_tokens}}
    return b"data: " + orjson.dumps(body) + b"\n\n"


def _shown(delta: ChatDelta) -> bool:
    return delta.content is not None or bool(delta.role or delta.tool_calls or delta.finish_reason)


async def _sse(call: Call, stream: AsyncIterator[ChatDelta], first: ChatDelta | None) -> AsyncIterator[bytes]:
    """OpenAI SSE framing; an error after the first byte becomes an `error` event, then the stream ends.
    Deltas marked `more` (the next one is already here) go out in one write with the ones after them."""
    created = int(time.time())
    out: list[bytes] = []
    try:
        if first is not None:
            if _shown(first):
                out.append(_chunk(call, created, first))
            if not first.more and out:
                yield b"".join(out)
                out.clear()
        async for delta in stream:
            if _shown(delta):
                out.append(_chunk(call, created, delta))
            if not delta.more and out:
                yield b"".join(out)
                out.clear()
        if call.chat is not None and call.chat.include_usage:
            out.append(_usage_chunk(call, created))
        out.append(b"data: [DONE]\n\n")
    except KeelError as exc:
        out.append(b"data: " + orjson.dumps(exc.to_problem(call.request_id)) + b"\n\n")
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
    yield b"".join(out)


@router.post("/v1/chat/completions", tags=["gateway"])
async def chat_completions(body: ChatCompletionBody, request: Request,
                           p: Principal = Depends(principal)) -> Response:
    """OpenAI-compatible chat completions, streaming (SSE) or not, through the governed path."""
    return await _chat(chat_body(body), request, p)


async def answer_chat(gw: Gateway, call: Call, request: Request, render: Callable[[ChatResult], Response]
                      ) -> Response:
    """A non-streamed chat call's answer in the caller's shape (`render`): sent as soon as no stage may still
    change it, before the path's bookkeeping, when the server offers that (SEND_NOW); else when the call ends."""
    send_now = request.scope.get(SEND_NOW)
    sent: list[Response] = []
    if send_now is not None:
        def answer(result: ChatResult) -> None:
            sent.append(render(result))
            send_now(sent[0])

        call.answer = answer
    try:
        result = await gw.chat(call)
    finally:
        call.answer = None  # the closure refers to the call: no cycle left for the collector
    return sent[0] if sent else render(result)


async def first_delta(stream: AsyncIterator[ChatDelta]) -> ChatDelta | None:
    """A stream's first delta, awaited before the answer starts: errors before the first byte get a real status."""
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None


async def with_prompt(request: Request, p: Principal, data: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """A `keel.prompt` reference (`name@label`, `name@3`): the registry's messages, `keel.variables` filled in,
    before the caller's own; and the version used (`name@version`), for the ledger row and the span."""
    ref = (data.get("keel") or {}).get("prompt")
    if ref is None:
        return data, None
    rendered = await run_in_threadpool(request.app.state.prompts.resolve, p, ref, data["keel"].get("variables"))
    return {**data, "messages": [*rendered.messages, *data["messages"]]}, rendered.ref


async def _chat(data: dict[str, Any], request: Request, p: Principal) -> Response:
    gw = _gateway(request)
    data, prompt = await with_prompt(request, p, data) if "keel" in data else (data, None)
    call = Call(request_id=request_id_var.get() or "", principal=p, kind="chat", alias=data["model"],
                chat=chat_request(data), metadata=dict(data.get("metadata") or {}))
    if prompt is not None:
        call.annotations[PROMPT_VERSION] = prompt
    if not call.stream:
        return await answer_chat(gw, call, request, lambda result: _completion(call, result))
    stream = gw.chat_stream(call)
    first = await first_delta(stream)
    return StreamedResponse(_sse(call, stream, first), media_type="text/event-stream",
                            headers={**_headers(call), "cache-control": "no-cache"})


def _texts(body: EmbeddingsBody) -> list[str]:
    inp = body.input
    if isinstance(inp, str):
        return [inp]
    if inp and not all(isinstance(x, str) for x in inp):
        raise NotSupported("token-id input is not supported", fix="send `input` as a string or a list of strings")
    if not inp:
        raise BadRequest("`input` is empty", fix="send at least one string")
    if any(not s for s in inp):  # type: ignore[union-attr]
        raise BadRequest("`input` contains an empty string", fix="remove empty strings")
    return list(inp)  # type: ignore[arg-type]


@router.post("/v1/embeddings", tags=["gateway"])
async def embeddings(body: EmbeddingsBody, request: Request, p: Principal = Depends(principal)) -> Response:
    """OpenAI-compatible embeddings; `encoding_format: base64` gives little-endian float32."""
    call = Call(request_id=request_id_var.get() or "", principal=p, kind="embedding", alias=body.model,
                texts=_texts(body), metadata=dict(body.metadata or {}))
    result = await _gateway(request).embed(call)
    dim = len(result.vectors[0]) if result.vectors else 0
    if body.dimensions is not None and body.dimensions != dim:
        raise NotSupported(f"model {body.model!r} makes {dim}-dimensional vectors, not {body.dimensions}",
                           fix="omit `dimensions`")
    data = []
    for i, vec in enumerate(result.vectors):
        emb: Any = (base64.b64encode(np.asarray(vec, dtype="<f4").tobytes()).decode()
                    if body.encoding_format == "base64" else vec)
        data.append({"object": "embedding", "index": i, "embedding": emb})
    out = {"object": "list", "data": data, "model": body.model,
           "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}}
    return JSONAnswer(orjson.dumps(out, option=orjson.OPT_SERIALIZE_NUMPY), _headers(call, call.usage))


@router.get("/v1/models", tags=["gateway"])
async def list_models(request: Request, p: Principal = Depends(principal)) -> Response:
    """The model aliases this key may use."""
    aliases = _gateway(request).visible_aliases(p)
    data = [{"id": a, "object": "model", "created": 0, "owned_by": "keel", "kind": k} for a, k in aliases.items()]
    return json_response({"object": "list", "data": data})


@router.get("/v1/models/{alias:path}", tags=["gateway"])
async def get_model(alias: str, request: Request, p: Principal = Depends(principal)) -> Response:
    aliases = _gateway(request).visible_aliases(p)
    if alias not in aliases:
        raise NotFound(f"model {alias!r} does not exist or this key may not use it", model=alias)
    return json_response({"id": alias, "object": "model", "created": 0, "owned_by": "keel", "kind": aliases[alias]})


def hot_routes() -> dict[tuple[str, str], HotEndpoint]:
    """The two busiest endpoints, served ahead of the framework router (see `RequestContext`); the
    caller is authenticated before the body is read."""

    def chat(body: ChatCompletionBody | dict[str, Any], request: Request, p: Principal) -> Awaitable[Response]:
        return _chat(chat_body(body), request, p)

    return {("POST", "/v1/chat/completions"): hot_json_endpoint(ChatCompletionBody, chat, fast_chat_body, principal),
            ("POST", "/v1/embeddings"): hot_json_endpoint(EmbeddingsBody, embeddings, authenticate=principal)}


# -- admin: deployments -------------------------------------------------------------------------

@router.get("/admin/deployments", tags=["admin"])
async def list_deployments(request: Request, _p: Principal = Depends(admin)) -> Response:
    deps = _gateway(request).deployments
    await run_in_threadpool(deps.reload)
    return json_response({"data": deps.listing()})


def _store_api_key(request: Request, data: dict[str, Any], did_hint: str) -> dict[str, Any]:
    api_key = data.pop("api_key", None)
    if api_key:
        name = data.get("credential") or f"deployment-{did_hint}".replace("/", "-")[:190]
        request.app.state.vault.put(name, str(api_key))
        data["credential"] = name
    return data


@router.post("/admin/deployments", status_code=201, tags=["admin"])
async def add_deployment(request: Request, _p: Principal = Depends(admin)) -> Response:
    """Add a deployment without a restart. An `api_key` field is stored in the vault, never returned."""
    data = await _json_object(request)
    deps = _gateway(request).deployments
    cfg = deps.parse({k: v for k, v in data.items() if k != "api_key"})
    await run_in_threadpool(deps.check_new, cfg.deployment_id())  # a duplicate changes no stored key
    data = await run_in_threadpool(_store_api_key, request, data, cfg.deployment_id())
    return json_response(await run_in_threadpool(deps.add, deps.parse(data)), 201)


@router.put("/admin/deployments/{did:path}", tags=["admin"])
async def update_deployment(did: str, request: Request, _p: Principal = Depends(admin)) -> Response:
    data = await _json_object(request)
    deps = _gateway(request).deployments
    await run_in_threadpool(deps.check_update, did, {k: v for k, v in data.items() if k != "api_key"})  # first
    data = await run_in_threadpool(_store_api_key, request, data, did)
    return json_response(await run_in_threadpool(deps.update, did, data))


@router.delete("/admin/deployments/{did:path}", status_code=204, tags=["admin"])
async def delete_deployment(did: str, request: Request, _p: Principal = Depends(admin)) -> Response:
    await run_in_threadpool(_gateway(request).deployments.delete, did)
    return json_response(None, 204)


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        data = orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        raise MalformedJSON(f"request body is not valid JSON: {exc}", fix="send a JSON object") from None
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object", fix="send {\"alias\": …, \"provider\": …}")
    return data


router.include_router(cache_router)  # DELETE /admin/cache/{alias}
router.include_router(control_routes.router)  # /admin/limits, /admin/budgets


def answer_headers(call: Call, usage: Usage | None = None) -> dict[str, str]:
    """The headers of an answer to `call` (see `_headers`), for the other API shapes that answer chat calls."""
    return _headers(call, usage)
