"""Provider for the Anthropic Messages API: translates OpenAI chat requests, results and stream events.

JSON mode (`response_format` json_object / json_schema) raises `NotSupported`: the Messages API has
no such switch, and a prompt-based emulation would sometimes return non-JSON without saying so.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, ClassVar

import orjson

from keel.core.errors import BadRequest, KeelError, NotSupported
from keel.core.settings import DeploymentConfig
from keel.gateway.protocol import ChatDelta, ChatRequest, ChatResult, EmbedResult, ProviderContext, Usage
from keel.gateway.providers.openai_compatible import PARSE_ERRORS, HTTPProvider, message_of

API_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 1024
STOP_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop", "max_tokens": "length",
                "tool_use": "tool_calls", "refusal": "content_filter"}
ERROR_STATUS = {"invalid_request_error": 400, "authentication_error": 401, "permission_error": 403,
                "not_found_error": 404, "request_too_large": 413, "rate_limit_error": 429, "api_error": 500,
                "overloaded_error": 529}


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


def _prompt_tokens(usage: dict[str, Any]) -> int:
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
                      usage=Usage(_prompt_tokens(usage), int(usage.get("output_tokens") or 0)),
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
            self.usage = Usage(_prompt_tokens(usage), int(usage.get("output_tokens") or 0))
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
            prompt = _prompt_tokens(usage) or self.usage.prompt_tokens
            self.usage = Usage(prompt, int(usage.get("output_tokens") or self.usage.completion_tokens))
            return ChatDelta(finish_reason=STOP_REASONS.get(ev["delta"].get("stop_reason"), "stop"),
                             usage=self.usage)
        if kind == "message_stop":
            self.done = True
        return None  # ping, content_block_stop, message_stop, events added to the API later


class AnthropicProvider(HTTPProvider):
    """Calls `{base_url}/v1/messages` with `x-api-key` from the vault; OpenAI shapes in and out.

    >>> p = AnthropicProvider(DeploymentConfig(alias="claude", provider="anthropic",
    ...     model="claude-sonnet-4-5", credential="anthropic"), ProviderContext(get_secret=vault.get))
    """

    name: ClassVar[str] = "anthropic"
    supports_tools: ClassVar[bool] = True
    supports_json_mode: ClassVar[bool] = False
    can_stream: ClassVar[bool] = True
    can_embed: ClassVar[bool] = False
    default_base_url: ClassVar[str] = "https://api.anthropic.com"

    def __init__(self, config: DeploymentConfig, ctx: ProviderContext) -> None:
        super().__init__(config, ctx)
        self.url = self.base_url.removesuffix("/v1") + "/v1/messages"

    def auth_headers(self, secret: str | None) -> dict[str, str]:
        return {"anthropic-version": API_VERSION, **({"x-api-key": secret} if secret else {})}

    def _body(self, req: ChatRequest, stream: bool) -> dict[str, Any]:
        """The Messages API body; raises NotSupported / BadRequest before any upstream call."""
        try:
            return self._translate(req, stream)
        except PARSE_ERRORS as exc:
            raise BadRequest(f"the request cannot be translated for Anthropic ({type(exc).__name__}: {exc})",
                             fix="send OpenAI-shaped messages, tools and tool_choice",
                             deployment=self.deployment) from None

    def _translate(self, req: ChatRequest, stream: bool) -> dict[str, Any]:
        fmt = (req.response_format or {}).get("type")
        if fmt in ("json_object", "json_schema"):
            raise NotSupported(f"deployment {self.deployment} (anthropic) has no JSON mode",
                               fix="route JSON-mode requests to another deployment, or ask for JSON in the prompt",
                               deployment=self.deployment)
        if (req.body.get("n") or 1) > 1:
            raise NotSupported(f"deployment {self.deployment} (anthropic) returns one choice only",
                               fix="send n=1 and repeat the request", deployment=self.deployment)
        system, messages = translate_messages(req.messages)
        body: dict[str, Any] = {"model": self.config.model or req.model, "messages": messages,
                                "max_tokens": req.max_tokens or req.body.get("max_completion_tokens")
                                or DEFAULT_MAX_TOKENS}
        if system:
            body["system"] = system
        for key in ("temperature", "top_p"):
            if getattr(req, key) is not None:
                body[key] = getattr(req, key)
        if req.stop:
            body["stop_sequences"] = [req.stop] if isinstance(req.stop, str) else list(req.stop)
        if req.tools:
            body["tools"] = translate_tools(req.tools)
        if choice := translate_tool_choice(req.tool_choice, req.body.get("parallel_tool_calls")):
            body["tool_choice"] = choice
        if req.body.get("user"):
            body["metadata"] = {"user_id": str(req.body["user"])}
        if stream:
            body["stream"] = True
        return body

    def _event_error(self, ev: dict[str, Any]) -> KeelError:
        err = ev.get("error") or {}
        return self._fail(ERROR_STATUS.get(err.get("type"), 500) if isinstance(err, dict) else 500,
                          message_of(ev) or "error event in the stream")

    async def chat(self, req: ChatRequest) -> ChatResult:
        data = await self._post_json(self.url, self._body(req, False))
        try:
            if data.get("type") == "error":
                raise self._event_error(data)
            result = to_result(data)
        except PARSE_ERRORS as exc:
            raise self._malformed(f"{type(exc).__name__}: {exc}") from None
        result.model = result.model or self.config.model
        return result

    def stream(self, req: ChatRequest) -> AsyncIterator[ChatDelta]:
        return self._stream(self._body(req, True))

    async def _stream(self, body: dict[str, Any]) -> AsyncIterator[ChatDelta]:
        translator = StreamTranslator()
        async with self._open_stream(self.url, body) as batches:
            async for batch in batches:
                for data in batch:
                    ev = orjson.loads(data)
                    if ev.get("type") == "error":
                        raise self._event_error(ev)
                    delta = translator.event(ev)
                    if delta is not None:
                        yield delta
                    if translator.done:
                        break
                if translator.done:
                    break
            if not translator.done:
                raise self._malformed("the stream ended before message_stop")

    async def embed(self, texts: list[str]) -> EmbedResult:
        raise NotSupported(f"deployment {self.deployment} (anthropic) cannot embed: Anthropic has no embeddings API",
                           fix="use an embedding deployment (local_embed or openai_compatible)",
                           deployment=self.deployment)
