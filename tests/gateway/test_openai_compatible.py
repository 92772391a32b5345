"""The `openai_compatible` provider against a loopback fake OpenAI server: conformance, pass-through, tools,
and every upstream failure turned into a clean Keel error, with each request sent exactly once."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from keel.core.errors import ConfigError, UpstreamError, UpstreamRateLimited, UpstreamRejected, UpstreamTimeout
from keel.core.settings import DeploymentConfig
from keel.gateway.protocol import ChatRequest, ProviderContext
from keel.gateway.providers.openai_compatible import OpenAICompatibleProvider, parse_retry_after
from tests.conftest import eventually_async
from tests.fakes.openai_upstream import FakeOpenAI
from tests.gateway.conformance import (
    WEATHER_TOOL, ProviderConformance, chat_request, collect, expect_error, run_with,
)

KEY = "sk-test-openai-" + "k3y" * 10
ROOT = Path(__file__).resolve().parents[2]


def make(url: str, secret: str = KEY, **cfg) -> OpenAICompatibleProvider:
    config = DeploymentConfig(alias="gpt", provider="openai_compatible", model=cfg.pop("model", "gpt-fake"),
                              base_url=url, credential="openai-key", **cfg)
    return OpenAICompatibleProvider(config, ProviderContext(get_secret={"openai-key": secret}.__getitem__))


@pytest.fixture(scope="module")
def upstream():
    with FakeOpenAI(api_key=KEY) as fake:
        yield fake


@pytest.fixture
def fake(upstream):
    upstream.reset()
    return upstream


class TestOpenAICompatibleConformance(ProviderConformance):
    @pytest.fixture
    def provider_factory(self, fake):
        return lambda: make(fake.url)


def test_body_passes_unknown_params_through_with_our_model_and_usage_asked(fake):
    """Unknown OpenAI params reach the upstream; the model is the deployment's; streams ask for usage."""
    redacted = [{"role": "user", "content": "my email is <EMAIL>"}]
    body = {"model": "gpt", "messages": [{"role": "user", "content": "my email is a@b.c"}], "user": "u-1",
            "frobnicate": {"x": 1}, "stream_options": {"include_usage": False}, "max_completion_tokens": 50}
    req = ChatRequest(model="gpt", messages=redacted, max_tokens=40, body=body)

    async def body_fn(p):
        await p.chat(req)
        await collect(p.stream(req))
    run_with(make(fake.url), body_fn)
    plain, streamed = (r["body"] for r in fake.received)
    assert plain["model"] == "gpt-fake" and plain["frobnicate"] == {"x": 1} and plain["user"] == "u-1"
    assert plain["messages"] == redacted, "the (guarded) typed messages win over the raw body"
    assert plain["max_completion_tokens"] == 40 and "max_tokens" not in plain
    assert plain["stream"] is False and "stream_options" not in plain
    assert streamed["stream"] is True and streamed["stream_options"] == {"include_usage": True}
    assert fake.stats()["requests"] == 2


def test_key_sent_as_bearer_and_never_in_any_error(fake):
    run_with(make(fake.url), lambda p: p.chat(chat_request()))
    assert fake.received[-1]["headers"]["Authorization"] == f"Bearer {KEY}"
    errors = []
    for fault in ("400", "429", "500", "malformed", "reset"):
        fake.fail_next(fault)
        errors.append(run_with(make(fake.url), lambda p: expect_error(p.chat(chat_request()))))
    wrong = "sk-wrong-" + "w" * 30  # the fake echoes a wrong key in its 401 message, as OpenAI does
    errors.append(run_with(make(fake.url, secret=wrong), lambda p: expect_error(p.chat(chat_request()))))
    assert errors[-1].status == 502 and "***" in errors[-1].detail
    for err in errors:
        text = json.dumps(err.to_problem()) + str(err) + repr(err.__dict__)
        assert KEY not in text and wrong not in text


