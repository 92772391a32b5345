"""The Anthropic Messages API on Keel: `POST /v1/messages` (JSON or SSE events) and
`POST /v1/messages/count_tokens`, so the official `anthropic` SDK and tools built on it (Claude Code) can
point at Keel.

A Messages request is translated once into Keel's OpenAI-shaped call (`keel.gateway.anthropic_shapes`),
checked like a `/v1/chat/completions` body, and sent down the same governed path (limits, policy, guards,
budgets, cache, router, ledger); the answer is translated back. The key comes as `x-api-key` (what the SDK
sends) or `Authorization: Bearer`; `anthropic-version` is accepted and not required. Every error on these
routes is Anthropic-shaped — `{"type": "error", "error": {"type", "message"}}` — with Keel's `code`, `fix`
and ids beside it; a body that is not valid is a 400 `invalid_request_error`, as the Messages API answers.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any, Literal

import orjson
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request as StarletteRequest
from starlette.responses import Response

from keel.core.errors import InternalError, KeelError, MalformedJSON, ValidationFailed
from keel.core.http import HotEndpoint, JSONAnswer, StreamedResponse, error_headers, read_body, refuse_deep
from keel.core.logs import request_id_var
from keel.gateway.anthropic_shapes import EventWriter, error_type, openai_body, sse, to_message
from keel.gateway.pipeline import Call, Gateway, Providers
from keel.gateway.protocol import ChatDelta, ChatResult
from keel.gateway.routes import answer_chat, answer_headers, chat_request, first_delta
from keel.gateway.schemas import (
    MAX_TOKENS, ChatCompletionBody, check_keel, check_metadata, fast_chat_body,
)
from keel.identity.auth import principal
from keel.identity.principal import Principal

log = logging.getLogger("keel.gateway")
router = APIRouter()


# -- request bodies -----------------------------------------------------------------------------------------

def _check_metadata(meta: Any) -> None:
    """Anthropic's `{"user_id": …}`, plus Keel's own string keys (use_case, task_id, …) for the ledger."""
    if type(meta) is dict and meta.get("user_id") is not None and type(meta["user_id"]) is not str:
        raise ValueError("metadata.user_id must be a string")
    check_metadata(meta)


class MessageParam(BaseModel):
    """One turn: `content` is a string or a list of content blocks (text, image, tool_use, tool_result…)."""

    model_config = ConfigDict(extra="allow")
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class CountTokensBody(BaseModel):
    """`POST /v1/messages/count_tokens`: the prompt part of a Messages request."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1, max_length=256)
    messages: list[MessageParam] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None  # accepted, not acted on: Keel's models do not think aloud


class MessagesBody(CountTokensBody):
    """`POST /v1/messages`. `metadata` takes Anthropic's `user_id` and Keel's ledger keys (use_case, task_id);
    `keel` holds Keel-only options as on /v1/chat/completions. `top_k` reaches providers that take it."""

    max_tokens: int = Field(ge=1, le=MAX_TOKENS)
    stop_sequences: list[str] | None = None
    stream: bool | None = None
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0, le=MAX_TOKENS)
    metadata: dict[str, Any] | None = None
    keel: dict[str, Any] | None = None

    @field_validator("metadata", mode="before")
    @classmethod
    def _metadata(cls, v: Any) -> Any:
        _check_metadata(v)
        return v

    @field_validator("keel", mode="before")
    @classmethod
    def _keel(cls, v: Any) -> Any:
        check_keel(v)
        return v


_MESSAGE_FIELDS = frozenset(MessagesBody.model_fields)
_COUNT_FIELDS = frozenset(CountTokensBody.model_fields)
_ROLES = ("user", "assistant")
_NUMBERS = {"max_tokens": (int, 1, MAX_TOKENS), "top_k": (int, 0, MAX_TOKENS), "temperature": (float, 0, 1),
            "top_p": (float, 0, 1)}
_OPTIONAL_DICTS = ("tool_choice", "thinking")


