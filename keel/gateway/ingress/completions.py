"""OpenAI's legacy `POST /v1/completions`: a prompt (or a list of them) in, text out, streaming or not.

Each prompt is translated once into a chat call with the prompt as its user message (what a chat model
behind the alias needs), runs the one governed path like `/v1/chat/completions`, and its answer is
translated back into a `text_completion`. Options this shape has that Keel cannot honour (echo, suffix,
logprobs, best_of, n > 1, token-id prompts) are refused with a 400 naming them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import orjson
from fastapi import APIRouter, Depends, FastAPI, Request, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from keel.core.errors import BadRequest, KeelError, NotSupported
from keel.core.http import HotEndpoint, JSONAnswer, StreamedResponse, hot_json_endpoint
from keel.core.logs import request_id_var
from keel.gateway.ingress.responses_shape import as_chat_invalid
from keel.gateway.pipeline import Call, Gateway
from keel.gateway.protocol import ChatDelta, ChatResult, Usage
from keel.gateway.routes import answer_chat, answer_headers, chat_request, first_delta
from keel.gateway.schemas import (
    INT64, MAX_TOKENS, ChatCompletionBody, check_keel, check_logit_bias, check_metadata, check_stream_options,
    fast_chat_body,
)
from keel.identity.auth import principal
from keel.identity.principal import Principal

router = APIRouter()
MAX_PROMPTS = 16
# Options of the legacy shape with no chat equivalent, and the value that means "not asked for".
UNSUPPORTED = {"echo": (False,), "suffix": ("",), "logprobs": (), "best_of": (1,), "n": (1,)}
PASSED = ("max_tokens", "temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "logit_bias",
          "user", "stream", "stream_options", "metadata", "keel")


class CompletionsBody(BaseModel):
    """`POST /v1/completions`: `prompt` is a string or a list of strings (one completion each)."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1, max_length=256)
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-INT64, lt=INT64)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, Any] | None = None
    user: str | None = None
    stream: bool | None = None
    stream_options: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    keel: dict[str, Any] | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v: Any) -> Any:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("stop may hold at most 4 sequences")
        return v

    @field_validator("logit_bias", "stream_options", "metadata", "keel", mode="before")
    @classmethod
    def _checked(cls, v: Any, info: Any) -> Any:
        {"logit_bias": check_logit_bias, "stream_options": check_stream_options, "metadata": check_metadata,
         "keel": check_keel}[info.field_name](v)
        return v


def prompts(body: CompletionsBody) -> list[str]:
    """The prompts, after refusing what Keel does not serve (token ids, unknown or unsupported options)."""
    extra = {k: v for k, v in (body.model_extra or {}).items() if v is not None}
    for name, neutral in UNSUPPORTED.items():
        if name in extra and extra.pop(name) not in neutral:
            raise NotSupported(f"`{name}` is not supported by Keel's /v1/completions", field=name,
                               fix=f"omit `{name}`" + (" (one completion per prompt)" if name in ("n", "best_of") else ""))
    if extra:
        names = ", ".join(f"`{k}`" for k in sorted(extra))
        raise NotSupported(f"unknown field(s) for /v1/completions: {names}", fix="remove them", fields=sorted(extra))
    p = body.prompt
    if isinstance(p, str):
        return [p]
    if not p:
        raise BadRequest("`prompt` is empty", fix="send a string or a list of strings", field="prompt")
    if not all(isinstance(x, str) for x in p):
        raise NotSupported("token-id prompts are not supported", fix="send `prompt` as text", field="prompt")
    if len(p) > MAX_PROMPTS:
        raise BadRequest(f"`prompt` holds {len(p)} prompts; at most {MAX_PROMPTS} go in one request",
                         fix="split them over several requests", field="prompt")
    if body.stream and len(p) > 1:
        raise NotSupported("a streamed completion takes one prompt", fix="send one prompt per streamed request",
                           field="prompt")
    return list(p)  # type: ignore[arg-type]


def chat_data(body: CompletionsBody, prompt: str) -> dict[str, Any]:
    """The chat completions body one prompt stands for, checked as `/v1/chat/completions` checks it."""
    data: dict[str, Any] = {"model": body.model, "messages": [{"role": "user", "content": prompt}]}
    for key in PASSED:
        value = getattr(body, key)
        if value is not None:
            data[key] = value
    if body.stop is not None:
        data["stop"] = body.stop
    checked = fast_chat_body(data)
    if checked is not None:
        return checked
    try:
        return ChatCompletionBody.model_validate(data).model_dump(exclude_unset=True, exclude_none=True)
    except ValidationError as exc:
        raise as_chat_invalid(exc) from None