def test_missing_credential_is_a_config_error_before_any_request(fake):
    p = OpenAICompatibleProvider(DeploymentConfig(alias="gpt", provider="openai_compatible", model="m",
                                                  base_url=fake.url, credential="absent"),
                                 ProviderContext(get_secret={}.__getitem__))
    with pytest.raises(ConfigError, match="absent"):
        run_with(p, lambda p: p.chat(chat_request()))
    assert fake.stats()["requests"] == 0


def test_tools_round_trip(fake):
    async def body(p):
        first = await p.chat(chat_request("Weather in Paris?", tools=[WEATHER_TOOL], tool_choice="auto"))
        assert first.finish_reason == "tool_calls" and first.content is None
        call = first.tool_calls[0]
        assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {
            "city": "Paris"}
        messages = [{"role": "user", "content": "Weather in Paris?"},
                    {"role": "assistant", "content": None, "tool_calls": first.tool_calls},
                    {"role": "tool", "tool_call_id": call["id"], "content": "18C and sunny"}]
        second = await p.chat(chat_request(messages=messages, tools=[WEATHER_TOOL]))
        assert second.content == "The tool said: 18C and sunny" and second.finish_reason == "stop"
    run_with(make(fake.url), body)


def test_streaming_tool_calls_arrive_as_openai_deltas(fake):
    deltas = run_with(make(fake.url), lambda p: collect(p.stream(chat_request(stream=True, tools=[WEATHER_TOOL]))))
    calls: dict[int, dict] = {}
    for d in deltas:
        for tc in d.tool_calls or ():
            slot = calls.setdefault(tc["index"], {"id": None, "name": "", "arguments": ""})
            slot["id"] = tc.get("id") or slot["id"]
            slot["name"] += (tc.get("function") or {}).get("name") or ""
            slot["arguments"] += (tc.get("function") or {}).get("arguments") or ""
    assert calls[0]["id"] == "call_fake_1" and calls[0]["name"] == "get_weather"
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}
    assert [d.finish_reason for d in deltas if d.finish_reason] == ["tool_calls"]
    assert any(d.usage and d.usage.completion_tokens > 0 for d in deltas)


FAILURES = [  # fault, streaming, error class, HTTP status, retryable, text in the detail
    ("400", False, UpstreamRejected, 400, False, "HTTP 400: fake upstream fault 400"),
    ("400", True, UpstreamRejected, 400, False, "HTTP 400: fake upstream fault 400"),
    ("500", False, UpstreamError, 502, True, "HTTP 500: fake upstream fault 500"),
    ("500", True, UpstreamError, 502, True, "HTTP 500"),
    ("429", False, UpstreamRateLimited, 429, True, "HTTP 429"),
    ("429", True, UpstreamRateLimited, 429, True, "HTTP 429"),
    ("hang", False, UpstreamTimeout, 504, True, "did not answer in time"),
    ("hang", True, UpstreamTimeout, 504, True, "did not answer in time"),
    ("hang-mid", True, UpstreamTimeout, 504, True, "did not answer in time"),
    ("reset", False, UpstreamError, 502, True, "connection error"),
    ("reset", True, UpstreamError, 502, True, "connection error"),
    ("malformed", False, UpstreamError, 502, True, "malformed upstream response"),
    ("malformed", True, UpstreamError, 502, True, "malformed upstream response"),
    ("no-done", True, UpstreamError, 502, True, "malformed upstream response: the stream ended before [DONE]"),
    ("error-event", True, UpstreamError, 502, True, "fake upstream failed mid-stream"),
]


@pytest.mark.parametrize("fault,stream,cls,status,retryable,text", FAILURES,
                         ids=[f"{f[0]}-{'stream' if f[1] else 'json'}" for f in FAILURES])
def test_upstream_failure_becomes_a_clean_error_sent_once(fake, fault, stream, cls, status, retryable, text):
    fake.fail_next(fault)
    req = chat_request(stream=stream)
    err = run_with(make(fake.url, timeout_s=0.5),
                   lambda p: expect_error(p.stream(req) if stream else p.chat(req)))
    assert type(err) is cls and err.status == status and err.retryable is retryable
    assert text in err.detail and KEY not in err.detail
    assert fake.stats()["requests"] == 1, "a failed request must not be sent twice"
    if fault.isdigit():
        assert err.ids["upstream_status"] == int(fault)
        assert err.ids["upstream_message"] == f"fake upstream fault {fault}"
    if fault == "429":
        assert err.retry_after == 2.0 and err.headers["Retry-After"] == "2"