def fast_body(data: Any, model: type[BaseModel]) -> dict[str, Any] | None:
    """The decoded JSON of a `model` body (`MessagesBody` or `CountTokensBody`) of the common shape, every
    field already of its declared type, as the model would dump it (unset and null fields left out); None
    for anything else, which the model then validates. It accepts only what the model accepts (a property
    test holds it to that); fields the model does not declare are left to it."""
    if type(data) is not dict:
        return None
    name, messages = data.get("model"), data.get("messages")
    if type(name) is not str or not 0 < len(name) <= 256 or type(messages) is not list or not messages:
        return None
    for m in messages:
        if type(m) is not dict or len(m) != 2 or m.get("role") not in _ROLES:
            return None
        content = m.get("content")
        if type(content) is not str and not (type(content) is list and all(type(b) is dict for b in content)):
            return None
    fields = _MESSAGE_FIELDS if model is MessagesBody else _COUNT_FIELDS
    out: dict[str, Any] = {}
    try:
        for key, v in data.items():
            if v is None:
                continue
            if key not in fields:
                return None
            out[key] = v
            spec = _NUMBERS.get(key)
            if spec is not None:
                kind, low, high = spec
                if kind is float and type(v) is int:
                    v = out[key] = float(v)
                if type(v) is not kind or not low <= v <= high:
                    return None
            elif key == "system":
                if type(v) is not str and not (type(v) is list and all(type(b) is dict for b in v)):
                    return None
            elif key == "tools":
                if type(v) is not list or not all(type(t) is dict for t in v):
                    return None
            elif key in _OPTIONAL_DICTS:
                if type(v) is not dict:
                    return None
            elif key == "stop_sequences":
                if type(v) is not list or not all(type(x) is str for x in v):
                    return None
            elif key == "stream":
                if type(v) is not bool:
                    return None
            elif key == "metadata":
                _check_metadata(v)
            elif key == "keel":
                check_keel(v)
    except (ValueError, TypeError, AttributeError, OverflowError):
        return None
    if model is MessagesBody and "max_tokens" not in out:
        return None
    return out


def _invalid(exc: ValidationError, prefix: str = "") -> ValidationFailed:
    fields = [{"field": prefix + ".".join(str(p) for p in e.get("loc", ())) or "(body)",
               "message": e.get("msg", "invalid")} for e in exc.errors()]
    summary = "; ".join(f"{f['field']}: {f['message']}" for f in fields[:5])
    err = ValidationFailed(f"request is invalid: {summary}", fix="correct the named fields")
    err.ids["errors"] = fields
    return err


def _parse(raw: bytes, model: type[BaseModel]) -> dict[str, Any]:
    """The body as JSON with its top-level fields typed by `model` (unset and null fields left out)."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise MalformedJSON(f"request body is not valid JSON: {exc}",
                            fix="send a JSON object with Content-Type: application/json") from None
    refuse_deep(raw, data)
    fast = fast_body(data, model)
    if fast is not None:
        return fast
    try:
        return model.model_validate(data).model_dump(exclude_unset=True, exclude_none=True)
    except ValidationError as exc:
        raise _invalid(exc) from None


def _chat_body(data: dict[str, Any]) -> dict[str, Any]:
    """The translated request, held to every check a /v1/chat/completions body passes (tool schemas…). A
    request of plain text turns with no tools or output format is one the translation has checked through
    (its other fields have the same or tighter bounds here than there), and is not checked again."""
    openai = openai_body(data)
    if "tools" not in openai and "tool_choice" not in openai and "response_format" not in openai and all(
            type(m["content"]) is str and len(m) == 2 for m in openai["messages"]):
        return openai
    checked = fast_chat_body(openai)
    if checked is not None:
        return checked
    try:
        return ChatCompletionBody.model_validate(openai).model_dump(exclude_unset=True, exclude_none=True)
    except ValidationError as exc:
        raise _invalid(exc, "(as a chat request) ") from None


# -- answers ------------------------------------------------------------------------------------------------

def error_body(err: KeelError) -> tuple[int, dict[str, Any]]:
    """(status, body) of a Keel error on these routes: Anthropic's error shape, Keel's problem fields beside
    it. A body that fails validation is a 400, as on the Messages API."""
    status = 400 if err.status == 422 else err.status
    message = f"{err.detail} — {err.fix}" if err.fix else err.detail
    body: dict[str, Any] = {"type": "error", "error": {"type": error_type(status), "message": message}}
    rid = request_id_var.get()
    if rid:
        body["request_id"] = rid
    body.update({"code": err.code, "detail": err.detail, "status": status})
    if err.fix:
        body["fix"] = err.fix
    body.update({k: v for k, v in err.ids.items() if k not in body})
    return status, body


def error_response(err: KeelError) -> Response:
    status, body = error_body(err)
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=error_headers(err))


def _message(call: Call, result: ChatResult) -> JSONAnswer:
    return JSONAnswer(orjson.dumps(to_message(result, f"msg_{call.request_id}", call.alias)),
                      answer_headers(call, result.usage))


async def _events(call: Call, writer: EventWriter, stream: AsyncIterator[ChatDelta],
                  first: ChatDelta | None) -> AsyncIterator[bytes]:
    """The Messages API's SSE events; an error after the first byte becomes an `error` event, then the end.
    Deltas marked `more` go out in one write with the ones after them."""
    out = [writer.start()]
    try:
        if first is not None:
            out.append(writer.delta(first))
            if not first.more:
                yield b"".join(out)
                out.clear()
        async for delta in stream:
            out.append(writer.delta(delta))
            if not delta.more:
                yield b"".join(out)
                out.clear()
        out.append(writer.end(call.usage))  # the stream is over: the usage is the call's final one
    except KeelError as exc:
        out.append(sse("error", error_body(exc)[1]))
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
    yield b"".join(out)


async def _messages(data: dict[str, Any], request: StarletteRequest, p: Principal) -> Response:
    gw: Gateway = request.app.state.gateway
    openai = _chat_body(data)
    call = Call(request_id=request_id_var.get() or "", principal=p, kind="chat", alias=data["model"],
                chat=chat_request(openai), metadata=dict(openai.get("metadata") or {}))
    if not call.stream:
        return await answer_chat(gw, call, request, lambda result: _message(call, result))
    stream = gw.chat_stream(call)
    first = await first_delta(stream)
    writer = EventWriter(f"msg_{call.request_id}", call.alias)
    return StreamedResponse(_events(call, writer, stream, first), media_type="text/event-stream",
                            headers={**answer_headers(call), "cache-control": "no-cache"})


async def _count_tokens(data: dict[str, Any], request: StarletteRequest, p: Principal) -> Response:
    """Input tokens of the prompt as the alias's first deployment counts them (its tokenizer, or an
    estimate); tool definitions count as text. Nothing is sent upstream and nothing is billed."""
    gw: Gateway = request.app.state.gateway
    openai = _chat_body({**data, "max_tokens": 1})
    call = Call(request_id=request_id_var.get() or "", principal=p, kind="chat", alias=data["model"],
                chat=chat_request(openai))
    cfg = Providers(gw.deployments).resolve(call)[0]  # the key's scope is checked here
    messages = list(openai["messages"])
    if data.get("tools"):
        messages.insert(0, {"role": "system", "content": orjson.dumps(data["tools"]).decode()})
    n = await run_in_threadpool(gw.deployments.provider(cfg).count_tokens, messages)
    return JSONAnswer(orjson.dumps({"input_tokens": n}), {})


def _endpoint(model: type[BaseModel], handler: Any, framework: bool = False) -> HotEndpoint:
    """A plain ASGI endpoint: the caller first (an anonymous body gets 401), then the body, and every error
    in Anthropic's shape. A body over the size limit is answered by the request edge (413). The body is read
    straight from ASGI `receive`, except behind the framework's route (`framework`), which has read it."""

    async def endpoint(request: StarletteRequest) -> Response:
        try:
            caller = await principal(request)
        except KeelError as exc:
            return error_response(exc)
        # past the body limit this raises, and the request edge answers 413
        raw = await request.body() if framework else await read_body(request.receive)
        try:
            return await handler(_parse(raw, model), request, caller)
        except KeelError as exc:
            return error_response(exc)
        except Exception as exc:  # the last resort, as on every route: log it, never leak it
            log.error("unhandled error", exc_info=exc)
            return error_response(InternalError("Keel hit an internal error; the request id is in the log",
                                                fix="retry; if it persists, report the request id"))

    return endpoint


