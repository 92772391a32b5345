"""The `bedrock` provider against a loopback fake Bedrock runtime that checks SigV4 signatures with its own
implementation of AWS's algorithm, frames streams in AWS's binary event stream format and validates requests
like the Converse API: conformance, translation (system, toolConfig, toolUse/toolResult turns), the event
stream read back as OpenAI deltas, and failures (throttling, exceptions mid-stream, a broken CRC)."""

from __future__ import annotations

import json
import socket

import orjson
import pytest
from botocore.eventstream import EventStreamBuffer

from keel.core.errors import (
    ConfigError, NotSupported, UpstreamError, UpstreamRateLimited, UpstreamRefused, UpstreamRejected, UpstreamTimeout,
)
from keel.core.settings import DeploymentConfig
from keel.gateway import registry
from keel.gateway.protocol import ProviderContext
from keel.gateway.providers.bedrock import BedrockProvider
from tests.fakes.bedrock_upstream import FakeBedrock, event
from tests.gateway.conformance import (
    WEATHER_TOOL, ProviderConformance, chat_request, collect, expect_error, run_with,
)

ACCESS, SECRET = "AKIAKEELTEST", "keel/test+secret" + "s3cr3t" * 5
CREDS = orjson.dumps({"access_key_id": ACCESS, "secret_access_key": SECRET, "session_token": "tok-" + "t" * 20})
MODEL = "anthropic.claude-3-5-haiku-20241022-v1:0"
API_KEY = "ABSK" + "k3y" * 10


def make(url: str, secret: str | bytes = CREDS, **cfg) -> BedrockProvider:
    secret = secret.decode() if isinstance(secret, bytes) else secret
    config = DeploymentConfig(alias="claude", provider="bedrock", model=cfg.pop("model", MODEL), base_url=url,
                              credential="aws", options=cfg.pop("options", {"region": "eu-west-1"}), **cfg)
    return registry.get("bedrock")(config, ProviderContext(get_secret={"aws": secret}.__getitem__))


@pytest.fixture(scope="module")
def upstream():
    with FakeBedrock(access_key=ACCESS, secret_key=SECRET, api_key=API_KEY) as fake:
        yield fake


@pytest.fixture
def fake(upstream):
    upstream.reset()
    return upstream


class TestBedrockConformance(ProviderConformance):
    supports_json_mode = False
    can_embed = False

    @pytest.fixture
    def provider_factory(self, fake):
        return lambda: make(fake.url)


def test_the_fake_frames_what_botocores_parser_reads():
    """The fake's event stream framing is AWS's: botocore's parser reads it back, CRCs and headers."""
    buffer = EventStreamBuffer()
    raw = event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "hi"}})
    buffer.add_data(raw[:7])
    assert list(buffer) == []
    buffer.add_data(raw[7:])
    [message] = list(buffer)
    assert message.headers[":event-type"] == "contentBlockDelta"
    assert orjson.loads(message.payload)["delta"] == {"text": "hi"}


CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Paris and Oslo?"},
    {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
    {"role": "tool", "tool_call_id": "call_2", "content": '{"celsius": 4}'},
    {"role": "user", "content": "Thanks!"},
]


def test_request_is_signed_and_translates_to_converse(fake):
    req = chat_request(messages=CONVERSATION, tools=[WEATHER_TOOL], tool_choice="auto", max_tokens=50,
                       temperature=0.1, stop=["END"])
    result = run_with(make(fake.url), lambda p: p.chat(req))
    seen = fake.received[-1]
    assert seen["path"] == f"/model/{MODEL}/converse"
    auth = seen["headers"]["Authorization"]
    assert auth.startswith(f"AWS4-HMAC-SHA256 Credential={ACCESS}/") and "/eu-west-1/bedrock/aws4_request" in auth
    assert seen["headers"]["X-Amz-Security-Token"] == "tok-" + "t" * 20
    body = seen["body"]
    assert body["system"] == [{"text": "You are terse."}]
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    assert body["messages"][1]["content"][1:] == [
        {"toolUse": {"toolUseId": "call_1", "name": "get_weather", "input": {"city": "Paris"}}},
        {"toolUse": {"toolUseId": "call_2", "name": "get_weather", "input": {"city": "Oslo"}}}]
    assert body["messages"][2]["content"] == [
        {"toolResult": {"toolUseId": "call_1", "content": [{"text": "18C"}], "status": "success"}},
        {"toolResult": {"toolUseId": "call_2", "content": [{"json": {"celsius": 4}}], "status": "success"}},
        {"text": "Thanks!"}]
    spec = {"name": "get_weather", "description": "Current weather in a city",
            "inputSchema": {"json": WEATHER_TOOL["function"]["parameters"]}}
    assert body["toolConfig"] == {"tools": [{"toolSpec": spec}], "toolChoice": {"auto": {}}}
    assert body["inferenceConfig"] == {"maxTokens": 50, "temperature": 0.1, "stopSequences": ["END"]}
    assert result.content.startswith("The tool said:") and result.usage.prompt_tokens > 0


