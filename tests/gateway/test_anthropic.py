"""The `anthropic` provider against a loopback fake Messages API that validates requests like the real one:
conformance, OpenAI ⇄ Anthropic translation (system, tools, tool results, stream events), and failures."""

from __future__ import annotations

import json
import socket

import pytest

from keel.core.errors import NotSupported, UpstreamError, UpstreamRateLimited, UpstreamRejected, UpstreamTimeout
from keel.core.settings import DeploymentConfig
from keel.gateway.protocol import ProviderContext
from keel.gateway.providers.anthropic import AnthropicProvider, translate_messages, translate_tool_choice
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.gateway.conformance import (
    WEATHER_TOOL, ProviderConformance, chat_request, collect, expect_error, run_with,
)

KEY = "sk-ant-test-" + "s3cr3t" * 6


def make(url: str, secret: str = KEY, **cfg) -> AnthropicProvider:
    config = DeploymentConfig(alias="claude", provider="anthropic", model=cfg.pop("model", "claude-fake"),
                              base_url=url, credential="anthropic-key", **cfg)
    return AnthropicProvider(config, ProviderContext(get_secret={"anthropic-key": secret}.__getitem__))


@pytest.fixture(scope="module")
def upstream():
    with FakeAnthropic(api_key=KEY) as fake:
        yield fake


@pytest.fixture
def fake(upstream):
    upstream.reset()
    return upstream


class TestAnthropicConformance(ProviderConformance):
    supports_json_mode = False
    can_embed = False

    @pytest.fixture
    def provider_factory(self, fake):
        return lambda: make(fake.url)


CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "developer", "content": [{"type": "text", "text": "Use metric units."}]},
    {"role": "user", "content": "Weather in Paris and Oslo?"},
    {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "4C"},
    {"role": "user", "content": "Thanks!"},
]


def test_request_translates_to_the_messages_api(fake):
    """System prompts, tool calls and tool results become what the Messages API requires (the fake validates)."""
    req = chat_request(messages=CONVERSATION, tools=[WEATHER_TOOL], stop=["END"], temperature=0.2,
                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    req.max_tokens = None
    req.body.update(parallel_tool_calls=False, user="u-7")
    result = run_with(make(fake.url), lambda p: p.chat(req))
    assert result.content == "The tool said: 18C" and result.finish_reason == "stop"
    sent = fake.received[-1]
    assert sent["headers"]["x-api-key"] == KEY and sent["headers"]["anthropic-version"] == "2023-06-01"
    body = sent["body"]
    assert body["model"] == "claude-fake" and body["max_tokens"] == 1024 and body["stop_sequences"] == ["END"]
    assert body["system"] == "You are terse.\n\nUse metric units." and body["temperature"] == 0.2
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    assert body["messages"][1]["content"] == [
        {"type": "text", "text": "Checking."},
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {"city": "Oslo"}}]
    assert body["messages"][2]["content"] == [
        {"type": "tool_result", "tool_use_id": "call_1", "content": "18C"},
        {"type": "tool_result", "tool_use_id": "call_2", "content": "4C"},
        {"type": "text", "text": "Thanks!"}]
    assert body["tools"] == [{"name": "get_weather", "description": "Current weather in a city",
                              "input_schema": WEATHER_TOOL["function"]["parameters"]}]
    assert body["tool_choice"] == {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}
    assert body["metadata"] == {"user_id": "u-7"} and "stream" not in body


