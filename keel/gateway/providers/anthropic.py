"""Provider for the Anthropic Messages API: translates OpenAI chat requests, results and stream events
(with `keel.gateway.anthropic_shapes`).

JSON mode (`response_format` json_object / json_schema) raises `NotSupported`: the Messages API has
no such switch, and a prompt-based emulation would sometimes return non-JSON without saying so.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, ClassVar

import orjson

from keel.core.errors import BadRequest, KeelError, NotSupported
from keel.core.settings import DeploymentConfig
from keel.gateway.anthropic_shapes import (  # the shape mapping, shared with the /v1/messages ingress
    ERROR_STATUS, StreamTranslator, to_result, translate_messages, translate_tool_choice, translate_tools,
)
from keel.gateway.protocol import ChatDelta, ChatRequest, ChatResult, EmbedResult, ProviderContext
from keel.gateway.providers.openai_compatible import PARSE_ERRORS, HTTPProvider, message_of

API_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 1024


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
        if isinstance(req.body.get("top_k"), int):  # sent by Messages API clients through Keel
            body["top_k"] = req.body["top_k"]
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