def test_tool_use_comes_back_as_tool_calls_json_and_streamed(fake):
    req = chat_request(tools=[WEATHER_TOOL], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    result = run_with(make(fake.url), lambda p: p.chat(req))
    assert fake.received[-1]["body"]["toolConfig"]["toolChoice"] == {"tool": {"name": "get_weather"}}
    assert result.finish_reason == "tool_calls" and result.content == "Let me check."
    assert result.tool_calls == [{"id": "tooluse_fake_1", "type": "function",
                                  "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]
    deltas = run_with(make(fake.url), lambda p: collect(p.stream(chat_request(stream=True, tools=[WEATHER_TOOL]))))
    calls = [c for d in deltas for c in d.tool_calls or ()]
    assert calls[0] == {"index": 0, "id": "tooluse_fake_1", "type": "function",
                        "function": {"name": "get_weather", "arguments": ""}}
    assert json.loads("".join(c["function"]["arguments"] for c in calls)) == {"city": "Paris"}
    assert "".join(d.content or "" for d in deltas) == "Let me check."
    assert [d.finish_reason for d in deltas if d.finish_reason] == ["tool_calls"]


def test_stop_reasons(fake):
    assert run_with(make(fake.url), lambda p: p.chat(chat_request(max_tokens=2))).finish_reason == "length"
    deltas = run_with(make(fake.url), lambda p: collect(p.stream(chat_request(stream=True, max_tokens=2))))
    assert deltas[-1].finish_reason == "length" and deltas[-1].usage.completion_tokens == 2


def test_a_wrong_secret_key_is_refused_by_the_signature_check_and_never_shown(fake):
    wrong = orjson.dumps({"access_key_id": ACCESS, "secret_access_key": "wrong/" + "w" * 30}).decode()
    err = run_with(make(fake.url, secret=wrong), lambda p: expect_error(p.chat(chat_request())))
    assert isinstance(err, UpstreamRefused) and "signature we calculated does not match" in err.detail
    assert "wrong/" not in json.dumps(err.to_problem()) + repr(err.__dict__)
    for fault in ("400", "429", "malformed", "error-event"):
        fake.fail_next(fault)
        e = run_with(make(fake.url), lambda p: expect_error(p.stream(chat_request(stream=True))))
        assert SECRET not in json.dumps(e.to_problem()) + repr(e.__dict__)


def test_an_inference_profile_arn_is_sent_percent_encoded_and_signed_as_such(fake):
    arn = "arn:aws:bedrock:eu-west-1:123456789012:inference-profile/eu.anthropic.claude-3-5-haiku-v1:0"
    result = run_with(make(fake.url, model=arn), lambda p: p.chat(chat_request()))
    assert result.content and fake.received[-1]["path"] == f"/model/{arn}/converse"  # the signature held


def test_a_bedrock_api_key_is_sent_as_a_bearer_token(fake):
    run_with(make(fake.url, secret=API_KEY), lambda p: p.chat(chat_request()))
    assert fake.received[-1]["headers"]["Authorization"] == f"Bearer {API_KEY}"


def test_region_and_endpoint_come_from_options_or_the_host():
    p = make("", options={"region": "ap-south-1"})
    assert p.chat_url == f"https://bedrock-runtime.ap-south-1.amazonaws.com/model/{MODEL.replace(':', '%3A')}/converse"
    assert make("https://bedrock-runtime.us-west-2.amazonaws.com", options={}).region == "us-west-2"
    with pytest.raises(ConfigError, match="access_key_id"):
        run_with(make("http://127.0.0.1:9", secret='{"key": 1}'), lambda p: p.chat(chat_request()))


def test_json_mode_n_and_embeddings_are_refused_before_any_request(fake):
    with pytest.raises(NotSupported):
        run_with(make(fake.url), lambda p: p.chat(chat_request(response_format={"type": "json_object"})))
    req = chat_request()
    req.body["n"] = 3
    with pytest.raises(NotSupported):
        run_with(make(fake.url), lambda p: p.chat(req))
    assert fake.stats()["requests"] == 0


FAILURES = [  # fault, streaming, error class, HTTP status, retryable, text in the detail
    ("400", False, UpstreamRejected, 400, False, "HTTP 400: fake upstream fault 400"),
    ("400", True, UpstreamRejected, 400, False, "HTTP 400: fake upstream fault 400"),
    ("500", False, UpstreamError, 502, True, "HTTP 500"),
    ("503", True, UpstreamError, 502, True, "HTTP 503"),
    ("429", False, UpstreamRateLimited, 429, True, "HTTP 429"),
    ("429", True, UpstreamRateLimited, 429, True, "HTTP 429"),
    ("hang", False, UpstreamTimeout, 504, True, "did not answer in time"),
    ("hang-mid", True, UpstreamTimeout, 504, True, "did not answer in time"),
    ("reset", False, UpstreamError, 502, True, "connection error"),
    ("reset", True, UpstreamError, 502, True, "connection error"),
    ("malformed", False, UpstreamError, 502, True, "malformed upstream response"),
    ("malformed", True, UpstreamError, 502, True, "malformed upstream response: ChecksumMismatch"),
    ("no-done", True, UpstreamError, 502, True, "the stream ended before messageStop"),
    ("error-event", True, UpstreamError, 502, True, "HTTP 503: Bedrock is unable to process your request."),
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


def test_a_throttling_exception_mid_stream_is_a_rate_limit():
    """Bedrock reports throttling inside an accepted stream as an exception message, not an HTTP 429."""
    class Throttled(FakeBedrock):
        def error_event(self) -> bytes:
            from tests.fakes.bedrock_upstream import exception
            return exception("throttlingException", "Too many requests, please wait before trying again.")

    with Throttled(access_key=ACCESS, secret_key=SECRET) as fake:
        fake.fail_next("error-event")
        err = run_with(make(fake.url), lambda p: expect_error(p.stream(chat_request(stream=True))))
    assert isinstance(err, UpstreamRateLimited) and "Too many requests" in err.detail


def test_connection_refused_is_a_clean_retryable_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
        err = run_with(make(url), lambda p: expect_error(p.stream(chat_request(stream=True))))
    assert type(err) is UpstreamError and err.status == 502 and err.retryable and "connection" in err.detail
