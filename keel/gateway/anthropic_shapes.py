"""Anthropic Messages ⇄ OpenAI chat shapes, both directions, in one place.

Keel's internal call is OpenAI-shaped (`keel.gateway.protocol`). The `anthropic` provider (egress) turns it
into a Messages API request and the answer back (`translate_*`, `to_result`, `StreamTranslator`); the
`/v1/messages` ingress turns a Messages request into it and the answer back (`openai_*`, `to_message`,
`EventWriter`). One table of stop reasons and one of error types serve both, so the two directions agree.
"""

from __future__ import annotations

from typing import Any

import orjson

from keel.core.errors import BadRequest, NotSupported
from keel.gateway.protocol import ChatDelta, ChatResult, Usage

STOP_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop", "max_tokens": "length",
                "tool_use": "tool_calls", "refusal": "content_filter"}
FINISH_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
                  "content_filter": "refusal"}  # OpenAI finish_reason → Anthropic stop_reason
ERROR_STATUS = {"invalid_request_error": 400, "authentication_error": 401, "billing_error": 402,
                "permission_error": 403, "not_found_error": 404, "request_too_large": 413, "rate_limit_error": 429,
                "api_error": 500, "timeout_error": 504, "overloaded_error": 529}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
               403: "permission_error", 404: "not_found_error", 405: "invalid_request_error",
               409: "invalid_request_error", 413: "request_too_large", 422: "invalid_request_error",
               429: "rate_limit_error", 503: "overloaded_error", 504: "timeout_error", 529: "overloaded_error"}


def error_type(status: int) -> str:
    """The Anthropic `error.type` for an HTTP status (`api_error` for the rest)."""
    return ERROR_TYPES.get(status, "invalid_request_error" if 400 <= status < 500 else "api_error")


# -- egress: OpenAI request → Messages API, and its answers back -------------------------------------------

def _text(content: Any) -> str:
    """Plain text of an OpenAI message content (a string or a list of parts)."""
    if isinstance(content, list):
        return "".join(p.get("text") or "" for p in content if isinstance(p, dict) and p.get("type") == "text")
    return content or ""


