"""The `gemini` provider against a loopback fake Gemini API that validates requests like the real one:
conformance, OpenAI ⇄ Gemini translation (systemInstruction, functionDeclarations, functionCall and
functionResponse turns, JSON mode), streamed SSE chunks, usageMetadata, and failures (429 with RetryInfo)."""

from __future__ import annotations

import json
import socket

import pytest

from keel.core.errors import BadRequest, NotSupported, UpstreamError, UpstreamRateLimited, UpstreamRejected, UpstreamTimeout
from keel.core.settings import DeploymentConfig
from keel.gateway import registry
from keel.gateway.protocol import ProviderContext
from keel.gateway.providers.gemini import GeminiProvider
from tests.fakes.gemini_upstream import FakeGemini
from tests.gateway.conformance import (
    WEATHER_TOOL, ProviderConformance, chat_request, collect, expect_error, run_with,
)

KEY = "AIza" + "s3cr3t" * 6


def make(url: str, secret: str = KEY, **cfg) -> GeminiProvider:
    config = DeploymentConfig(alias="gemini", provider="gemini", model=cfg.pop("model", "gemini-fake"),
                              base_url=url, credential="google", **cfg)
    return registry.get("gemini")(config, ProviderContext(get_secret={"google": secret}.__getitem__))


@pytest.fixture(scope="module")
def upstream():
    with FakeGemini(api_key=KEY) as fake:
        yield fake


@pytest.fixture
def fake(upstream):
    upstream.reset()
    return upstream


class TestGeminiConformance(ProviderConformance):
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
    {"role": "tool", "tool_call_id": "call_1", "content": '{"celsius": 18}'},
    {"role": "tool", "tool_call_id": "call_2", "content": "4C"},
]


def test_request_translates_to_generate_content(fake):
    req = chat_request(messages=CONVERSATION, tools=[WEATHER_TOOL], tool_choice="auto", temperature=0.2,
                       stop=["END"], max_tokens=50)
    result = run_with(make(fake.url), lambda p: p.chat(req))
    seen = fake.received[-1]
    assert seen["path"] == "/v1beta/models/gemini-fake:generateContent"
    assert seen["headers"]["x-goog-api-key"] == KEY
    body = seen["body"]
    assert body["systemInstruction"] == {"parts": [{"text": "You are terse.\n\nUse metric units."}]}
    assert [c["role"] for c in body["contents"]] == ["user", "model", "user"]
    assert body["contents"][1]["parts"][1:] == [{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}},
                                                {"functionCall": {"name": "get_weather", "args": {"city": "Oslo"}}}]
    assert body["contents"][2]["parts"] == [
        {"functionResponse": {"name": "get_weather", "response": {"celsius": 18}}},
        {"functionResponse": {"name": "get_weather", "response": {"result": "4C"}}}]
    declared = {"name": "get_weather", "description": "Current weather in a city",
                "parametersJsonSchema": WEATHER_TOOL["function"]["parameters"]}
    assert body["tools"] == [{"functionDeclarations": [declared]}]
    assert body["toolConfig"] == {"functionCallingConfig": {"mode": "AUTO"}}
    assert body["generationConfig"] == {"maxOutputTokens": 50, "temperature": 0.2, "stopSequences": ["END"]}
    assert result.content.startswith("The tool said:") and result.finish_reason == "stop"
    assert result.usage.prompt_tokens > 0 and result.usage.completion_tokens > 0


