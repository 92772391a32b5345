"""Cache keys and plans, without a server: what is cached when, and which requests share a key."""

import pytest

from keel.core.errors import BadRequest
from keel.core.settings import Settings
from keel.gateway.cache.keys import exact_key, plan_for, scope_of, semantic_key
from keel.gateway.cache.stage import merge_tool_calls, split_pieces
from keel.gateway.protocol import ChatRequest
from keel.identity.principal import Principal

TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
SETTINGS = Settings(aliases={"ex": {"cache": {"mode": "exact"}}, "sem": {"cache": {"mode": "semantic"}}})


def req(messages=None, keel=None, **kw) -> ChatRequest:
    messages = messages or [{"role": "user", "content": "hi"}]
    body = {"model": "m", "messages": messages, **{k: v for k, v in kw.items() if v is not None}}
    if keel is not None:
        body["keel"] = keel
    return ChatRequest(model="m", messages=messages, body=body, **kw)


def test_exact_needs_temperature_zero_unless_forced():
    assert plan_for("ex", req(temperature=0), SETTINGS).mode == "exact"
    assert plan_for("ex", req(temperature=0.7), SETTINGS) is None
    assert plan_for("ex", req(), SETTINGS) is None  # no temperature means the provider's default, not 0
    forced = plan_for("ex", req(temperature=0.7, keel={"cache": "force"}), SETTINGS)
    assert forced.mode == "exact" and forced.forced


def test_request_option_overrides_alias():
    assert plan_for("other", req(temperature=0), SETTINGS) is None
    assert plan_for("other", req(temperature=0, keel={"cache": "exact"}), SETTINGS).mode == "exact"
    assert plan_for("other", req(keel={"cache": "semantic"}), SETTINGS).mode == "semantic"
    assert plan_for("ex", req(temperature=0, keel={"cache": "off"}), SETTINGS) is None
    assert plan_for("other", req(keel={"cache": "force"}), SETTINGS).mode == "exact"
    with pytest.raises(BadRequest, match="keel.cache"):
        plan_for("ex", req(keel={"cache": "always"}), SETTINGS)


def test_tools_never_cached_unless_forced_and_never_semantic():
    assert plan_for("ex", req(temperature=0, tools=TOOLS), SETTINGS) is None
    assert plan_for("sem", req(tools=TOOLS), SETTINGS) is None
    forced = plan_for("sem", req(tools=TOOLS, keel={"cache": "force"}), SETTINGS)
    assert forced.mode == "exact" and "tool_calls" in forced.storable_finishes
    assert "tool_calls" not in plan_for("ex", req(temperature=0), SETTINGS).storable_finishes


def test_exact_key_is_canonical_and_complete():
    base = exact_key("team:a", "ex", req(temperature=0))
    assert base == exact_key("team:a", "ex", req(temperature=0.0, keel={"cache": "exact"}))
    assert base == exact_key("team:a", "ex", req([{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                                                 temperature=0))
    assert base == exact_key("team:a", "ex", req([{"content": "hi", "role": "user", "name": None}], temperature=0))
    assert exact_key("team:a", "ex", req(temperature=0, stop=["x"])) != base
    different = [exact_key("team:b", "ex", req(temperature=0)), exact_key("team:a", "other", req(temperature=0)),
                 exact_key("team:a", "ex", req([{"role": "user", "content": "hi!"}], temperature=0)),
                 exact_key("team:a", "ex", req(temperature=0, max_tokens=5)),
                 exact_key("team:a", "ex", req(temperature=0, seed=1)),
                 exact_key("team:a", "ex", req(temperature=0, top_p=0.5)),
                 exact_key("team:a", "ex", req(temperature=0, response_format={"type": "json_object"})),
                 exact_key("team:a", "ex", req(temperature=0, tools=TOOLS))]
    assert len({base, *different}) == len(different) + 1


def test_extra_body_fields_are_keyed_except_bookkeeping():
    r = req(temperature=0)
    r.body.update(presence_penalty=1.0)
    assert exact_key("s", "ex", r) != exact_key("s", "ex", req(temperature=0))
    r = req(temperature=0)
    r.body.update(user="u-1", metadata={"task_id": "t"}, stream=True, stream_options={"include_usage": True})
    assert exact_key("s", "ex", r) == exact_key("s", "ex", req(temperature=0))


def test_semantic_partition_covers_context_not_the_question():
    sys_a = {"role": "system", "content": "be brief"}
    q1, q2 = {"role": "user", "content": "capital of France?"}, {"role": "user", "content": "France's capital?"}
    p1, text = semantic_key("sem", req([sys_a, q1]))
    assert text == "capital of France?"
    assert semantic_key("sem", req([sys_a, q2]))[0] == p1
    assert semantic_key("sem", req([{"role": "system", "content": "be verbose"}, q1]))[0] != p1
    assert semantic_key("sem", req([sys_a, {"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
                                    q1]))[0] != p1
    assert semantic_key("sem", req([sys_a, q1], response_format={"type": "json_object"}))[0] != p1
    assert semantic_key("other", req([sys_a, q1]))[0] != p1
    assert semantic_key("sem", req([q1, {"role": "assistant", "content": "Paris"}])) is None


def test_scope_is_team_else_key():
    assert scope_of(Principal(key_id="k1", role="member", team_id="t1")) == "team:t1"
    assert scope_of(Principal(key_id="k1", role="member")) == "key:k1"


def test_replay_pieces_and_tool_call_merge():
    text = "The quick brown fox jumps over the lazy dog, twice."
    pieces = split_pieces(text)
    assert "".join(pieces) == text and 1 < len(pieces) <= 4
    assert split_pieces("") == [] and split_pieces("one") == ["one"]
    acc: dict = {}
    merge_tool_calls(acc, [{"index": 0, "id": "c1", "type": "function", "function": {"name": "f", "arguments": ""}}])
    merge_tool_calls(acc, [{"index": 0, "function": {"arguments": '{"a":'}}])
    merge_tool_calls(acc, [{"index": 0, "function": {"arguments": " 1}"}}])
    assert acc[0] == {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