def test_stream_without_usage_ends_cleanly_and_reports_none(fake):
    fake.fail_next("no-usage")
    deltas = run_with(make(fake.url), lambda p: collect(p.stream(chat_request(stream=True))))
    assert deltas[-1].finish_reason == "stop" and not any(d.usage for d in deltas)


def test_connection_refused_is_a_clean_retryable_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connections are refused
        for stream in (False, True):
            req = chat_request(stream=stream)
            err = run_with(make(f"http://127.0.0.1:{port}/v1"),
                           lambda p: expect_error(p.stream(req) if stream else p.chat(req)))
            assert type(err) is UpstreamError and err.status == 502 and err.retryable and "connection" in err.detail


def test_early_close_hangs_up_on_the_upstream_and_full_streams_reuse_the_connection(fake):
    """Regression guard: an abandoned stream must stop upstream work, a finished one must keep the connection."""
    fake.chunk_delay = 0.02
    try:
        async def body(p):
            stream = p.stream(chat_request(stream=True))
            await anext(stream)
            await anext(stream)
            await stream.aclose()
            await eventually_async(lambda: fake.disconnects, timeout=5)
        run_with(make(fake.url), body)
        assert fake.disconnects == 1
    finally:
        fake.chunk_delay = 0.0

    async def twice(p):
        await collect(p.stream(chat_request(stream=True)))
        await collect(p.stream(chat_request(stream=True)))
        await p.chat(chat_request())
    run_with(make(fake.url), twice)
    peers = [r["peer"] for r in list(fake.received)[-3:]]
    assert peers[0] == peers[1] == peers[2], "a stream read to its end returns its connection to the pool"


def test_fault_knobs_control_endpoint_header_and_model_name(fake):
    def post(path, doc):
        req = urllib.request.Request(fake.root + path, data=json.dumps(doc).encode(), method="POST")
        return json.loads(urllib.request.urlopen(req, timeout=5).read())

    post("/_control", {"fault": "500", "times": 1})
    assert run_with(make(fake.url), lambda p: expect_error(p.chat(chat_request()))).ids["upstream_status"] == 500
    assert run_with(make(fake.url), lambda p: p.chat(chat_request())).content
    by_header = make(fake.url, options={"headers": {"x-fake-fault": "429"}})
    assert run_with(by_header, lambda p: expect_error(p.chat(chat_request()))).status == 429
    by_model = make(fake.url, model="fault:400")
    assert run_with(by_model, lambda p: expect_error(p.chat(chat_request()))).status == 400
    stats = json.loads(urllib.request.urlopen(fake.root + "/_stats", timeout=5).read())
    assert stats["requests"] == 4 and stats["faults"] == {"500": 1, "429": 1, "400": 1}
    post("/_reset", {})
    assert fake.stats()["requests"] == 0


def test_retry_after_parsing():
    assert parse_retry_after({"retry-after": "7"}) == 7.0
    assert parse_retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0
    assert parse_retry_after({"retry-after": "soon"}) is None and parse_retry_after({}) is None


def test_runs_as_a_subprocess_for_the_benchmark():
    proc = subprocess.Popen([sys.executable, "-m", "tests.fakes.openai_upstream", "--port", "0", "--latency-ms", "5"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("listening on "), line
        url = line.split()[-1]
        started = time.monotonic()
        result = run_with(make(url, secret="any"), lambda p: p.chat(chat_request()))
        assert result.content and time.monotonic() - started >= 0.005
        root = url.removesuffix("/v1")
        assert json.loads(urllib.request.urlopen(root + "/_stats", timeout=5).read())["requests"] == 1
    finally:
        proc.terminate()
        code = proc.wait(10)
        proc.stdout.close()
    assert code == 0