def test_function_calls_come_back_as_openai_tool_calls(fake):
    req = chat_request(tools=[WEATHER_TOOL], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    result = run_with(make(fake.url), lambda p: p.chat(req))
    assert fake.received[-1]["body"]["toolConfig"] == {
        "functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}}
    assert result.finish_reason == "tool_calls" and result.content is None
    assert [json.loads(c["function"]["arguments"]) for c in result.tool_calls] == [{"city": "Paris"}]
    deltas = run_with(make(fake.url), lambda p: collect(p.stream(chat_request(stream=True, tools=[WEATHER_TOOL]))))
    calls = [c for d in deltas for c in d.tool_calls or ()]
    assert calls == [{"index": 0, "id": "call_0", "type": "function",
                      "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]
    assert [d.finish_reason for d in deltas if d.finish_reason] == ["tool_calls"]


def test_stream_uses_alt_sse_and_reports_the_final_usage_once(fake):
    deltas = run_with(make(fake.url), lambda p: collect(p.stream(chat_request(stream=True, max_tokens=100))))
    assert fake.received[-1]["path"] == "/v1beta/models/gemini-fake:streamGenerateContent"
    usage = [d.usage for d in deltas if d.usage]
    assert len(usage) == 1 and usage[0].completion_tokens == len(deltas)  # the last chunk's, not a partial one
    assert deltas[0].role == "assistant"


def test_json_mode_and_max_tokens(fake):
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    req = chat_request(response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    result = run_with(make(fake.url), lambda p: p.chat(req))
    config = fake.received[-1]["body"]["generationConfig"]
    assert config["responseMimeType"] == "application/json" and config["responseJsonSchema"] == schema
    assert json.loads(result.content) == {"answer": "fake"}
    result = run_with(make(fake.url), lambda p: p.chat(chat_request(max_tokens=2)))
    assert result.finish_reason == "length"


def test_a_tool_result_without_its_call_is_the_callers_mistake_before_any_request(fake):
    req = chat_request(messages=[{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "x",
                                                                     "content": "1"}])
    with pytest.raises(BadRequest, match="tool_call_id"):
        run_with(make(fake.url), lambda p: p.chat(req))
    assert fake.stats()["requests"] == 0


def test_a_blocked_prompt_is_a_content_filter_finish_with_its_usage(fake):
    result = run_with(make(fake.url, model="blocked"), lambda p: p.chat(chat_request()))
    assert (result.content, result.finish_reason, result.tool_calls) == ("", "content_filter", None)
    assert result.usage.prompt_tokens > 0
    deltas = run_with(make(fake.url, model="blocked"), lambda p: collect(p.stream(chat_request(stream=True))))
    assert [d.finish_reason for d in deltas if d.finish_reason] == ["content_filter"] and deltas[-1].usage


def test_thought_parts_are_not_content_and_thinking_tokens_count_as_output(fake):
    result = run_with(make(fake.url, model="gemini-fake-thinking"), lambda p: p.chat(chat_request(max_tokens=100)))
    plain = run_with(make(fake.url), lambda p: p.chat(chat_request(max_tokens=100)))
    assert result.content == plain.content and "think" not in result.content
    assert result.usage.completion_tokens == plain.usage.completion_tokens + 7
    deltas = run_with(make(fake.url, model="gemini-fake-thinking"),
                      lambda p: collect(p.stream(chat_request(stream=True, max_tokens=100))))
    assert "".join(d.content or "" for d in deltas) == plain.content
    assert deltas[-1].usage.completion_tokens == plain.usage.completion_tokens + 7


def test_more_than_one_choice_is_refused_before_any_request(fake):
    req = chat_request()
    req.body["n"] = 2
    with pytest.raises(NotSupported):
        run_with(make(fake.url), lambda p: p.chat(req))
    assert fake.stats()["requests"] == 0


def test_key_never_in_any_error(fake):
    wrong = "AIza-wrong-" + "w" * 30
    err = run_with(make(fake.url, secret=wrong), lambda p: expect_error(p.chat(chat_request())))
    assert err.status == 400 and "API key not valid" in err.detail
    for fault in ("400", "429", "malformed", "error-event"):
        fake.fail_next(fault)
        e = run_with(make(fake.url), lambda p: expect_error(p.stream(chat_request(stream=True))))
        for text in (json.dumps(e.to_problem()), str(e), repr(e.__dict__)):
            assert KEY not in text and wrong not in text


FAILURES = [  # fault, streaming, error class, HTTP status, retryable, text in the detail
    ("400", False, UpstreamRejected, 400, False, "HTTP 400: fake upstream fault 400"),
    ("500", True, UpstreamError, 502, True, "HTTP 500"),
    ("429", False, UpstreamRateLimited, 429, True, "HTTP 429"),
    ("429", True, UpstreamRateLimited, 429, True, "HTTP 429"),
    ("hang", False, UpstreamTimeout, 504, True, "did not answer in time"),
    ("hang-mid", True, UpstreamTimeout, 504, True, "did not answer in time"),
    ("reset", False, UpstreamError, 502, True, "connection error"),
    ("reset", True, UpstreamError, 502, True, "connection error"),
    ("malformed", False, UpstreamError, 502, True, "malformed upstream response"),
    ("malformed", True, UpstreamError, 502, True, "malformed upstream response"),
    ("no-done", True, UpstreamError, 502, True, "the stream ended before a finishReason"),
    ("error-event", True, UpstreamError, 502, True, "HTTP 503: The model is overloaded"),
]


@pytest.mark.parametrize("fault,stream,cls,status,retryable,text", FAILURES,
                         ids=[f"{f[0]}-{'stream' if f[1] else 'json'}" for f in FAILURES])
def test_upstream_failure_becomes_a_clean_error_sent_once(fake, fault, stream, cls, status, retryable, text):
    fake.fail_next(fault)
    req = chat_request(stream=stream)
    err = run_with(make(fake.url, timeout_s=0.5), lambda p: expect_error(p.stream(req) if stream else p.chat(req)))
    assert type(err) is cls and err.status == status and err.retryable is retryable, (type(err), err.detail)
    assert text in err.detail
    assert fake.stats()["requests"] == 1, "a failed request must not be sent twice"
    if fault == "429":
        assert err.retry_after == 2.0 and err.headers["Retry-After"] == "2"  # from RetryInfo.retryDelay


def test_connection_refused_is_a_clean_retryable_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1beta"
        err = run_with(make(url), lambda p: expect_error(p.stream(chat_request(stream=True))))
    assert type(err) is UpstreamError and err.status == 502 and err.retryable and "connection" in err.detail
