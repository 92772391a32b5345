"""A streamed answer that an output guard holds whole (a `review` action: it must be read entirely before the first
byte) still delivers the model's tool calls, with the output guards applied to their arguments — the official
`openai` client against a loopback upstream that streams a tool call."""

from __future__ import annotations

import openai
import pytest

from tests.fakes.openai_upstream import FakeOpenAI

pytestmark = pytest.mark.store

POLICY = """
name: held-streams
guards:
  input:  {pii: allow}
  output: {pii: review}
"""


def _tool(city_values: list[str]) -> list[dict]:
    return [{"type": "function", "function": {"name": "lookup_weather", "description": "weather for a city",
                                              "parameters": {"type": "object", "properties": {
                                                  "city": {"type": "string", "enum": city_values}}}}}]


@pytest.fixture(scope="module")
def srv(module_server_factory, tmp_path_factory):
    fake = FakeOpenAI(reply="It is sunny today.").start()
    base = tmp_path_factory.mktemp("held")
    (base / "policy.yaml").write_text(POLICY)
    (base / "keel.yaml").write_text(
        f"models:\n  - {{alias: up, provider: openai_compatible, model: m, id: up/one, base_url: {fake.url}}}\n")
    yield module_server_factory(config=base / "keel.yaml", KEEL_POLICY_FILE=str(base / "policy.yaml"))
    fake.stop()


def _client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=srv.admin_key, max_retries=0)


def test_a_held_stream_delivers_its_tool_calls(srv):
    """Guards: the buffered (held) stream keeping only text, so a tool call answered under an output `review`
    guard reached the caller as an empty message with finish_reason tool_calls."""
    stream = _client(srv).chat.completions.create(
        model="up", messages=[{"role": "user", "content": "weather in Oslo?"}], tools=_tool(["Oslo"]), stream=True)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for tc in choice.delta.tool_calls or []:
                cur = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                cur["id"] = tc.id or cur["id"]
                cur["name"] += (tc.function.name or "") if tc.function else ""
                cur["arguments"] += (tc.function.arguments or "") if tc.function else ""
    assert finish == "tool_calls"
    assert calls == {0: {"id": "call_fake_1", "name": "lookup_weather", "arguments": '{"city":"Oslo"}'}}, calls


def test_a_held_stream_guards_tool_call_arguments(srv):
    """Guards: a tool call's arguments carrying PII slipping past an output `review` guard when streamed (the
    same answer unstreamed is held for review)."""
    body = {"model": "up", "messages": [{"role": "user", "content": "write to ops"}],
            "tools": _tool(["ops@example.com"])}
    with srv.admin() as c:
        plain = c.post("/v1/chat/completions", json=body)
        streamed = c.post("/v1/chat/completions", json={**body, "stream": True})
    assert plain.status_code == 202, plain.text
    assert streamed.status_code == 202 and "ops@example.com" not in streamed.text, streamed.text