def _image(url: str) -> dict[str, Any]:
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        return {"type": "image", "source": {"type": "base64", "media_type": header[5:].split(";")[0], "data": data}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _blocks(content: Any) -> list[dict[str, Any]]:
    """OpenAI content (string or parts) → Anthropic content blocks; empty text is dropped (the API rejects it)."""
    if not isinstance(content, list):
        return [{"type": "text", "text": content}] if content else []
    blocks = []
    for part in content:
        kind = part.get("type")
        if kind == "text":
            if part.get("text"):
                blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            blocks.append(_image(part["image_url"]["url"]))
        else:
            raise NotSupported(f"message part type {kind!r} is not supported by the anthropic provider",
                               fix="send text or image_url parts")
    return blocks


def _arguments(raw: Any) -> Any:
    if isinstance(raw, dict):
        return raw
    try:
        return orjson.loads(raw or "{}")
    except orjson.JSONDecodeError:
        raise BadRequest("an assistant tool_call has arguments that are not valid JSON",
                         fix="send the function arguments as a JSON object string") from None


def translate_messages(messages: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """OpenAI messages → (system, Anthropic messages); same-role neighbours merge, as the API requires."""
    system: list[str] = []
    out: list[dict[str, Any]] = []
    for m in messages:
        role = m.get("role")
        if role in ("system", "developer"):
            system.append(_text(m.get("content")))
            continue
        if role == "tool":
            role = "user"
            blocks = [{"type": "tool_result", "tool_use_id": m.get("tool_call_id") or "",
                       "content": _text(m.get("content"))}]
        elif role == "assistant":
            blocks = _blocks(m.get("content"))
            for call in m.get("tool_calls") or ():
                fn = call.get("function") or {}
                blocks.append({"type": "tool_use", "id": call.get("id"), "name": fn.get("name"),
                               "input": _arguments(fn.get("arguments"))})
        elif role == "user":
            blocks = _blocks(m.get("content"))
        else:
            raise BadRequest(f"message role {role!r} is not supported", fix="use system, user, assistant or tool")
        if not blocks:
            continue
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": blocks})
    return "\n\n".join(s for s in system if s), out


def translate_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for tool in tools:
        fn = tool.get("function") or {}
        if tool.get("type", "function") != "function" or not fn.get("name"):
            raise BadRequest("each tool must be {type: function, function: {name, parameters}}",
                             fix="send OpenAI function tools")
        item = {"name": fn["name"], "input_schema": fn.get("parameters") or {"type": "object", "properties": {}}}
        if fn.get("description"):
            item["description"] = fn["description"]
        out.append(item)
    return out


def translate_tool_choice(choice: Any, parallel: Any) -> dict[str, Any] | None:
    """auto → auto, required → any, none → none, a named function → tool; `parallel_tool_calls: false` kept."""
    if choice is None:
        out = None
    elif isinstance(choice, str) and choice in ("auto", "none"):
        out = {"type": choice}
    elif choice == "required":
        out = {"type": "any"}
    elif isinstance(choice, dict) and (choice.get("function") or {}).get("name"):
        out = {"type": "tool", "name": choice["function"]["name"]}
    else:
        raise BadRequest(f"tool_choice {choice!r} is not understood",
                         fix='use "auto", "none", "required" or {"type": "function", "function": {"name": …}}')
    if parallel is False and (out is None or out["type"] != "none"):
        out = {**(out or {"type": "auto"}), "disable_parallel_tool_use": True}
    return out


def prompt_tokens(usage: dict[str, Any]) -> int:
    """Input tokens including cache writes and reads, so the ledger counts everything that was sent."""
    return sum(int(usage.get(k) or 0) for k in ("input_tokens", "cache_creation_input_tokens",
                                                  "cache_read_input_tokens"))


def to_result(data: dict[str, Any]) -> ChatResult:
    """An Anthropic message → ChatResult: text blocks joined, tool_use blocks as OpenAI tool_calls."""
    texts, calls = [], []
    for block in data["content"]:
        if block["type"] == "text":
            texts.append(block["text"])
        elif block["type"] == "tool_use":
            calls.append({"id": block["id"], "type": "function", "function": {
                "name": block["name"], "arguments": orjson.dumps(block.get("input") or {}).decode()}})
    usage = data.get("usage") or {}
    return ChatResult(content="".join(texts) if texts or not calls else None,
                      finish_reason=STOP_REASONS.get(data.get("stop_reason"), "stop"),
                      usage=Usage(prompt_tokens(usage), int(usage.get("output_tokens") or 0)),
                      tool_calls=calls or None, model=data.get("model") or "")


class StreamTranslator:
    """Anthropic stream events → OpenAI-style ChatDeltas; remembers which content block is which tool call."""

    def __init__(self) -> None:
        self.tool_index: dict[int, int] = {}
        self.usage = Usage()
        self.done = False

    def event(self, ev: dict[str, Any]) -> ChatDelta | None:
        kind = ev.get("type")
        if kind == "message_start":
            usage = ev["message"].get("usage") or {}
            self.usage = Usage(prompt_tokens(usage), int(usage.get("output_tokens") or 0))
            return ChatDelta(role="assistant")
        if kind == "content_block_start":
            block = ev["content_block"]
            if block["type"] == "tool_use":
                index = self.tool_index[ev["index"]] = len(self.tool_index)
                return ChatDelta(tool_calls=[{"index": index, "id": block["id"], "type": "function",
                                              "function": {"name": block["name"], "arguments": ""}}])
            return ChatDelta(content=block["text"]) if block["type"] == "text" and block.get("text") else None
        if kind == "content_block_delta":
            delta = ev["delta"]
            if delta["type"] == "text_delta":
                return ChatDelta(content=delta["text"])
            if delta["type"] == "input_json_delta":
                return ChatDelta(tool_calls=[{"index": self.tool_index[ev["index"]],
                                              "function": {"arguments": delta["partial_json"]}}])
            return None  # thinking, signatures, citations
        if kind == "message_delta":
            usage = ev.get("usage") or {}
            prompt = prompt_tokens(usage) or self.usage.prompt_tokens
            self.usage = Usage(prompt, int(usage.get("output_tokens") or self.usage.completion_tokens))
            return ChatDelta(finish_reason=STOP_REASONS.get(ev["delta"].get("stop_reason"), "stop"),
                             usage=self.usage)
        if kind == "message_stop":
            self.done = True
        return None  # ping, content_block_stop, message_stop, events added to the API later


# -- ingress: Messages API request → OpenAI request, and the answer back -------------------------------------

def _bad(where: str, what: str) -> BadRequest:
    return BadRequest(f"{where} {what}", fix="send content blocks as the Messages API documents them", field=where)


def _image_part(block: dict[str, Any], where: str) -> dict[str, Any]:
    source = block.get("source")
    kind = source.get("type") if type(source) is dict else None
    if kind == "base64" and type(source.get("data")) is str and type(source.get("media_type")) is str:
        return {"type": "image_url", "image_url": {"url": f"data:{source['media_type']};base64,{source['data']}"}}
    if kind == "url" and type(source.get("url")) is str and source["url"]:
        return {"type": "image_url", "image_url": {"url": source["url"]}}
    if kind == "file":
        raise NotSupported(f"{where}.source: file ids are not supported", fix="send the image as base64 or a URL",
                           field=where)
    raise _bad(f"{where}.source", "must be {type: base64, media_type, data} or {type: url, url}")


def _plain(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """One text part becomes a plain string (what most chat templates and caches expect)."""
    if len(parts) == 1 and parts[0]["type"] == "text":
        return parts[0]["text"]
    return parts


def _tool_result(block: dict[str, Any], where: str) -> dict[str, Any]:
    """A `tool_result` block → an OpenAI `tool` message (text only: OpenAI tool messages carry no images)."""
    tool_use_id = block.get("tool_use_id")
    if type(tool_use_id) is not str or not tool_use_id:
        raise _bad(f"{where}.tool_use_id", "must be a non-empty string")
    content = block.get("content")
    if content is None or type(content) is str:
        text = content or ""
    elif type(content) is list:
        texts = []
        for i, part in enumerate(content):
            if type(part) is not dict or part.get("type") != "text" or type(part.get("text")) is not str:
                raise NotSupported(f"{where}.content[{i}]: only text blocks are supported in a tool_result",
                                   fix="send the tool's result as text", field=where)
            texts.append(part["text"])
        text = "\n".join(texts)
    else:
        raise _bad(f"{where}.content", "must be a string or a list of text blocks")
    if block.get("is_error") is True:
        text = "Error: " + text
    return {"role": "tool", "tool_call_id": tool_use_id, "content": text}


def _tool_call(block: dict[str, Any], where: str) -> dict[str, Any]:
    if type(block.get("id")) is not str or not block["id"] or type(block.get("name")) is not str or not block["name"]:
        raise _bad(where, "needs a non-empty `id` and `name`")
    args = block.get("input")
    if args is None:
        args = {}
    if type(args) is not dict:
        raise _bad(f"{where}.input", "must be an object")
    return {"id": block["id"], "type": "function",
            "function": {"name": block["name"], "arguments": orjson.dumps(args).decode()}}


def openai_messages(system: Any, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`system` and Messages API messages → OpenAI chat messages. A user turn's `tool_result` blocks become
    `tool` messages (ahead of its other content, as OpenAI wants them next to the assistant's calls); an
    assistant turn's `tool_use` blocks become `tool_calls`; thinking blocks (the model's own) are dropped."""
    out: list[dict[str, Any]] = []
    if type(system) is str:
        if system:
            out.append({"role": "system", "content": system})
    elif system is not None:
        out.append({"role": "system", "content": "\n\n".join(system_texts(system))})
    for i, m in enumerate(messages):
        role, content, where = m["role"], m["content"], f"messages[{i}]"
        if type(content) is str:
            out.append({"role": role, "content": content})
            continue
        parts: list[dict[str, Any]] = []
        calls: list[dict[str, Any]] = []
        for j, block in enumerate(content):
            at = f"{where}.content[{j}]"
            kind = block.get("type") if type(block) is dict else None
            if kind == "text":
                if type(block.get("text")) is not str:
                    raise _bad(f"{at}.text", "must be a string")
                parts.append({"type": "text", "text": block["text"]})
            elif kind == "image":
                parts.append(_image_part(block, at))
            elif kind == "tool_result" and role == "user":
                if parts:  # text before a result: keep the order
                    out.append({"role": "user", "content": _plain(parts)})
                    parts = []
                out.append(_tool_result(block, at))
            elif kind == "tool_use" and role == "assistant":
                calls.append(_tool_call(block, at))
            elif kind in ("thinking", "redacted_thinking") and role == "assistant":
                continue
            elif kind in ("document", "search_result", "server_tool_use", "web_search_tool_result",
                          "container_upload", "tool_use", "tool_result"):
                raise NotSupported(f"{at}: a {kind!r} block is not supported in a {role} message",
                                   fix="send text, image, tool_use (assistant) and tool_result (user) blocks",
                                   field=at)
            else:
                raise _bad(f"{at}.type", "must be text, image, tool_use, tool_result or thinking")
        if role == "assistant":
            msg: dict[str, Any] = {"role": "assistant", "content": _plain(parts) if parts else ""}
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
        elif parts or not any(b.get("type") == "tool_result" for b in content if type(b) is dict):
            out.append({"role": "user", "content": _plain(parts) if parts else ""})
    return out


def system_texts(system: Any) -> list[str]:
    """The texts of a `system` given as a list of text blocks."""
    if type(system) is not list:
        raise _bad("system", "must be a string or a list of text blocks")
    texts = []
    for i, block in enumerate(system):
        if type(block) is not dict or block.get("type") != "text" or type(block.get("text")) is not str:
            raise _bad(f"system[{i}]", "must be {type: text, text}")
        texts.append(block["text"])
    return texts


def openai_tools(tools: list[Any]) -> list[dict[str, Any]]:
    """Custom tools `{name, description?, input_schema}` → OpenAI function tools; server tools are refused."""
    out = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if type(tool) is not dict:
            raise _bad(where, "must be an object")
        if tool.get("type") not in (None, "custom"):
            raise NotSupported(f"{where}: tool type {tool.get('type')!r} is an Anthropic server tool",
                               fix="send custom tools ({name, description, input_schema}) only", field=where)
        if type(tool.get("name")) is not str or type(tool.get("input_schema")) is not dict:
            raise _bad(where, "needs a `name` and an `input_schema` object")
        fn: dict[str, Any] = {"name": tool["name"], "parameters": tool["input_schema"]}
        if tool.get("description") is not None:
            fn["description"] = tool["description"]
        out.append({"type": "function", "function": fn})
    return out


def openai_tool_choice(choice: Any) -> tuple[Any, bool | None]:
    """(OpenAI `tool_choice`, `parallel_tool_calls`) for a Messages `tool_choice`."""
    kind = choice.get("type") if type(choice) is dict else None
    if kind in ("auto", "none"):
        out: Any = kind
    elif kind == "any":
        out = "required"
    elif kind == "tool" and type(choice.get("name")) is str and choice["name"]:
        out = {"type": "function", "function": {"name": choice["name"]}}
    else:
        raise _bad("tool_choice", 'must be {"type": "auto" | "any" | "none"} or {"type": "tool", "name": …}')
    parallel = choice.get("disable_parallel_tool_use")
    return out, (False if parallel is True else None)


def openai_body(data: dict[str, Any]) -> dict[str, Any]:
    """A Messages API request body (its top-level fields already typed) → the same request as an OpenAI chat
    body. `metadata.user_id` becomes `user`; `output_config.format` (structured output) `response_format`; Keel's own metadata keys (use_case, task_id, …) and `keel`
    options pass as on /v1/chat/completions; `top_k` passes through to providers that take it."""
    out: dict[str, Any] = {"model": data["model"], "messages": openai_messages(data.get("system"), data["messages"]),
                           "max_tokens": data["max_tokens"]}
    for key in ("temperature", "top_p", "top_k", "stream", "keel"):
        if data.get(key) is not None:
            out[key] = data[key]
    if data.get("stop_sequences"):
        out["stop"] = data["stop_sequences"]
    if data.get("tools"):
        out["tools"] = openai_tools(data["tools"])
    if data.get("tool_choice") is not None:
        choice, parallel = openai_tool_choice(data["tool_choice"])
        if data.get("tools") or choice == "none":
            out["tool_choice"] = choice
        if parallel is not None:
            out["parallel_tool_calls"] = parallel
    fmt = (data.get("output_config") or {}).get("format") if type(data.get("output_config")) is dict else None
    if fmt is not None:
        if type(fmt) is not dict or fmt.get("type") != "json_schema" or type(fmt.get("schema")) is not dict:
            raise _bad("output_config.format", 'must be {"type": "json_schema", "schema": {…}}')
        out["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}
    meta = dict(data.get("metadata") or {})
    user = meta.pop("user_id", None)
    if user is not None:
        out["user"] = user
    if meta:
        out["metadata"] = meta
    return out


def _input(arguments: Any) -> Any:
    """A tool call's arguments as the `input` object of a tool_use block (a non-JSON string kept as text)."""
    if type(arguments) is dict:
        return arguments
    try:
        value = orjson.loads(arguments or "{}")
    except orjson.JSONDecodeError:
        return {"arguments": arguments}
    return value if type(value) is dict else {"arguments": value}


def message_usage(usage: Usage) -> dict[str, int]:
    return {"input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens}


def to_message(result: ChatResult, message_id: str, model: str) -> dict[str, Any]:
    """A finished ChatResult → a Messages API `message`."""
    content: list[dict[str, Any]] = []
    if result.content:
        content.append({"type": "text", "text": result.content})
    for call in result.tool_calls or ():
        fn = call.get("function") or {}
        content.append({"type": "tool_use", "id": call.get("id") or f"toolu_{message_id}_{len(content)}",
                        "name": fn.get("name"), "input": _input(fn.get("arguments"))})
    return {"id": message_id, "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": FINISH_REASONS.get(result.finish_reason, "end_turn"), "stop_sequence": None,
            "usage": message_usage(result.usage)}


def sse(event: str, data: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class EventWriter:
    """OpenAI-style ChatDeltas → Messages API stream events: `message_start` and a `ping`, then one content
    block at a time (`content_block_start`, `_delta`s, `_stop`) for text and each tool call, then
    `message_delta` (stop reason, usage) and `message_stop`."""

    def __init__(self, message_id: str, model: str) -> None:
        self.message_id, self.model = message_id, model
        self.blocks = 0  # content blocks opened so far
        self.open: str | None = None  # "text" or "tool" while a block is open
        self.tools: dict[int, int] = {}  # OpenAI tool call index → content block index
        self.finish: str | None = None

    def start(self) -> bytes:
        message = {"id": self.message_id, "type": "message", "role": "assistant", "model": self.model,
                   "content": [], "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": 0, "output_tokens": 0}}
        return sse("message_start", {"type": "message_start", "message": message}) + sse("ping", {"type": "ping"})

    def _close(self) -> bytes:
        if self.open is None:
            return b""
        self.open = None
        return sse("content_block_stop", {"type": "content_block_stop", "index": self.blocks - 1})

    def _begin(self, kind: str, block: dict[str, Any]) -> bytes:
        out = self._close()
        self.open, self.blocks = kind, self.blocks + 1
        return out + sse("content_block_start", {"type": "content_block_start", "index": self.blocks - 1,
                                                 "content_block": block})

    def delta(self, delta: ChatDelta) -> bytes:
        out = b""
        if delta.content:
            if self.open != "text":
                out += self._begin("text", {"type": "text", "text": ""})
            out += sse("content_block_delta", {"type": "content_block_delta", "index": self.blocks - 1,
                                               "delta": {"type": "text_delta", "text": delta.content}})
        for call in delta.tool_calls or ():
            fn = call.get("function") or {}
            index = call.get("index", 0)
            if index not in self.tools:
                tool_id = call.get("id") or f"toolu_{self.message_id}_{self.blocks}"
                out += self._begin("tool", {"type": "tool_use", "id": tool_id, "name": fn.get("name") or "",
                                            "input": {}})
                self.tools[index] = self.blocks - 1
            if fn.get("arguments"):
                out += sse("content_block_delta", {"type": "content_block_delta", "index": self.tools[index],
                                                   "delta": {"type": "input_json_delta",
                                                             "partial_json": fn["arguments"]}})
        if delta.finish_reason:
            self.finish = delta.finish_reason
        return out

    def end(self, usage: Usage) -> bytes:
        """The closing events, with the call's final usage."""
        stop = FINISH_REASONS.get(self.finish or "stop", "end_turn")
        return (self._close() + sse("message_delta", {"type": "message_delta",
                                                      "delta": {"stop_reason": stop, "stop_sequence": None},
                                                      "usage": message_usage(usage)})
                + sse("message_stop", {"type": "message_stop"}))