def test_tool_choice_and_content_mapping():
    assert translate_tool_choice("auto", None) == {"type": "auto"}
    assert translate_tool_choice("required", None) == {"type": "any"}
    assert translate_tool_choice("none", False) == {"type": "none"}
    assert translate_tool_choice(None, False) == {"type": "auto", "disable_parallel_tool_use": True}
    system, messages = translate_messages([{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0"}}]}])
    assert system == "" and messages[0]["content"][1] == {
        "type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0"}}


def test_tools_round_trip(fake):
    async def body(p):
        first = await p.chat(chat_request("Weather in Paris?", tools=[WEATHER_TOOL]))
        assert first.finish_reason == "tool_calls" and first.content == "Let me check."
        call = first.tool_calls[0]
        assert call["id"] == "toolu_fake_1" and call["type"] == "function"
        assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {
            "city": "Paris"}
        messages = [{"role": "user", "content": "Weather in Paris?"},
                    {"role": "assistant", "content": first.content, "tool_calls": first.tool_calls},
                    {"role": "tool", "tool_call_id": call["id"], "content": "18C and sunny"}]
        second = await p.chat(chat_request(messages=messages, tools=[WEATHER_TOOL]))
        assert second.content == "The tool said: 18C and sunny"
        assert second.usage.prompt_tokens > 0 and second.usage.completion_tokens > 0
    run_with(make(fake.url), body)


def test_streaming_tool_calls_become_openai_deltas(fake):
    deltas = run_with(make(fake.url), lambda p: collect(p.stream(chat_request(stream=True, tools=[WEATHER_TOOL]))))
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == "Let me check."
    pieces = [tc for d in deltas for tc in d.tool_calls or ()]
    assert pieces[0] == {"index": 0, "id": "toolu_fake_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": ""}}
    assert all(tc["index"] == 0 for tc in pieces)
    assert json.loads("".join(tc["function"]["arguments"] for tc in pieces)) == {"city": "Paris"}
    last = deltas[-1]
    assert last.finish_reason == "tool_calls" and last.usage.prompt_tokens > 0 and last.usage.completion_tokens > 0


@pytest.mark.parametrize("stream", [False, True])
def test_stop_reasons_map_to_finish_reasons(fake, stream):
    async def finish(p, **kw):
        req = chat_request(stream=stream, **kw)
        if not stream:
            result = await p.chat(req)
            return result.content, result.finish_reason
        deltas = await collect(p.stream(req))
        return "".join(d.content or "" for d in deltas), [d.finish_reason for d in deltas if d.finish_reason][0]

    async def body(p):
        assert await finish(p, max_tokens=3) == ("Hello from the ", "length")
        assert await finish(p, stop=["upstream"]) == ("Hello from the fake ", "stop")
        assert (await finish(p))[1] == "stop"
    run_with(make(fake.url), body)


def test_json_mode_and_embeddings_are_refused_before_any_request(fake):
    async def body(p):
        with pytest.raises(NotSupported, match="no JSON mode"):
            await p.chat(chat_request(response_format={"type": "json_schema", "json_schema": {"name": "x"}}))
        with pytest.raises(NotSupported, match="no JSON mode"):
            p.stream(chat_request(stream=True, response_format={"type": "json_object"}))
        with pytest.raises(NotSupported, match="cannot embed"):
            await p.embed(["hi"])
    run_with(make(fake.url), body)
    assert fake.stats()["requests"] == 0


def test_key_never_in_any_error(fake):
    errors = []
    for fault in ("400", "429", "529", "malformed", "error-event"):
        fake.fail_next(fault)
        errors.append(run_with(make(fake.url), lambda p: expect_error(p.stream(chat_request(stream=True)))))
    wrong = "sk-ant-wrong-" + "w" * 30
    errors.append(run_with(make(fake.url, secret=wrong), lambda p: expect_error(p.chat(chat_request()))))
    assert errors[-1].status == 502 and "invalid x-api-key" in errors[-1].detail
    for err in errors:
        text = json.dumps(err.to_problem()) + str(err) + repr(err.__dict__)
        assert KEY not in text and wrong not in text


FAILURES = [  # fault, streaming, error class, HTTP status, retryable, text in the detail
    ("400", False, UpstreamRejected, 400, False, "HTTP 400: fake upstream fault 400"),
    ("400", True, UpstreamRejected, 400, False, "HTTP 400: fake upstream fault 400"),
    ("500", False, UpstreamError, 502, True, "HTTP 500"),
    ("529", True, UpstreamError, 502, True, "HTTP 529"),
    ("429", False, UpstreamRateLimited, 429, True, "HTTP 429"),
    ("429", True, UpstreamRateLimited, 429, True, "HTTP 429"),
    ("hang", False, UpstreamTimeout, 504, True, "did not answer in time"),
    ("hang-mid", True, UpstreamTimeout, 504, True, "did not answer in time"),
    ("reset", False, UpstreamError, 502, True, "connection error"),
    ("reset", True, UpstreamError, 502, True, "connection error"),
    ("malformed", False, UpstreamError, 502, True, "malformed upstream response"),
    ("malformed", True, UpstreamError, 502, True, "malformed upstream response"),
    ("no-done", True, UpstreamError, 502, True, "the stream ended before message_stop"),
    ("error-event", True, UpstreamError, 502, True, "HTTP 529: Overloaded"),
]


@pytest.mark.parametrize("fault,stream,cls,status,retryable,text", FAILURES,
                         ids=[f"{f[0]}-{'stream' if f[1] else 'json'}" for f in FAILURES])
def test_upstream_failure_becomes_a_clean_error_sent_once(fake, fault, stream, cls, status, retryable, text):
    fake.fail_next(fault)
    req = chat_request(stream=stream)
    err = run_with(make(fake.url, timeout_s=0.5),
                   lambda p: expect_error(p.stream(req) if stream else p.chat(req)))
    assert type(err) is cls and err.status == status and err.retryable is retryable
    assert text in err.detail
    assert fake.stats()["requests"] == 1, "a failed request must not be sent twice"
    if fault.isdigit():
        assert err.ids["upstream_message"] == f"fake upstream fault {fault}"
    if fault == "429":
        assert err.retry_after == 2.0


def test_connection_refused_is_a_clean_retryable_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
        err = run_with(make(url), lambda p: expect_error(p.stream(chat_request(stream=True))))
    assert type(err) is UpstreamError and err.status == 502 and err.retryable and "connection" in err.detail
