"""The official `anthropic` SDK against the real server on loopback, on `/v1/messages`: messages, streams
(events in order, final usage), tools (tool_use → tool_result), system prompts, count_tokens; through a
loopback OpenAI-compatible upstream, through the `anthropic` provider to a loopback Messages API that
validates what it gets, and on the bundled local model. Policy, guards and budgets act on these requests,
their errors come back Anthropic-shaped, and the ledger holds the tokens the client was told."""

from __future__ import annotations

import json

import anthropic
import httpx
import pytest

from conftest import EMBEDDED, wait_ledger
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.openai_upstream import FakeOpenAI

pytestmark = pytest.mark.store

REPLY = "Paris is the capital of France."
WEATHER = {"name": "get_weather", "description": "Weather for a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
POLICY = """
name: messages-test
guards:
  input:  {pii: redact, secrets: block, injection: allow}
  output: {pii: allow, secrets: allow}
"""


@pytest.fixture(scope="module")
def upstreams():
    openai_fake, anthropic_fake = FakeOpenAI(reply=REPLY).start(), FakeAnthropic(reply=REPLY).start()
    yield openai_fake, anthropic_fake
    openai_fake.stop()
    anthropic_fake.stop()


@pytest.fixture(scope="module")
def srv(tmp_path_factory, module_server_factory, upstreams):
    openai_fake, anthropic_fake = upstreams
    base = tmp_path_factory.mktemp("messages")
    (base / "policy.yaml").write_text(POLICY)
    (base / "keel.yaml").write_text(f"""
models:
  - {{alias: fake, provider: openai_compatible, model: gpt-fake, base_url: {openai_fake.url},
      input_price_per_1m: 1.0, output_price_per_1m: 2.0}}
  - {{alias: other, provider: openai_compatible, model: gpt-other, base_url: {openai_fake.url}}}
  - {{alias: claude, provider: anthropic, model: claude-fake, base_url: {anthropic_fake.url}}}
  - {{alias: breaks, provider: openai_compatible, model: "fault:error-event", base_url: {openai_fake.url}}}
  - {{alias: down, provider: openai_compatible, model: "fault:500", base_url: {openai_fake.url}}}
ledger_flush_interval_s: 0.1
""")
    return module_server_factory(config=base / "keel.yaml", KEEL_POLICY_FILE=str(base / "policy.yaml"))


@pytest.fixture(scope="module")
def client(srv):
    return anthropic.Anthropic(base_url=srv.url, api_key=srv.admin_key, max_retries=0)


def new_key(srv, **kw) -> dict:
    r = srv.admin().post("/admin/keys", json={"role": "member", "name": "messages", **kw})
    assert r.status_code == 201, r.text
    return r.json()


def last_chat(fake: FakeOpenAI) -> dict:
    return [r for r in fake.received if r["path"].endswith("/chat/completions")][-1]["body"]


def events(srv, body: dict, key: str) -> list[tuple[str, dict]]:
    """The raw SSE events of a streamed request, as (event name, data)."""
    out = []
    with httpx.stream("POST", srv.url + "/v1/messages", json={**body, "stream": True}, timeout=30,
                      headers={"x-api-key": key, "anthropic-version": "2023-06-01"}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                out.append((name, json.loads(line[6:])))
    return out


def anthropic_error(r: httpx.Response, status: int, kind: str, code: str | None = None) -> dict:
    """An Anthropic-shaped error body with Keel's code and fix beside it."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == kind and body["error"]["message"], body
    assert body["fix"] and body["request_id"] == r.headers["x-request-id"], body
    if code:
        assert body["code"] == code, body
    return body


def test_message_answers_with_usage_and_ledger_row(client, srv, upstreams):
    """A plain message: Anthropic shape out, the system prompt and metadata honoured, one ledger row with the
    tokens the client was told."""
    raw = client.messages.with_raw_response.create(
        model="fake", max_tokens=64, system="You are terse.", stop_sequences=["END"],
        extra_body={"temperature": 0.5, "top_p": 0.9, "top_k": 20}, metadata={"user_id": "u-7", "use_case": "geo"},
        messages=[{"role": "user", "content": "Capital of France?"}])
    msg = raw.parse()
    assert msg.type == "message" and msg.role == "assistant" and msg.model == "fake"
    assert msg.id == "msg_" + raw.headers["x-request-id"]
    assert [b.type for b in msg.content] == ["text"] and msg.content[0].text == REPLY
    assert msg.stop_reason == "end_turn" and msg.usage.input_tokens > 0 and msg.usage.output_tokens == 6
    sent = last_chat(upstreams[0])
    assert sent["messages"] == [{"role": "system", "content": "You are terse."},
                                {"role": "user", "content": "Capital of France?"}]
    assert (sent["max_tokens"], sent["temperature"], sent["top_p"], sent["top_k"], sent["stop"], sent["user"]) == (
        64, 0.5, 0.9, 20, ["END"], "u-7")
    assert "metadata" not in sent
    row = wait_ledger(srv.extra["db_url"], f"request_id = '{raw.headers['x-request-id']}'")[0]
    assert (row.tokens_in, row.tokens_out, row.status, row.use_case) == (
        msg.usage.input_tokens, msg.usage.output_tokens, "ok", "geo")
    assert row.cost == pytest.approx((msg.usage.input_tokens * 1.0 + msg.usage.output_tokens * 2.0) / 1e6)
    assert float(raw.headers["x-keel-cost"]) == pytest.approx(row.cost)
    assert raw.headers["x-keel-deployment"] and float(raw.headers["x-keel-overhead-ms"]) >= 0


def test_system_blocks_and_bearer_key(srv, upstreams):
    """`system` as text blocks (with cache_control) is one system message; `Authorization: Bearer` works too."""
    c = anthropic.Anthropic(base_url=srv.url, api_key=None, auth_token=srv.admin_key, max_retries=0)
    msg = c.messages.create(model="fake", max_tokens=32, messages=[
        {"role": "user", "content": [{"type": "text", "text": "One"}, {"type": "text", "text": "Two"}]}],
        system=[{"type": "text", "text": "Rule A.", "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": "Rule B."}])
    assert msg.content[0].text == REPLY
    sent = last_chat(upstreams[0])["messages"]
    assert sent[0] == {"role": "system", "content": "Rule A.\n\nRule B."}
    assert sent[1] == {"role": "user", "content": [{"type": "text", "text": "One"}, {"type": "text", "text": "Two"}]}


def test_structured_output(client, upstreams):
    """`output_config.format` (a JSON schema) goes upstream as OpenAI's `response_format` json_schema."""
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    msg = client.messages.create(model="fake", max_tokens=32, messages=[{"role": "user", "content": "Answer"}],
                                 output_config={"format": {"type": "json_schema", "schema": schema}})
    assert json.loads(msg.content[0].text) == {"answer": "fake"}
    assert last_chat(upstreams[0])["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "output", "schema": schema}}


def test_stream_events_in_order_and_final_usage(client, srv):
    """The stream is message_start, ping, one text block (start, deltas, stop), message_delta, message_stop;
    the SDK's stream helper assembles the text, and its final usage is the ledger's."""
    body = {"model": "fake", "max_tokens": 64, "messages": [{"role": "user", "content": "Capital?"}]}
    got = events(srv, body, srv.admin_key)
    names = [n for n, _ in got]
    assert all(n == d["type"] for n, d in got)
    deltas = names.count("content_block_delta")
    assert names == ["message_start", "ping", "content_block_start", *["content_block_delta"] * deltas,
                     "content_block_stop", "message_delta", "message_stop"] and deltas == 6
    assert "".join(d["delta"]["text"] for n, d in got if n == "content_block_delta") == REPLY
    final = dict(got)["message_delta"]
    assert final["delta"]["stop_reason"] == "end_turn" and final["usage"]["output_tokens"] == 6

    with client.messages.stream(model="fake", max_tokens=64,
                                messages=[{"role": "user", "content": "Capital?"}]) as stream:
        text = "".join(stream.text_stream)
        message = stream.get_final_message()
        rid = stream.response.headers["x-request-id"]
    assert text == REPLY and message.content[0].text == REPLY and message.stop_reason == "end_turn"
    row = wait_ledger(srv.extra["db_url"], f"request_id = '{rid}'")[0]
    assert row.stream and row.status == "ok"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (row.tokens_in, row.tokens_out)
    assert row.tokens_in > 0 and row.tokens_out == 6


def test_tool_use_round_trip(client, upstreams):
    """A tool_use comes back with parsed input; the tool_result goes up as an OpenAI tool message answering it."""
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    first = client.messages.create(model="fake", max_tokens=64, tools=[WEATHER], messages=ask,
                                   tool_choice={"type": "any", "disable_parallel_tool_use": True})
    assert first.stop_reason == "tool_use"
    (use,) = [b for b in first.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.input == {"city": "Paris"}
    sent = last_chat(upstreams[0])
    assert sent["tools"] == [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER[
        "input_schema"], "description": "Weather for a city"}}]
    assert sent["tool_choice"] == "required" and sent["parallel_tool_calls"] is False

    second = client.messages.create(model="fake", max_tokens=64, tools=[WEATHER], messages=[
        *ask, {"role": "assistant", "content": first.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "18C and sunny"}]}])
    assert second.stop_reason == "end_turn" and second.content[0].text == "The tool said: 18C and sunny"
    msgs = last_chat(upstreams[0])["messages"]
    assert msgs[1]["role"] == "assistant" and msgs[1]["tool_calls"][0]["id"] == use.id
    assert json.loads(msgs[1]["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
    assert msgs[2] == {"role": "tool", "tool_call_id": use.id, "content": "18C and sunny"}

    with client.messages.stream(model="fake", max_tokens=64, tools=[WEATHER], messages=ask) as stream:
        streamed = stream.get_final_message()
    (use,) = [b for b in streamed.content if b.type == "tool_use"]
    assert streamed.stop_reason == "tool_use" and use.input == {"city": "Paris"}


def test_through_the_anthropic_provider(client, upstreams):
    """Messages in, Messages out through the `anthropic` provider: the loopback Messages API (which rejects
    what the real one rejects) accepts the system, the tool_use and its tool_result, streamed or not."""
    anthropic_fake = upstreams[1]
    first = client.messages.create(model="claude", max_tokens=50, system="Be brief.", tools=[WEATHER],
                                   extra_body={"top_k": 5}, messages=[{"role": "user", "content": "Weather in Paris?"}])
    (use,) = [b for b in first.content if b.type == "tool_use"]
    sent = anthropic_fake.received[-1]["body"]
    assert sent["system"] == "Be brief." and sent["tools"][0]["input_schema"] == WEATHER["input_schema"]
    assert sent["top_k"] == 5 and sent["max_tokens"] == 50
    with client.messages.stream(model="claude", max_tokens=50, tools=[WEATHER], messages=[
            {"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": first.content},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "4C"}]}]) as s:
        final = s.get_final_message()
    assert final.content[0].text.startswith("The tool said") and final.usage.output_tokens > 0
    sent = anthropic_fake.received[-1]["body"]
    assert sent["messages"][2]["content"] == [{"type": "tool_result", "tool_use_id": use.id, "content": "4C"}]


