"""The OpenAI Responses API's shapes, translated once into Keel's internal chat call and back: input items
to chat messages, function tools and `text.format` to their chat forms, a `ChatResult` to output items and
the response object. Plain functions over JSON; the routes are in `responses.py`.
"""

from __future__ import annotations

from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from keel.core.errors import BadRequest, NotSupported, ValidationFailed
from keel.gateway.protocol import ChatResult, Usage
from keel.gateway.schemas import (
    MAX_TOKENS, ChatCompletionBody, check_keel, check_metadata, fast_chat_body,
)

Request = dict[str, Any]  # a `/v1/responses` body as `ResponsesBody` dumps it (unset and null fields left out)

MESSAGE_ROLES = ("user", "system", "developer", "assistant")
# Fields of the Responses API that Keel does not serve: refused by name rather than silently ignored.
UNSUPPORTED = {
    "background": "run the request in the foreground (omit `background`)",
    "conversation": "continue a conversation with `previous_response_id`",
    "prompt": "send the prompt's text as `input` or `instructions`",
    "reasoning": "omit `reasoning`: Keel's models take no reasoning options here",
    "max_tool_calls": "omit `max_tool_calls`",
    "top_logprobs": "omit `top_logprobs`",
}
IGNORED = ("service_tier", "prompt_cache_key", "safety_identifier", "stream_options")  # no effect on the answer


class ResponsesBody(BaseModel):
    """`POST /v1/responses`: the fields Keel serves (anything else is refused with a 400 naming it)."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1, max_length=256)
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    text: dict[str, Any] | None = None
    max_output_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    store: bool | None = None
    previous_response_id: str | None = Field(default=None, min_length=1, max_length=64)
    stream: bool | None = None
    metadata: dict[str, Any] | None = None
    user: str | None = Field(default=None, max_length=256)
    parallel_tool_calls: bool | None = None
    truncation: Literal["auto", "disabled"] | None = None
    include: list[str] | None = None
    keel: dict[str, Any] | None = None

    @field_validator("metadata", mode="before")
    @classmethod
    def _metadata(cls, v: Any) -> Any:
        check_metadata(v)
        return v

    @field_validator("keel", mode="before")
    @classmethod
    def _keel(cls, v: Any) -> Any:
        check_keel(v)
        return v


FIELDS = frozenset(ResponsesBody.model_fields)
_TRUNCATION = ("auto", "disabled")


def fast_responses_body(data: Any) -> Request | None:
    """The decoded JSON of a body of the common shape, every field already of its declared type, as
    `ResponsesBody` would dump it (`parsed`); None for anything else, which `ResponsesBody` then validates
    (with its lax coercions and its errors). It accepts only what the model accepts (a property test holds
    it to that), and leaves unknown fields to the model's path, which refuses them by name."""
    if type(data) is not dict:
        return None
    model, inp = data.get("model"), data.get("input")
    if type(model) is not str or not 0 < len(model) <= 256:
        return None
    if type(inp) is not str and not (type(inp) is list and all(type(i) is dict for i in inp)):
        return None
    out: Request = {}
    try:
        for key, v in data.items():
            if v is None:
                continue
            out[key] = v
            if key in _STRINGS:
                limit = _STRINGS[key]
                if type(v) is not str or (limit is not None and len(v) > limit) or (key == "previous_response_id"
                                                                                    and not v):
                    return None
            elif key in _BOOLS:
                if type(v) is not bool:
                    return None
            elif key in _FLOATS:
                if type(v) is int:
                    v = out[key] = float(v)
                if type(v) is not float or not 0 <= v <= _FLOATS[key]:
                    return None
            elif key == "max_output_tokens":
                if type(v) is not int or not 1 <= v <= MAX_TOKENS:
                    return None
            elif key in ("tools", "include"):
                kind = dict if key == "tools" else str
                if type(v) is not list or not all(type(x) is kind for x in v):
                    return None
            elif key == "text":
                if type(v) is not dict:
                    return None
            elif key == "metadata":
                check_metadata(v)
            elif key == "keel":
                check_keel(v)
                if type(v) is not dict:
                    return None
            elif key == "truncation":
                if v not in _TRUNCATION:
                    return None
            elif key not in ("model", "input", "tool_choice"):
                return None  # not a field of the model: its path names it in the refusal
    except (ValueError, TypeError, AttributeError, OverflowError):
        return None
    return out


