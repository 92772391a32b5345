"""Provider conformance: the semantics of `keel.gateway.protocol.Provider`, checked against any implementation.

Subclass `ProviderConformance` in a provider's test module (name it `Test…`), define a
`provider_factory` fixture returning a zero-argument callable that makes a fresh provider, and set
the capability flags. Each test makes its own provider and closes it. No pytest-asyncio: each test
body is one `asyncio.run`.

    class TestMyProviderConformance(ProviderConformance):
        can_embed = False

        @pytest.fixture
        def provider_factory(self, upstream):
            return lambda: MyProvider(DeploymentConfig(alias="a", provider="mine", base_url=upstream.url), CTX)
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

import pytest

from keel.core.errors import KeelError, NotSupported
from keel.gateway.protocol import ChatDelta, ChatRequest, Provider

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def chat_request(text: str = "Say hello.", *, model: str = "conformance", max_tokens: int = 16,
                 stream: bool = False, **fields: Any) -> ChatRequest:
    """A ChatRequest whose `body` is the JSON a client would have sent for it."""
    messages = fields.pop("messages", None) or [{"role": "user", "content": text}]
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "stream": stream,
            **{k: v for k, v in fields.items() if v is not None}}
    return ChatRequest(model=model, messages=messages, max_tokens=max_tokens, stream=stream, body=body, **fields)


async def collect(stream: Any) -> list[ChatDelta]:
    return [delta async for delta in stream]


async def expect_error(call: Any) -> KeelError:
    """Await a coroutine or drain a stream that must fail; return the Keel error it raised."""
    try:
        if hasattr(call, "__anext__"):
            await collect(call)
        else:
            await call
    except KeelError as err:
        return err
    raise AssertionError("expected a KeelError")


def run_with(provider: Provider, body: Callable[[Provider], Awaitable[Any]]) -> Any:
    """Run `body(provider)` in a fresh event loop, then close the provider whatever happened."""
    async def main() -> Any:
        try:
            return await body(provider)
        finally:
            await provider.close()
    return asyncio.run(main())


class ProviderConformance:
    """Tests every provider inherits; flags say what the provider under test claims to support."""

    supports_tools: ClassVar[bool] = True
    supports_json_mode: ClassVar[bool] = True
    can_stream: ClassVar[bool] = True
    can_embed: ClassVar[bool] = True

    @pytest.fixture
    def provider_factory(self) -> Callable[[], Provider]:
        raise NotImplementedError("define a provider_factory fixture in the subclass")

    @staticmethod
    def run(factory: Callable[[], Provider], body: Callable[[Provider], Awaitable[Any]]) -> Any:
        return run_with(factory(), body)

    def test_declares_the_protocol_and_its_flags(self, provider_factory):
        """A provider states its capabilities as class attributes, matching what its tests expect."""
        async def body(p: Provider) -> None:
            assert isinstance(p, Provider) and p.name
            assert (p.supports_tools, p.supports_json_mode, p.can_stream, p.can_embed) == (
                self.supports_tools, self.supports_json_mode, self.can_stream, self.can_embed)
            assert p.count_tokens([{"role": "user", "content": "hello there"}]) > 0
        self.run(provider_factory, body)

    def test_chat_returns_text_and_usage(self, provider_factory):
        async def body(p: Provider) -> None:
            result = await p.chat(chat_request())
            assert isinstance(result.content, str) and result.content
            assert result.finish_reason in ("stop", "length")
            assert result.usage.prompt_tokens > 0 and result.usage.completion_tokens > 0
        self.run(provider_factory, body)

    def test_stream_ends_with_finish_reason_and_reports_usage(self, provider_factory):
        if not self.can_stream:
            pytest.skip("provider does not stream")

        async def body(p: Provider) -> None:
            deltas = await collect(p.stream(chat_request(stream=True)))
            assert "".join(d.content or "" for d in deltas)
            substantive = [d for d in deltas if d.content or d.tool_calls or d.finish_reason]
            assert substantive[-1].finish_reason in ("stop", "length"), "the last piece must carry finish_reason"
            assert sum(1 for d in deltas if d.finish_reason) == 1
            usage = [d.usage for d in deltas if d.usage]
            assert usage and usage[-1].prompt_tokens > 0 and usage[-1].completion_tokens > 0
        self.run(provider_factory, body)

    def test_early_close_of_a_stream_does_not_break_the_next_call(self, provider_factory):
        """Regression guard: a client that goes away mid-stream must not poison the shared provider."""
        if not self.can_stream:
            pytest.skip("provider does not stream")

        async def body(p: Provider) -> None:
            for _ in range(3):
                stream = p.stream(chat_request(stream=True))
                await anext(stream)
                await stream.aclose()
            assert (await p.chat(chat_request())).content
            assert any(d.finish_reason for d in await collect(p.stream(chat_request(stream=True))))
        self.run(provider_factory, body)

    def test_tools_without_tool_support_raise_not_supported(self, provider_factory):
        if self.supports_tools:
            pytest.skip("provider supports tools")

        async def body(p: Provider) -> None:
            with pytest.raises(NotSupported):
                await p.chat(chat_request(tools=[WEATHER_TOOL]))
            with pytest.raises(NotSupported):
                await collect(p.stream(chat_request(stream=True, tools=[WEATHER_TOOL])))
        self.run(provider_factory, body)

    def test_json_mode_without_support_raises_not_supported(self, provider_factory):
        if self.supports_json_mode:
            pytest.skip("provider supports JSON mode")

        async def body(p: Provider) -> None:
            with pytest.raises(NotSupported):
                await p.chat(chat_request(response_format={"type": "json_object"}))
        self.run(provider_factory, body)

    def test_embed_returns_one_vector_per_text_or_not_supported(self, provider_factory):
        async def body(p: Provider) -> None:
            if not self.can_embed:
                with pytest.raises(NotSupported):
                    await p.embed(["hello"])
                return
            result = await p.embed(["hello", "world", "hello"])
            assert len(result.vectors) == 3 and len({len(v) for v in result.vectors}) == 1
            a, b = result.vectors[0], result.vectors[2]
            cosine = sum(x * y for x, y in zip(a, b)) / (math.sqrt(sum(x * x for x in a) * sum(y * y for y in b)))
            assert cosine > 0.999, "the same text must embed the same way"
            assert result.prompt_tokens > 0
        self.run(provider_factory, body)

    def test_close_is_idempotent(self, provider_factory):
        async def body(p: Provider) -> None:
            await p.close()
            await p.close()
        self.run(provider_factory, body)

        async def used(p: Provider) -> None:
            await p.chat(chat_request())
            await p.close()
            await p.close()
        self.run(provider_factory, used)