def _usage(u: Usage) -> dict[str, int]:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "total_tokens": u.total_tokens}


def _cmpl_id(request_id: str) -> str:
    return "cmpl-" + request_id


@router.post("/v1/completions", tags=["gateway"])
async def completions(body: CompletionsBody, request: Request, p: Principal = Depends(principal)) -> Response:
    """OpenAI legacy completions, streaming (SSE `text_completion` chunks) or not, through the governed path."""
    return await _complete(body, request, p)


async def _complete(body: CompletionsBody, request: Request, p: Principal) -> Response:
    texts = prompts(body)
    gw: Gateway = request.app.state.gateway
    rid = request_id_var.get() or ""
    calls = [Call(request_id=rid if len(texts) == 1 else f"{rid}/{i}", principal=p, kind="chat", alias=body.model,
                  chat=chat_request(chat_data(body, t)), metadata=dict(body.metadata or {}))
             for i, t in enumerate(texts)]
    created = int(time.time())
    if body.stream:
        call = calls[0]
        stream = gw.chat_stream(call)
        first = await first_delta(stream)
        return StreamedResponse(_sse(call, created, stream, first), media_type="text/event-stream",
                                headers={**answer_headers(call), "cache-control": "no-cache"})
    if len(calls) == 1:  # the common case: the answer may leave before the path's bookkeeping, as for chat
        call = calls[0]
        return await answer_chat(gw, call, request,
                                 lambda result: text_completion(call, call.request_id, created, [result], result.usage))
    done = await asyncio.gather(*(gw.chat(c) for c in calls), return_exceptions=True)  # each call ends, metered
    failed = next((r for r in done if isinstance(r, BaseException)), None)
    if failed is not None:
        raise failed
    results: list[ChatResult] = list(done)  # type: ignore[arg-type]
    usage = Usage(sum(r.usage.prompt_tokens for r in results), sum(r.usage.completion_tokens for r in results))
    return text_completion(calls[0], rid, created, results, usage)


def text_completion(call: Call, rid: str, created: int, results: list[ChatResult], usage: Usage) -> JSONAnswer:
    """The `text_completion` answer: one choice per result, their usage summed."""
    out = {"id": _cmpl_id(rid), "object": "text_completion", "created": created, "model": call.alias,
           "system_fingerprint": None,
           "choices": [{"text": r.content or "", "index": i, "logprobs": None, "finish_reason": r.finish_reason}
                       for i, r in enumerate(results)],
           "usage": _usage(usage)}
    return JSONAnswer(orjson.dumps(out), answer_headers(call, usage))


def _chunk(call: Call, created: int, text: str, finish: str | None) -> bytes:
    body = {"id": _cmpl_id(call.request_id), "object": "text_completion", "created": created, "model": call.alias,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}
    return b"data: " + orjson.dumps(body) + b"\n\n"


async def _sse(call: Call, created: int, stream: AsyncIterator[ChatDelta], first: ChatDelta | None
               ) -> AsyncIterator[bytes]:
    """`text_completion` chunks, a usage chunk when `stream_options.include_usage` asks, then `[DONE]`; an error
    after the first byte becomes an error event, and the stream ends."""
    out: list[bytes] = []
    try:
        deltas = ([first] if first is not None else [])
        for d in deltas:
            if d.content or d.finish_reason:
                out.append(_chunk(call, created, d.content or "", d.finish_reason))
        if out and not (first and first.more):
            yield b"".join(out)
            out.clear()
        async for d in stream:
            if d.content or d.finish_reason:
                out.append(_chunk(call, created, d.content or "", d.finish_reason))
            if out and not d.more:
                yield b"".join(out)
                out.clear()
        if call.chat is not None and call.chat.include_usage:
            body = {"id": _cmpl_id(call.request_id), "object": "text_completion", "created": created,
                    "model": call.alias, "choices": [], "usage": _usage(call.usage)}
            out.append(b"data: " + orjson.dumps(body) + b"\n\n")
        out.append(b"data: [DONE]\n\n")
    except KeelError as exc:
        out.append(b"data: " + orjson.dumps(exc.to_problem(call.request_id)) + b"\n\n")
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
    yield b"".join(out)


def hot_routes() -> dict[tuple[str, str], HotEndpoint]:
    def complete(body: CompletionsBody, request: Any, p: Principal) -> Awaitable[Response]:
        return _complete(body, request, p)

    return {("POST", "/v1/completions"): hot_json_endpoint(CompletionsBody, complete, authenticate=principal)}


def mount(app: FastAPI) -> None:
    """Serve `/v1/completions` on `app`."""
    app.include_router(router)
    app.state.hot_routes.update(hot_routes())