_STRINGS: dict[str, int | None] = {"model": 256, "instructions": None, "previous_response_id": 64, "user": 256}
_BOOLS = ("store", "stream", "parallel_tool_calls")
_FLOATS = {"temperature": 2, "top_p": 1}


def parsed(body: ResponsesBody | Request) -> Request:
    """The request as JSON: the fields the client set, null ones left out (what `fast_responses_body` gives)."""
    if type(body) is dict:
        return body
    return body.model_dump(exclude_unset=True, exclude_none=True)


def check_supported(body: ResponsesBody | Request) -> None:
    """Refuse, by name, what the body asks for that Keel does not do."""
    req = parsed(body)
    if FIELDS.issuperset(req) and not req.get("include"):
        return
    asked = {k: v for k, v in req.items() if k not in FIELDS and k not in IGNORED and v is not None}
    for name, fix in UNSUPPORTED.items():
        if name in asked:
            raise NotSupported(f"`{name}` is not supported by Keel's /v1/responses", fix=fix, field=name)
    if asked:
        names = ", ".join(f"`{k}`" for k in sorted(asked))
        raise NotSupported(f"unknown field(s) for /v1/responses: {names}", fix="remove them", fields=sorted(asked))
    if req.get("include"):
        raise NotSupported("`include` is not supported by Keel's /v1/responses", fix="omit `include`", field="include")


# -- input items → chat messages -----------------------------------------------------------------------

