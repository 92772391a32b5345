"""The OpenAI Responses API (`/v1/responses`) with the official `openai` SDK against a real Keel on loopback,
served by a scripted loopback OpenAI-compatible upstream (and once by the bundled local model): plain and
streamed answers (events in order), function tools round trip, structured output, `previous_response_id`,
retrieve and delete scoped to the caller, governance refusals, and ledger rows."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from conftest import ADMIN_KEY, problem, wait_ledger
from tests.fakes import DEFAULT_REPLY
from tests.fakes.openai_upstream import FakeOpenAI
from tests.governance.conftest import Keys

WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"],
          "additionalProperties": False}
# Restricted data stays on-prem (so `fake` is refused for it); secrets in a prompt are blocked.
POLICY = """
name: ingress-test
data_rules:
  - {name: restricted-on-prem-only, classification: restricted, providers: [local]}
guards:
  input: {pii: allow, secrets: block, injection: allow}
"""


@pytest.fixture(scope="module")
def fake():
    with FakeOpenAI() as upstream:
        yield upstream


@pytest.fixture(scope="module")
def srv(module_server_factory, tmp_path_factory, fake):
    base = tmp_path_factory.mktemp("responses")
    (base / "policy.yaml").write_text(POLICY)
    (base / "keel.yaml").write_text(f"""
models:
  - {{alias: fake, provider: openai_compatible, model: gpt-fake, id: fake/remote, base_url: {fake.url},
      input_price_per_1m: 1.0, output_price_per_1m: 2.0}}
