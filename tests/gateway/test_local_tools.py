"""Tool calling on the bundled local model through the real gateway and the official `openai` client: the
output is constrained to the request's tools, so every call names one of them with arguments its schema
accepts (what the model chooses to say is not judged)."""

from __future__ import annotations

import json

import openai
import pytest
from jsonschema import Draft202012Validator

from keel.gateway.providers.local_tools import parse_output

WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"type": "string", "maxLength": 40}, "unit": {"enum": ["celsius", "fahrenheit"]}}}
REFUND = {"type": "object", "additionalProperties": False, "required": ["order_id", "amount"],
          "properties": {"order_id": {"type": "string", "pattern": "^o-[0-9]{1,6}$"},
                         "amount": {"type": "number", "minimum": 0, "maximum": 5000}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "refund", "description": "Refund an order",
                                           "parameters": REFUND}}]
NOTIFY = {"type": "object", "additionalProperties": False, "required": ["to", "body"],  # bounds too big to spell out
          "properties": {"to": {"type": "string", "maxLength": 320}, "body": {"type": "string", "maxLength": 20000}}}
TOOLS.append({"type": "function", "function": {"name": "notify", "description": "Email someone",
                                               "parameters": NOTIFY}})
SCHEMAS = {"get_weather": WEATHER, "refund": REFUND, "notify": NOTIFY}
ASK = [{"role": "user", "content": "Please refund order o-12 for 40 dollars."}]


@pytest.fixture(scope="module")
def client(module_server_factory):
    srv = module_server_factory(KEEL_EMBEDDED_MODELS="true")
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=srv.admin_key, max_retries=0)


def _valid(call) -> None:
    assert call.type == "function" and call.id
    schema = SCHEMAS[call.function.name]
    assert not list(Draft202012Validator(schema).iter_errors(json.loads(call.function.arguments)))


def test_required_tool_choice_gives_a_valid_call_of_a_listed_tool(client):
    resp = client.chat.completions.create(model="local-chat", messages=ASK, tools=TOOLS, tool_choice="required",
                                          max_tokens=80, temperature=0)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    _valid(choice.message.tool_calls[0])


def test_a_named_tool_is_the_one_called_and_a_conversation_with_its_result_goes_on(client):
    resp = client.chat.completions.create(model="local-chat", messages=ASK, tools=TOOLS, max_tokens=80,
                                          tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = resp.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    _valid(call)
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": "18 degrees, sunny"}]
    nxt = client.chat.completions.create(model="local-chat", messages=history, tools=TOOLS, max_tokens=80)
    msg = nxt.choices[0].message
    assert (msg.tool_calls and nxt.choices[0].finish_reason == "tool_calls") or isinstance(msg.content, str)
    for c in msg.tool_calls or []:
        _valid(c)


def test_a_streamed_tool_call_is_one_valid_call(client):
    stream = client.chat.completions.create(model="local-chat", messages=ASK, tools=TOOLS, tool_choice="required",
                                            max_tokens=80, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [tc for ch in chunks for c in ch.choices for tc in (c.delta.tool_calls or [])]
    assert {p.index for p in pieces} == {0}  # one call (the gateway may send its arguments in several deltas)
    name = pieces[0].function.name
    arguments = "".join(p.function.arguments or "" for p in pieces)
    assert name in SCHEMAS and not list(Draft202012Validator(SCHEMAS[name]).iter_errors(json.loads(arguments)))
    assert [c.finish_reason for ch in chunks for c in ch.choices if c.finish_reason] == ["tool_calls"]
    assert chunks[-1].usage.completion_tokens > 0


@pytest.mark.parametrize("kwargs,needle", [
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "name"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "delete_everything"}}},
     "delete_everything"),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format"),
])
def test_tool_mistakes_are_4xx_problems(client, kwargs, needle):
    with pytest.raises(openai.APIStatusError) as exc:
        client.chat.completions.create(model="local-chat", messages=ASK, max_tokens=8, **kwargs)
    assert exc.value.status_code in (400, 422) and needle in str(exc.value)


def test_tool_choice_none_answers_in_text(client):
    resp = client.chat.completions.create(model="local-chat", messages=ASK, tools=TOOLS, tool_choice="none",
                                          max_tokens=8)
    assert resp.choices[0].message.tool_calls is None and resp.choices[0].message.content


def test_output_cut_short_stays_text():
    """Regression guard: a generation cut by max_tokens is not half a call."""
    assert parse_output('{"tool": "refund", "argu') == ('{"tool": "refund", "argu', None)