def input_items(value: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The request's `input` as a list of items (a string is one user message)."""
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    if not value:
        raise BadRequest("`input` is empty", fix="send a string or at least one input item", field="input")
    return value


def _text_of(part: dict[str, Any], where: str) -> str:
    text = part.get("text")
    if type(text) is not str:
        raise BadRequest(f"{where}.text must be a string", fix="send the part's text", field=where)
    return text


def _part(part: Any, where: str) -> dict[str, Any]:
    """One Responses content part as a chat content part."""
    if type(part) is not dict:
        raise BadRequest(f"{where} must be an object with a `type`", fix="send {\"type\": \"input_text\", …}",
                         field=where)
    kind = part.get("type")
    if kind in ("input_text", "output_text", "text"):
        return {"type": "text", "text": _text_of(part, where)}
    if kind == "refusal":
        return {"type": "text", "text": str(part.get("refusal") or "")}
    if kind == "input_image":
        url = part.get("image_url")
        if type(url) is not str or not url:
            raise NotSupported(f"{where}: an input_image needs `image_url` (a URL or data URL)",
                               fix="send the image as `image_url`; `file_id` is not supported", field=where)
        image: dict[str, Any] = {"url": url}
        if part.get("detail") in ("auto", "low", "high"):
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    if kind == "input_file":
        file = {k: part[k] for k in ("file_data", "file_id", "filename") if part.get(k) is not None}
        return {"type": "file", "file": file}
    raise NotSupported(f"{where}.type {kind!r} is not supported", field=where,
                       fix="use input_text, input_image or input_file parts")


def _content(content: Any, where: str) -> str | list[dict[str, Any]]:
    if type(content) is str:
        return content
    if type(content) is not list:
        raise BadRequest(f"{where}.content must be a string or a list of content parts", field=where,
                         fix="send the message text as a string")
    parts = [_part(p, f"{where}.content[{i}]") for i, p in enumerate(content)]
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def _string(item: dict[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if type(value) is not str or (key != "arguments" and not value):
        raise BadRequest(f"{where}.{key} must be a {'' if key == 'arguments' else 'non-empty '}string",
                         fix=f"send the item's `{key}`", field=f"{where}.{key}")
    return value


def to_messages(items: list[dict[str, Any]], instructions: str | None = None) -> list[dict[str, Any]]:
    """Input items (messages, function_call, function_call_output) as chat messages, `instructions` first.
    Function calls that follow an assistant message (or each other) join it, as one chat message holds them."""
    out: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if type(item) is not dict:
            raise BadRequest(f"{where} must be an object", fix="send message, function_call or function_call_output "
                                                                "items", field=where)
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in MESSAGE_ROLES:
                raise BadRequest(f"{where}.role must be one of {', '.join(MESSAGE_ROLES)}", field=f"{where}.role",
                                 fix="set the message's role")
            out.append({"role": role, "content": _content(item.get("content"), where)})
        elif kind == "function_call":
            call = {"id": _string(item, "call_id", where), "type": "function",
                    "function": {"name": _string(item, "name", where), "arguments": _string(item, "arguments", where)}}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
                if last["content"] == "":
                    last["content"] = None
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            if type(output) is list:
                output = "".join(_text_of(p, f"{where}.output[{j}]") for j, p in enumerate(output))
            if type(output) is not str:
                raise BadRequest(f"{where}.output must be a string", fix="send the function's result as a string",
                                 field=f"{where}.output")
            out.append({"role": "tool", "tool_call_id": _string(item, "call_id", where), "content": output})
        else:
            raise NotSupported(f"{where}.type {kind!r} is not supported", field=where,
                               fix="send message, function_call or function_call_output items")
    return out


# -- tools and formats -----------------------------------------------------------------------------------

def chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Responses function tools (`{"type": "function", "name", "parameters", …}`) in the chat form."""
    if not tools:
        return None
    out = []
    for i, tool in enumerate(tools):
        if type(tool) is not dict or tool.get("type") != "function":
            kind = tool.get("type") if type(tool) is dict else None
            raise NotSupported(f"tools[{i}] of type {kind!r} is not supported: Keel serves function tools",
                               fix="send {\"type\": \"function\", \"name\": …, \"parameters\": {…}}", field=f"tools[{i}]")
        fn = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
        out.append({"type": "function", "function": fn})
    return out


def chat_tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function" and "function" not in choice:
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    """`text.format` as a chat `response_format`."""
    fmt = (text or {}).get("format")
    if fmt is None:
        return None
    if type(fmt) is not dict:
        raise BadRequest("text.format must be an object", fix="send {\"type\": \"json_schema\", …}", field="text.format")
    if fmt.get("type") != "json_schema":
        return {"type": fmt.get("type")}
    spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if fmt.get(k) is not None}
    return {"type": "json_schema", "json_schema": spec}


# Fields that reach the chat body as they are (under their chat names), before and after the tool fields, in
# the order a chat body lists them.
_AS_CHAT_BEFORE = (("max_output_tokens", "max_tokens"), ("temperature", "temperature"), ("top_p", "top_p"))
_AS_CHAT_AFTER = (("parallel_tool_calls", "parallel_tool_calls"), ("user", "user"), ("metadata", "metadata"),
                  ("stream", "stream"))


def chat_data(body: ResponsesBody | Request, messages: list[dict[str, Any]]) -> dict[str, Any]:
    """The chat completions body the request stands for, checked as `/v1/chat/completions` checks it. A body
    of plain text messages with no tools, tool choice or format is one the translation has checked through
    (every field it carries has the same bounds here as there), and is not checked again."""
    req = parsed(body)
    data: dict[str, Any] = {"model": req["model"], "messages": messages}
    for key, chat_key in _AS_CHAT_BEFORE:
        if req.get(key) is not None:
            data[chat_key] = req[key]
    plain = True
    if "tools" in req or "tool_choice" in req or "text" in req:
        for key, value in (("tools", chat_tools(req.get("tools"))), ("tool_choice", chat_tool_choice(req.get("tool_choice"))),
                           ("response_format", response_format(req.get("text")))):
            if value is not None:
                data[key], plain = value, False
    for key, chat_key in _AS_CHAT_AFTER:
        if req.get(key) is not None:
            data[chat_key] = req[key]
    if "keel" in req or "truncation" in req:
        keel = dict(req.get("keel") or {})
        if req.get("truncation") == "auto":
            keel.setdefault("context_overflow", "trim")
        if keel:
            data["keel"] = keel
    if plain and all(type(m["content"]) is str and len(m) == 2 for m in messages):
        return data
    checked = fast_chat_body(data)
    if checked is not None:
        return checked
    try:
        return ChatCompletionBody.model_validate(data).model_dump(exclude_unset=True, exclude_none=True)
    except ValidationError as exc:
        raise as_chat_invalid(exc) from None


def as_chat_invalid(exc: ValidationError) -> ValidationFailed:
    """A translated body that `/v1/chat/completions` would refuse: the fields named in its chat form."""
    fields = [{"field": ".".join(str(p) for p in e.get("loc", ())) or "(body)", "message": e.get("msg", "invalid")}
              for e in exc.errors()]
    summary = "; ".join(f"{f['field']}: {f['message']}" for f in fields[:5])
    err = ValidationFailed(f"the request, as a chat call, is invalid: {summary}",
                           fix="correct the input items, tools or text.format these chat fields come from")
    err.ids["errors"] = fields
    return err


# -- chat result → output items and the response object ---------------------------------------------------

def message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" else []
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def function_item(item_id: str, call_id: str, name: str, arguments: str, status: str = "completed") -> dict[str, Any]:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


def output_items(response_id: str, result: ChatResult) -> list[dict[str, Any]]:
    suffix = response_id.removeprefix("resp_")
    items = []
    if result.content or not result.tool_calls:
        items.append(message_item(f"msg_{suffix}", result.content or ""))
    for i, call in enumerate(result.tool_calls or ()):
        fn = call.get("function") or {}
        args = fn.get("arguments")
        items.append(function_item(f"fc_{suffix}_{i}", str(call.get("id") or f"call_{suffix}_{i}"),
                                   str(fn.get("name") or ""),
                                   args if isinstance(args, str) else orjson.dumps(args or {}).decode()))
    return items


def usage_json(u: Usage) -> dict[str, Any]:
    return {"input_tokens": u.prompt_tokens, "input_tokens_details": {"cached_tokens": u.cached_tokens},
            "output_tokens": u.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": u.total_tokens}


def incomplete(finish_reason: str | None) -> dict[str, str] | None:
    if finish_reason == "length":
        return {"reason": "max_output_tokens"}
    if finish_reason == "content_filter":
        return {"reason": "content_filter"}
    return None


# The response object's echo of a request that sets none of its fields (OpenAI's defaults), in its order.
_ECHO: dict[str, Any] = {
    "id": None, "object": "response", "created_at": 0, "status": None, "error": None, "incomplete_details": None,
    "instructions": None, "max_output_tokens": None, "model": None, "output": None, "parallel_tool_calls": True,
    "previous_response_id": None, "reasoning": None, "store": True, "temperature": 1.0, "text": None,
    "tool_choice": "auto", "tools": None, "top_p": 1.0, "truncation": "disabled", "usage": None, "user": None,
    "metadata": None,
}
_ECHOED = ("instructions", "max_output_tokens", "previous_response_id", "temperature", "tool_choice", "top_p",
           "truncation", "user")  # echoed as sent when set


def response_json(response_id: str, created: int, body: ResponsesBody | Request, *, status: str,
                  output: list[dict[str, Any]], usage: Usage | None, finish_reason: str | None = None) -> dict[str, Any]:
    """The response object: what was asked (echoed as OpenAI does), the output and the usage."""
    req = parsed(body)
    why = incomplete(finish_reason) if status != "in_progress" else None
    out = dict(_ECHO)
    out["id"], out["created_at"], out["status"], out["incomplete_details"] = (
        response_id, created, "incomplete" if why else status, why)
    out["model"], out["output"], out["reasoning"] = req["model"], output, {"effort": None, "summary": None}
    for key in _ECHOED:
        if key in req:
            out[key] = req[key]
    if "parallel_tool_calls" in req:
        out["parallel_tool_calls"] = req["parallel_tool_calls"] is not False
    if "store" in req:
        out["store"] = req["store"] is not False
    text = req.get("text")
    out["text"] = {"format": (text or {}).get("format") or {"type": "text"}}
    out["tools"], out["metadata"] = req.get("tools") or [], req.get("metadata") or {}
    if usage is not None:
        out["usage"] = usage_json(usage)
    return out


def finished(started: dict[str, Any], *, status: str, output: list[dict[str, Any]], usage: Usage | None,
             finish_reason: str | None = None) -> dict[str, Any]:
    """`response_json` again for the same request, from its in-progress object `started` (a stream's first
    event): the echo of the request is copied, not built again."""
    out = dict(started)
    why = incomplete(finish_reason) if status != "in_progress" else None
    out["status"], out["incomplete_details"] = ("incomplete" if why else status), why
    out["output"], out["usage"] = output, usage_json(usage) if usage is not None else None
    return out