def hot_routes() -> dict[tuple[str, str], HotEndpoint]:
    """The routes, served ahead of the framework router (which keeps them for the OpenAPI document)."""
    return {("POST", "/v1/messages"): _endpoint(MessagesBody, _messages),
            ("POST", "/v1/messages/count_tokens"): _endpoint(CountTokensBody, _count_tokens)}


_FRAMEWORK = {("POST", "/v1/messages"): _endpoint(MessagesBody, _messages, framework=True),
              ("POST", "/v1/messages/count_tokens"): _endpoint(CountTokensBody, _count_tokens, framework=True)}


ERROR_SCHEMA = {
    "type": "object", "title": "AnthropicError", "required": ["type", "error"],
    "description": "Anthropic's error shape, with Keel's stable `code`, `detail`, `fix` and the ids involved",
    "properties": {"type": {"const": "error"}, "request_id": {"type": "string"}, "code": {"type": "string"},
                   "detail": {"type": "string"}, "fix": {"type": "string"}, "status": {"type": "integer"},
                   "error": {"type": "object", "required": ["type", "message"],
                             "properties": {"type": {"type": "string"}, "message": {"type": "string"}}}},
}
RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/json": {}, "text/event-stream": {}}},
    "default": {"description": "Error", "content": {"application/json": {"schema": ERROR_SCHEMA}}},
}


@router.post("/v1/messages", tags=["gateway"], responses=RESPONSES)
async def messages(body: MessagesBody, request: Request) -> Response:
    """Anthropic Messages API: a message, or its stream of events (`stream: true`), through the governed path.
    Errors are Anthropic-shaped (`{"type": "error", "error": {"type", "message"}}`)."""
    return await _FRAMEWORK[("POST", "/v1/messages")](request)


@router.post("/v1/messages/count_tokens", tags=["gateway"], responses={
    200: {"content": {"application/json": {"schema": {"type": "object", "required": ["input_tokens"],
                                                      "properties": {"input_tokens": {"type": "integer"}}}}}},
    "default": RESPONSES["default"]})
async def count_tokens(body: CountTokensBody, request: Request) -> Response:
    """Anthropic token counting: `{"input_tokens": n}` for a Messages request's prompt."""
    return await _FRAMEWORK[("POST", "/v1/messages/count_tokens")](request)