def test_count_tokens(client):
    """count_tokens answers `input_tokens` from the deployment's counter: more text and tools count more."""
    short = client.messages.count_tokens(model="fake", messages=[{"role": "user", "content": "hi"}])
    longer = client.messages.count_tokens(model="fake", messages=[{"role": "user", "content": "hi " * 200}])
    tools = client.messages.count_tokens(model="fake", messages=[{"role": "user", "content": "hi"}], tools=[WEATHER])
    assert 0 < short.input_tokens < longer.input_tokens and short.input_tokens < tools.input_tokens


def test_caller_errors_are_anthropic_shaped(srv):
    """No key, a bad key, a key not allowed the model, bodies that are not JSON or not a Messages request, and
    a body over the limit: each a 4xx the SDK understands, with Keel's code and fix."""
    ok = {"model": "fake", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    url = srv.url + "/v1/messages"
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        anthropic_error(httpx.post(srv.url + path, json=ok), 401, "authentication_error", "unauthorized")
        anthropic_error(httpx.post(srv.url + path, json=ok, headers={"x-api-key": "sk-keel-nope"}), 401,
                        "authentication_error")
        anthropic_error(httpx.post(srv.url + path, content=b"{not json", headers={"x-api-key": srv.admin_key}),
                        400, "invalid_request_error", "malformed_json")
    scoped = new_key(srv, scopes={"models": ["other"]})["key"]
    for stream in (False, True):
        body = anthropic_error(httpx.post(url, json={**ok, "stream": stream}, headers={"x-api-key": scoped}), 404,
                               "not_found_error", "not_found")
        assert "other" in body["fix"]
    anthropic_error(httpx.post(srv.url + "/v1/messages/count_tokens", json=ok, headers={"x-api-key": scoped}), 404,
                    "not_found_error")
    admin = {"x-api-key": srv.admin_key}
    missing = anthropic_error(httpx.post(url, json={k: v for k, v in ok.items() if k != "max_tokens"},
                                         headers=admin), 400, "invalid_request_error", "validation_error")
    assert "max_tokens" in missing["error"]["message"]
    for bad in ({"messages": [{"role": "system", "content": "x"}]}, {"temperature": 1.5},
                {"messages": [{"role": "user", "content": [{"type": "video"}]}]},
                {"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "n"}]}]},
                {"tools": [{"type": "web_search_20250305", "name": "web_search"}]},
                {"tools": [{"name": "bad name!", "input_schema": {"type": "object"}}]},
                {"tools": [WEATHER], "tool_choice": {"type": "sometimes"}},
                {"system": [{"type": "image"}]}, {"metadata": {"user_id": 7}}):
        r = httpx.post(url, json={**ok, **bad}, headers=admin)
        anthropic_error(r, 400, "invalid_request_error")
    big = {**ok, "messages": [{"role": "user", "content": "x" * (11 * 1024 * 1024)}]}
    assert httpx.post(url, json=big, headers=admin, timeout=60).status_code == 413
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=srv.url, api_key="sk-keel-nope", max_retries=0).messages.create(**ok)


def test_upstream_failures(srv):
    """An upstream failure before the answer is a 5xx api_error; one mid-stream ends the stream with an
    Anthropic `error` event after what was already sent, and no message_stop."""
    body = {"max_tokens": 32, "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(srv.url + "/v1/messages", json={**body, "model": "down"}, headers={"x-api-key": srv.admin_key})
    anthropic_error(r, 502, "api_error", "upstream_error")
    got = events(srv, {**body, "model": "breaks"}, srv.admin_key)
    names = [n for n, _ in got]
    assert names[:2] == ["message_start", "ping"] and names[-1] == "error" and "message_stop" not in names
    err = got[-1][1]
    assert err["type"] == "error" and err["error"]["type"] == "api_error" and err["code"] == "upstream_error"


def test_guards_act_on_messages(client, srv, upstreams):
    """The input PII guard redacts before the upstream (and restores for the caller); a secret is blocked
    with a 403 permission_error, in the stream too, before any byte."""
    msg = client.messages.create(model="fake", max_tokens=32, messages=[
        {"role": "user", "content": "Mail ada@example.com about it"}])
    assert msg.content[0].text == REPLY
    sent = json.dumps(last_chat(upstreams[0])["messages"])
    assert "ada@example.com" not in sent and "<EMAIL_" in sent
    secret = {"model": "fake", "max_tokens": 8, "messages": [{"role": "user", "content": "key AKIAIOSFODNN7EXAMPLE"}]}
    for stream in (False, True):
        r = httpx.post(srv.url + "/v1/messages", json={**secret, "stream": stream},
                       headers={"x-api-key": srv.admin_key})
        anthropic_error(r, 403, "permission_error", "guard_blocked")
    with pytest.raises(anthropic.PermissionDeniedError):
        client.messages.create(**secret)


def test_budget_refusal_is_anthropic_shaped(srv):
    """A key whose budget cannot cover the worst case gets 402 billing_error; the ledger records the refusal."""
    key = new_key(srv)
    r = srv.admin().post("/admin/budgets", json={"scope": "key", "scope_id": key["id"], "amount": 1e-6,
                                                 "period": "day"})
    assert r.status_code == 201, r.text
    r = httpx.post(srv.url + "/v1/messages", headers={"x-api-key": key["key"]},
                   json={"model": "fake", "max_tokens": 500, "messages": [{"role": "user", "content": "hi"}]})
    anthropic_error(r, 402, "billing_error", "budget_exceeded")
    row = wait_ledger(srv.extra["db_url"], f"request_id = '{r.headers['x-request-id']}'")[0]
    assert row.status == "error" and row.error_code == "budget_exceeded" and row.http_status == 402


def test_rate_limit_is_anthropic_shaped(srv):
    """Past the key's requests per minute: 429 rate_limit_error with Retry-After, which the SDK reads."""
    key = new_key(srv)
    assert srv.admin().put(f"/admin/limits/keys/{key['id']}", json={"rpm": 1}).status_code == 200
    body = {"model": "fake", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    first = httpx.post(srv.url + "/v1/messages", json=body, headers={"x-api-key": key["key"]})
    assert first.status_code == 200 and first.headers["x-ratelimit-limit-requests"] == "1", first.headers
    r = httpx.post(srv.url + "/v1/messages", json=body, headers={"x-api-key": key["key"]})
    anthropic_error(r, 429, "rate_limit_error", "rate_limited")
    assert int(r.headers["retry-after"]) >= 1


# -- the bundled local model ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def local(module_server_factory):
    return module_server_factory(**EMBEDDED)


def test_local_model_messages_stream_and_count_tokens(local):
    """One real run on the bundled model: generated text, count_tokens equal to the prompt tokens the model
    was charged, and a streamed answer whose final usage is the ledger's."""
    c = anthropic.Anthropic(base_url=local.url, api_key=local.admin_key, max_retries=0)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    msg = c.messages.create(model="local-chat", max_tokens=16, extra_body={"temperature": 0}, system="Answer briefly.",
                            messages=messages)
    assert msg.content and msg.content[0].text.strip()
    assert msg.stop_reason in ("end_turn", "max_tokens") and 0 < msg.usage.output_tokens <= 16
    counted = c.messages.count_tokens(model="local-chat", system="Answer briefly.", messages=messages)
    assert counted.input_tokens == msg.usage.input_tokens
    with c.messages.stream(model="local-chat", max_tokens=12, extra_body={"temperature": 0},
                           messages=messages) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
        rid = stream.response.headers["x-request-id"]
    assert text.strip() and final.content[0].text == text
    row = wait_ledger(local.extra["db_url"], f"request_id = '{rid}'")[0]
    assert (row.tokens_in, row.tokens_out) == (final.usage.input_tokens, final.usage.output_tokens)
    assert row.tokens_out > 0
