"""The Messages ⇄ OpenAI shape mapping in both directions: what the `/v1/messages` ingress makes of a request
is what the `anthropic` provider turns back into the same request, and the ingress's event stream is what
the provider's stream reader turns back into the same deltas."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies as st

from keel.core.errors import BadRequest, NotSupported
from keel.gateway.anthropic_shapes import (
    EventWriter, StreamTranslator, openai_body, openai_messages, to_message, to_result, translate_messages,
    translate_tool_choice, translate_tools,
)
from keel.gateway.protocol import ChatDelta, ChatResult, Usage

WEATHER = {"name": "get_weather", "description": "Weather", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string"}}}}


def test_tool_results_come_before_the_turns_text_and_thinking_is_dropped():
    msgs = openai_messages([{"type": "text", "text": "A."}, {"type": "text", "text": "B."}], [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "s"},
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "Oslo"}},
            {"type": "tool_use", "id": "t2", "name": "get_weather", "input": {"city": "Rome"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "4C"}]},
            {"type": "tool_result", "tool_use_id": "t2", "content": "boom", "is_error": True},
            {"type": "text", "text": "And?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}])
    assert msgs == [
        {"role": "system", "content": "A.\n\nB."},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "t1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}},
            {"id": "t2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}}]},
        {"role": "tool", "tool_call_id": "t1", "content": "4C"},
        {"role": "tool", "tool_call_id": "t2", "content": "Error: boom"},
        {"role": "user", "content": [{"type": "text", "text": "And?"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]


@pytest.mark.parametrize("block, error", [
    ({"type": "document", "source": {}}, NotSupported),
    ({"type": "tool_use", "id": "x", "name": "n", "input": {}}, NotSupported),  # in a user turn
    ({"type": "tool_result", "tool_use_id": "t", "content": [{"type": "image"}]}, NotSupported),
    ({"type": "tool_result", "content": "no id"}, BadRequest),
    ({"type": "image", "source": {"type": "file", "file_id": "f"}}, NotSupported),
    ({"type": "image", "source": {"type": "base64"}}, BadRequest),
    ({"type": "text", "text": 5}, BadRequest),
    ({"type": "nope"}, BadRequest),
    ("text", BadRequest),
])
def test_blocks_keel_cannot_take_are_refused_by_name(block, error):
    with pytest.raises(error) as info:
        openai_messages(None, [{"role": "user", "content": [block]}])
    assert "messages[0].content[0]" in info.value.detail and info.value.fix


def test_request_fields():
    body = openai_body({"model": "m", "max_tokens": 9, "messages": [{"role": "user", "content": "hi"}],
                        "stop_sequences": ["X"], "temperature": 0.1, "top_k": 3, "tools": [WEATHER],
                        "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
                        "metadata": {"user_id": "u", "use_case": "c"}, "keel": {"cache": "off"},
                        "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}}})
    assert body == {
        "model": "m", "max_tokens": 9, "messages": [{"role": "user", "content": "hi"}], "stop": ["X"],
        "temperature": 0.1, "top_k": 3, "keel": {"cache": "off"}, "user": "u", "metadata": {"use_case": "c"},
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER["input_schema"],
                                                    "description": "Weather"}}],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "parallel_tool_calls": False,
        "response_format": {"type": "json_schema", "json_schema": {"name": "output", "schema": {"type": "object"}}}}
    # and back through the provider's direction
    assert translate_tools(body["tools"]) == [WEATHER]
    assert translate_tool_choice(body["tool_choice"], body["parallel_tool_calls"]) == {
        "type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}
    with pytest.raises(NotSupported):
        openai_body({"model": "m", "max_tokens": 1, "messages": [], "tools": [{"type": "bash_20250124", "name": "b"}]})


TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12)
IDS = st.text("abcdef0123", min_size=1, max_size=6)


@st.composite
def conversations(draw):
    """Alternating turns as the Messages API takes them: each assistant tool_use answered by a tool_result."""
    turns, pending = [], []
    for i in range(draw(st.integers(1, 6))):
        if i % 2 == 0:
            blocks = [{"type": "tool_result", "tool_use_id": t, "content": draw(TEXT)} for t in pending]
            blocks += [{"type": "text", "text": draw(TEXT)} for _ in range(draw(st.integers(0 if pending else 1, 2)))]
            pending = []
            turns.append({"role": "user", "content": blocks})
        else:
            blocks = [{"type": "text", "text": draw(TEXT)} for _ in range(draw(st.integers(0, 2)))]
            ids = draw(st.lists(IDS, max_size=2, unique=True))
            blocks += [{"type": "tool_use", "id": f"{i}-{t}", "name": "f",
                        "input": draw(st.dictionaries(IDS, st.integers(-2**53, 2**53) | TEXT, max_size=2))} for t in ids]
            if not blocks:
                blocks = [{"type": "text", "text": draw(TEXT)}]
            pending = [b["id"] for b in blocks if b["type"] == "tool_use"]
            turns.append({"role": "assistant", "content": blocks})
    if pending:
        turns.append({"role": "user", "content": [{"type": "tool_result", "tool_use_id": t, "content": "r"}
                                                  for t in pending]})
    return turns


@settings(max_examples=150, deadline=None)
@given(system=st.none() | TEXT, turns=conversations())
def test_ingress_then_egress_gives_back_the_request(system, turns):
    """Messages → OpenAI (ingress) → Messages (the provider) is the identity on text, tool_use and tool_result."""
    back_system, back = translate_messages(openai_messages(system, turns))
    assert back_system == (system or "")
    assert back == turns


def _replay(events: bytes) -> list[dict]:
    out = []
    for frame in events.decode().strip().split("\n\n"):
        name, data = frame.split("\n")
        ev = json.loads(data.removeprefix("data: "))
        assert name == "event: " + ev["type"]
        out.append(ev)
    return out


def test_event_stream_reads_back_as_the_same_deltas():
    """The ingress's events, read by the provider's stream reader, give back the text, the tool calls with
    their arguments, the finish reason and the usage; blocks open and close one at a time."""
    writer = EventWriter("msg_1", "alias")
    deltas = [ChatDelta(role="assistant"), ChatDelta(content="Hel"), ChatDelta(content="lo"),
              ChatDelta(tool_calls=[{"index": 0, "id": "c1", "type": "function",
                                     "function": {"name": "f", "arguments": ""}}]),
              ChatDelta(tool_calls=[{"index": 0, "function": {"arguments": '{"a":'}}]),
              ChatDelta(tool_calls=[{"index": 0, "function": {"arguments": ' 1}'}}]),
              ChatDelta(tool_calls=[{"index": 1, "id": "c2", "type": "function",
                                     "function": {"name": "g", "arguments": "{}"}}]),
              ChatDelta(finish_reason="tool_calls")]
    raw = writer.start() + b"".join(writer.delta(d) for d in deltas) + writer.end(Usage(7, 5))
    events = _replay(raw)
    kinds = [e["type"] for e in events]
    assert kinds == ["message_start", "ping", "content_block_start", "content_block_delta", "content_block_delta",
                     "content_block_stop", "content_block_start", "content_block_delta", "content_block_delta",
                     "content_block_stop", "content_block_start", "content_block_delta", "content_block_stop",
                     "message_delta", "message_stop"]
    assert [e["index"] for e in events if e["type"] == "content_block_start"] == [0, 1, 2]
    reader = StreamTranslator()
    back = [d for d in map(reader.event, events) if d is not None]
    assert "".join(d.content or "" for d in back) == "Hello"
    args: dict[int, str] = {}
    for d in back:
        for call in d.tool_calls or ():
            args[call["index"]] = args.get(call["index"], "") + call["function"]["arguments"]
    assert {i: json.loads(a) for i, a in args.items()} == {0: {"a": 1}, 1: {}}
    assert back[-1].finish_reason == "tool_calls" and back[-1].usage == Usage(7, 5) and reader.done


def test_a_guarded_stream_in_one_delta_and_an_empty_one():
    """A stream held by an output guard arrives as one delta (role, text, finish); one with no content closes
    cleanly with the stop reason."""
    writer = EventWriter("m", "a")
    events = _replay(writer.start() + writer.delta(ChatDelta(role="assistant", content="all", finish_reason="length"))
                     + writer.end(Usage(1, 1)))
    assert [e["type"] for e in events][2:] == ["content_block_start", "content_block_delta", "content_block_stop",
                                               "message_delta", "message_stop"]
    assert events[-2]["delta"]["stop_reason"] == "max_tokens"
    empty = _replay(EventWriter("m", "a").start() + EventWriter("m", "a").end(Usage()))
    assert [e["type"] for e in empty] == ["message_start", "ping", "message_delta", "message_stop"]


def test_message_reads_back_as_the_same_result():
    result = ChatResult(content="Hi", finish_reason="tool_calls", usage=Usage(3, 4), tool_calls=[
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"x": [1]}'}},
        {"id": "d", "type": "function", "function": {"name": "g", "arguments": "not json"}}])
    msg = to_message(result, "msg_1", "alias")
    assert msg["stop_reason"] == "tool_use" and msg["usage"] == {"input_tokens": 3, "output_tokens": 4}
    assert msg["content"][2]["input"] == {"arguments": "not json"}
    back = to_result(msg)
    assert (back.content, back.finish_reason, back.usage) == ("Hi", "tool_calls", Usage(3, 4))
    assert json.loads(back.tool_calls[0]["function"]["arguments"]) == {"x": [1]}