ledger_flush_interval_s: 0.1
""")
    return module_server_factory(config=base / "keel.yaml", KEEL_POLICY_FILE=str(base / "policy.yaml"))


@pytest.fixture(scope="module")
def keys(srv) -> Keys:
    return Keys(srv)


def sdk(srv, key: str = ADMIN_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0)


@pytest.fixture
def red(srv, keys) -> openai.OpenAI:
    return sdk(srv, keys.keys[("member", "red")])


def upstream_body(fake) -> dict:
    return [r for r in fake.received if r["path"].endswith("/chat/completions")][-1]["body"]


def ledger_row(srv, response_id: str):
    rid = "req_" + response_id.removeprefix("resp_")
    return wait_ledger(srv.extra["db_url"], f"request_id = '{rid}'")[0]


def test_create_answers_with_output_text_usage_and_a_ledger_row(srv, red, fake):
    raw = red.responses.with_raw_response.create(model="fake", input="hello", instructions="Be brief.",
                                                 max_output_tokens=50, temperature=0.2, metadata={"use_case": "r"})
    resp = raw.parse()
    assert resp.status == "completed" and resp.object == "response" and resp.id.startswith("resp_")
    assert resp.output_text == DEFAULT_REPLY and resp.model == "fake"
    assert resp.output[0].type == "message" and resp.output[0].role == "assistant"
    assert resp.usage.input_tokens > 0 and resp.usage.output_tokens > 0
    assert resp.usage.total_tokens == resp.usage.input_tokens + resp.usage.output_tokens
    assert raw.headers["x-keel-deployment"] == "fake/remote"
    body = upstream_body(fake)
    assert body["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    assert body["temperature"] == 0.2 and 50 in (body.get("max_tokens"), body.get("max_completion_tokens"))
    row = ledger_row(srv, resp.id)
    assert row.status == "ok" and row.kind == "chat" and row.alias == "fake" and row.use_case == "r"
    assert (row.tokens_in, row.tokens_out) == (resp.usage.input_tokens, resp.usage.output_tokens)
    assert row.cost == pytest.approx((row.tokens_in * 1.0 + row.tokens_out * 2.0) / 1e6)
    assert float(raw.headers["x-keel-cost"]) == pytest.approx(row.cost)


def test_stream_sends_the_responses_events_in_order(srv, red):
    events = list(red.responses.create(model="fake", input="hello", stream=True))
    types = [e.type for e in events]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert types == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * len(deltas),
                     "response.output_text.done", "response.content_part.done", "response.output_item.done",
                     "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(deltas) == DEFAULT_REPLY and len(deltas) > 1
    done = events[-1].response
    assert done.status == "completed" and done.output_text == DEFAULT_REPLY
    assert done.usage.output_tokens > 0 and done.usage.input_tokens > 0
    assert events[0].response.status == "in_progress" and events[0].response.id == done.id
    row = ledger_row(srv, done.id)
    assert row.stream and row.status == "ok" and row.tokens_out == done.usage.output_tokens
    assert red.responses.retrieve(done.id).output_text == DEFAULT_REPLY, "a streamed response is stored too"


def test_get_right_after_post_returns_exactly_what_was_answered(srv, keys):
    """Read-your-writes on the raw wire, before the stored row's batch is written: GET returns the answered
    object byte-for-byte equal as JSON, plain and streamed (the `response.completed` event's response)."""
    h = {"Authorization": f"Bearer {keys.keys[('member', 'red')]}"}
    with httpx.Client(base_url=srv.url, headers=h, timeout=30) as http:
        made = http.post("/v1/responses", json={"model": "fake", "input": "exact", "metadata": {"k": "ü✓"}})
        assert made.status_code == 200
        got = http.get(f"/v1/responses/{made.json()['id']}")
        assert got.status_code == 200 and got.json() == made.json()
        streamed = http.post("/v1/responses", json={"model": "fake", "input": "exact", "stream": True})
        events = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: ")]
        assert [e["sequence_number"] for e in events] == list(range(len(events)))
        assert events[0]["response"] == events[1]["response"] and events[1]["type"] == "response.in_progress"
        done = events[-1]
        assert done["type"] == "response.completed"
        assert http.get(f"/v1/responses/{done['response']['id']}").json() == done["response"]


def test_an_upstream_failure_mid_stream_ends_it_with_an_error_event(srv, red, fake):
    fake.fail_next("error-event")
    seen = []
    with pytest.raises(openai.APIError) as failed:
        for event in red.responses.create(model="fake", input="hello", stream=True):
            seen.append(event.type)
    assert seen[:2] == ["response.created", "response.in_progress"] and "response.completed" not in seen
    assert "upstream" in str(failed.value.message) or "failed" in str(failed.value.message)
    done = [e for e in (red.responses.create(model="fake", input="hello", stream=True)) if e.type == "response.completed"]
    assert len(done) == 1, "the next stream is whole again"


def test_stream_helper_accumulates_the_final_response(red):
    """The SDK's `responses.stream()` rebuilds the response from the events: they must fit together."""
    with red.responses.stream(model="fake", input="hello") as stream:
        texts = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(texts) == final.output_text == DEFAULT_REPLY


def test_function_tool_round_trip_with_function_call_output(red, fake):
    first = red.responses.create(model="fake", input="Weather in Paris?", tools=[WEATHER])
    [call] = first.output
    assert call.type == "function_call" and call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    sent = upstream_body(fake)
    assert sent["tools"] == [{"type": "function", "function": {k: WEATHER[k] for k in ("name", "description",
                                                                                         "parameters")}}]
    second = red.responses.create(model="fake", previous_response_id=first.id, tools=[WEATHER], input=[
        {"type": "function_call_output", "call_id": call.call_id, "output": "18C and sunny"}])
    assert second.output_text == "The tool said: 18C and sunny"
    assert upstream_body(fake)["messages"] == [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [
            {"id": call.call_id, "type": "function", "function": {"name": "get_weather", "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "18C and sunny"}]
    # The same turn with every item sent by the caller and nothing stored.
    third = red.responses.create(model="fake", store=False, tools=[WEATHER], input=[
        {"role": "user", "content": "Weather in Paris?"}, call.model_dump(exclude_none=True),
        {"type": "function_call_output", "call_id": call.call_id, "output": "18C and sunny"}])
    assert third.output_text == second.output_text
    with pytest.raises(openai.NotFoundError):
        red.responses.retrieve(third.id)


def test_function_call_streams_its_arguments(red):
    events = list(red.responses.create(model="fake", input="Weather?", tools=[WEATHER],
                                       tool_choice={"type": "function", "name": "get_weather"}, stream=True))
    types = [e.type for e in events]
    assert types[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert types[-3:] == ["response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert json.loads(args) == {"city": "Paris"} and events[-3].arguments == args
    assert events[2].item.type == "function_call" and events[2].item.name == "get_weather"
    [item] = events[-1].response.output
    assert item.type == "function_call" and item.arguments == args


def test_structured_output_json_schema_and_json_object(red, fake):
    resp = red.responses.create(model="fake", input="What is the capital of France?", text={"format": {
        "type": "json_schema", "name": "answer", "schema": SCHEMA, "strict": True}})
    assert json.loads(resp.output_text) == {"answer": "fake"}
    assert upstream_body(fake)["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
    assert resp.text.format.type == "json_schema"
    resp = red.responses.create(model="fake", input="What is the capital of France, in JSON?", text={"format": {"type": "json_object"}})
    assert json.loads(resp.output_text) == {"answer": "fake"}
    assert upstream_body(fake)["response_format"] == {"type": "json_object"}


def test_previous_response_id_continues_the_conversation(red, fake):
    """The earlier input and output come first; the earlier instructions do not carry over (as OpenAI)."""
    one = red.responses.create(model="fake", input="My name is Ada.", instructions="Be nice.")
    two = red.responses.create(model="fake", input="What is my name?", previous_response_id=one.id)
    assert two.previous_response_id == one.id
    assert upstream_body(fake)["messages"] == [
        {"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": DEFAULT_REPLY},
        {"role": "user", "content": "What is my name?"}]
    red.responses.create(model="fake", input=[{"role": "user", "content": [{"type": "input_text", "text": "And?"}]}],
                         previous_response_id=two.id)
    assert [m["content"] for m in upstream_body(fake)["messages"]] == [
        "My name is Ada.", DEFAULT_REPLY, "What is my name?", DEFAULT_REPLY, "And?"]


def test_retrieve_and_delete(red):
    made = red.responses.create(model="fake", input="keep this")
    got = red.responses.retrieve(made.id)
    assert got.id == made.id and got.output_text == made.output_text and got.usage.output_tokens == made.usage.output_tokens
    deleted = red.responses.with_raw_response.delete(made.id)
    assert deleted.status_code == 200 and deleted.http_response.json() == {"id": made.id, "object": "response",
                                                                           "deleted": True}
    with pytest.raises(openai.NotFoundError):
        red.responses.retrieve(made.id)
    with pytest.raises(openai.NotFoundError):
        red.responses.create(model="fake", input="more", previous_response_id=made.id)
    with pytest.raises(openai.NotFoundError):
        red.responses.delete(made.id)


def test_a_response_is_seen_by_its_team_only_and_deleted_by_its_owner(srv, keys, red):
    made = red.responses.create(model="fake", input="red's secret plans")
    for role, team in (("member", "blue"), ("builder", "blue"), ("member", None)):
        other = sdk(srv, keys.keys[(role, team)])
        with pytest.raises(openai.NotFoundError):
            other.responses.retrieve(made.id)
        with pytest.raises(openai.NotFoundError):
            other.responses.create(model="fake", input="go on", previous_response_id=made.id)
        with pytest.raises(openai.NotFoundError):
            other.responses.delete(made.id)
    teammate = sdk(srv, keys.keys[("builder", "red")])
    assert teammate.responses.retrieve(made.id).id == made.id
    with pytest.raises(openai.PermissionDeniedError):
        teammate.responses.delete(made.id)
    sdk(srv, keys.keys[("admin", "blue")]).responses.delete(made.id)
    with pytest.raises(openai.NotFoundError):
        red.responses.retrieve(made.id)


def test_a_teamless_keys_response_is_its_own(srv, keys):
    mine = sdk(srv, keys.keys[("member", None)])
    made = mine.responses.create(model="fake", input="hello")
    assert mine.responses.retrieve(made.id).id == made.id
    with pytest.raises(openai.NotFoundError):
        sdk(srv, keys.keys[("builder", None)]).responses.retrieve(made.id)
    mine.responses.delete(made.id)


def test_policy_guard_and_budget_refusals_are_proper_errors(srv, keys, red, fake):
    before = fake.stats()["requests"]
    with pytest.raises(openai.PermissionDeniedError) as blocked:
        red.responses.create(model="fake", input="hi", metadata={"classification": "restricted"})
    assert blocked.value.body["code"] == "policy_denied" or "policy" in blocked.value.body["code"]
    with pytest.raises(openai.PermissionDeniedError) as guarded:
        red.responses.create(model="fake", input="my key is AKIAIOSFODNN7EXAMPLE", stream=True)
    assert fake.stats()["requests"] == before, "nothing refused reached the upstream"
    assert ledger_row(srv, "resp_" + guarded.value.response.headers["x-request-id"][4:]).status == "error"
    with srv.admin() as admin:
        key = admin.post("/admin/keys", json={"role": "member", "team": "red", "name": "tight"}).json()
        r = admin.post("/admin/budgets", json={"scope": "key", "scope_id": key["id"], "amount": 0.000001,
                                               "period": "day"})
        assert r.status_code == 201, r.text
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as refused:
            sdk(srv, key["key"]).responses.create(model="fake", input="hi", max_output_tokens=1000, stream=stream)
        assert refused.value.status_code == 402 and refused.value.body["code"] == "budget_exceeded"


def refused(r: httpx.Response, status: int, code: str | None = None) -> dict:
    body = problem(r, status)
    assert code is None or body["code"] == code, body
    return body


def test_caller_mistakes_are_4xx_problems(srv, keys):
    key = keys.keys[("member", "red")]
    url, auth = srv.url + "/v1/responses", {"Authorization": f"Bearer {key}"}

    def post(body, **kw) -> httpx.Response:
        return httpx.post(url, json=body, headers=auth, timeout=30, **kw)

    refused(httpx.post(url, content=b"{nope", headers=auth), 400, "malformed_json")
    refused(httpx.post(url, json={"model": "fake", "input": "x"}), 401)
    refused(post({"model": "fake", "input": "x", "reasoning": {"effort": "high"}}), 400, "not_supported")
    refused(post({"model": "fake", "input": "x", "frobnicate": 1}), 400, "not_supported")
    refused(post({"model": "fake", "input": "x", "tools": [{"type": "web_search"}]}), 400, "not_supported")
    refused(post({"model": "fake", "input": [{"type": "item_reference", "id": "x"}]}), 400, "not_supported")
    refused(post({"model": "fake", "input": []}), 400, "bad_request")
    refused(post({"model": "fake", "input": [{"role": "wizard", "content": "x"}]}), 400, "bad_request")
    refused(post({"model": "fake", "input": [{"type": "function_call_output", "output": "x"}]}), 400, "bad_request")
    refused(post({"model": "fake", "input": "x", "max_output_tokens": 0}), 422, "validation_error")
    refused(post({"model": "fake", "input": "x", "tools": [{"type": "function", "name": "bad name!"}]}), 422,
            "validation_error")
    refused(post({"model": "fake", "input": "x", "text": {"format": {"type": "json_schema", "name": "a",
                                                                     "schema": {"type": 12}}}}), 422, "validation_error")
    refused(post({"model": "fake", "input": "x" * (11 * 1024 * 1024)}), 413, "payload_too_large")
    refused(post({"model": "nope", "input": "x"}), 404, "not_found")
    refused(httpx.get(url + "/resp_nope", headers=auth), 404, "not_found")
    refused(httpx.get(url + "/resp_nope"), 401)
    refused(httpx.delete(url + "/resp_nope"), 401)


def test_bundled_local_model_serves_responses_and_completions(module_server_factory):
    """One real run of each shape on the bundled SmolLM2 (llama.cpp): real text, real token counts."""
    local = module_server_factory(KEEL_EMBEDDED_MODELS="true", KEEL_LOCAL_THREADS="1")
    client = sdk(local)
    resp = client.responses.create(model="local-chat", input="What is the capital of France?",
                                   instructions="Answer in one short sentence.", max_output_tokens=24, temperature=0)
    assert resp.status in ("completed", "incomplete") and resp.output_text.strip()
    assert resp.usage.input_tokens > 5 and 0 < resp.usage.output_tokens <= 24
    events = list(client.responses.create(model="local-chat", input="Name a colour.", max_output_tokens=8,
                                          temperature=0, stream=True, previous_response_id=resp.id))
    assert events[0].type == "response.created" and events[-1].type in ("response.completed", "response.incomplete")
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta").strip()
    assert events[-1].response.usage.input_tokens > resp.usage.input_tokens, "the conversation was sent again"
    done = client.completions.create(model="local-chat", prompt="Once upon a time", max_tokens=12, temperature=0)
    assert done.choices[0].text.strip() and 0 < done.usage.completion_tokens <= 12
    row = ledger_row(local, resp.id)
    assert row.provider == "local" and (row.tokens_in, row.tokens_out) == (resp.usage.input_tokens,
                                                                            resp.usage.output_tokens)


def test_another_replica_continues_a_response_at_once(server_factory, tmp_path, fake):
    """Two replicas on one store: a response made on one is found on the other straight away (a tool loop's
    next turn may land anywhere), and one stopped gracefully has written all it held."""
    (tmp_path / "keel.yaml").write_text(f"models:\n  - {{alias: fake, provider: openai_compatible, model: m, "
                                        f"base_url: {fake.url}}}\n")
    one = server_factory(config=tmp_path / "keel.yaml", data_dir=tmp_path / "one")
    two = server_factory(config=tmp_path / "keel.yaml", data_dir=tmp_path / "two")
    made = sdk(one).responses.create(model="fake", input="My name is Ada.")
    assert sdk(two).responses.retrieve(made.id).output_text == DEFAULT_REPLY
    sdk(two).responses.create(model="fake", input="Who am I?", previous_response_id=made.id)
    assert upstream_body(fake)["messages"][0] == {"role": "user", "content": "My name is Ada."}
    last = sdk(one).responses.create(model="fake", input="bye")
    assert one.stop() == 0
    assert sdk(two).responses.retrieve(last.id).id == last.id
