"""The hot parsers of `/v1/responses` and `/v1/messages` against their pydantic models, over generated bodies
valid and broken: a body the fast parser takes is one the model accepts, typed the same (so the request is
served the same and refused with the same code either way), and the chat body Keel builds from it without
checking it again is one `/v1/chat/completions` would take as it is.

Guards the Responses and Messages hot paths (one validator per shape: the fast parser only says yes)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from keel.core.errors import KeelError
from keel.gateway.anthropic_shapes import openai_body
from keel.gateway.ingress.messages import CountTokensBody, MessagesBody, _chat_body, fast_body
from keel.gateway.ingress.responses_shape import (
    ResponsesBody, chat_data, check_supported, fast_responses_body, input_items, parsed, to_messages,
)
from keel.gateway.schemas import fast_chat_body
from tests.gateway.test_chat_fuzz import canonical, decoded

junk = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**80, max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)
text = st.text(max_size=12)
# numbers at and across every bound the shapes have (0, 1, 2, MAX_TOKENS), as ints, floats, a bool, a string
number = st.sampled_from([0, 0.0, 0.5, 1, 1.0, 1.5, 2, 2.0, 2.5, 3, -1, -0.5, -3, 16, 16.0, 2**31 - 1, 2**31, 2**70,
                          True, "1"])
meta = st.dictionaries(st.sampled_from(["use_case", "task_id", "user_id", "x" * 70]), text | junk, max_size=2)


def agree(fast: Any, model: type, data: dict[str, Any]) -> dict[str, Any] | None:
    """The model's dump of `data` (None when it refuses it); the fast parser's answer must be it or None."""
    try:
        slow = model.model_validate(copy.deepcopy(data)).model_dump(exclude_unset=True, exclude_none=True)
    except ValidationError:
        assert fast is None, f"the fast parser accepted what the model refuses: {data!r}"
        return None
    if fast is not None:
        assert canonical(fast) == canonical(slow), data
    return slow


# -- /v1/responses ------------------------------------------------------------------------------------------

item = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "developer", "assistant", "wizard"]),
                           "content": text | st.just([{"type": "input_text", "text": "hi"}]) | junk},
                          optional={"type": st.just("message")}),
    st.just({"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}),
    st.just({"type": "function_call_output", "call_id": "c1", "output": "ok"}), junk)
RESPONSES = {
    "model": st.sampled_from(["bench", "", "x" * 257]), "input": text | st.lists(item, max_size=3),
    "instructions": text, "max_output_tokens": number, "temperature": number,
    "top_p": number, "store": st.booleans(), "stream": st.booleans(),
    "previous_response_id": st.sampled_from(["resp_1", "", "r" * 65]),
    "metadata": meta, "user": text | st.just("u" * 257),
    "parallel_tool_calls": st.booleans(), "truncation": st.sampled_from(["auto", "disabled", "x"]),
    "include": st.lists(text, max_size=1), "keel": st.sampled_from([{"cache": "off"}, {"cache": "x"}]),
    "tools": st.just([{"type": "function", "name": "f", "parameters": {"type": "object"}}]),
    "tool_choice": st.sampled_from(["auto", "none", {"type": "function", "name": "f"}]),
    "text": st.just({"format": {"type": "json_object"}}),
    "service_tier": st.just("auto"), "reasoning": st.just({}), "unknown": st.just(1),
}


@st.composite
def responses_bodies(draw: st.DrawFn) -> dict[str, Any]:
    data: dict[str, Any] = {"model": "bench", "input": draw(text | st.lists(item, min_size=1, max_size=2))}
    for key in draw(st.lists(st.sampled_from(sorted(RESPONSES)), max_size=4, unique=True)):
        data[key] = draw(junk if draw(st.integers(0, 4)) == 0 else RESPONSES[key])
    return decoded(data)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(responses_bodies())
def test_fast_responses_body_accepts_only_what_the_model_accepts_and_gives_the_same_result(data):
    assume(data is not None)
    before = canonical(data)
    fast = fast_responses_body(copy.deepcopy(data))
    assert canonical(data) == before
    slow = agree(fast, ResponsesBody, data)
    if slow is None or fast is None:
        return
    assert parsed(fast) is fast
    try:  # what the handler does next: refuse unsupported fields, translate, build the chat body
        check_supported(fast)
        built = chat_data(fast, to_messages(input_items(fast["input"]), fast.get("instructions")))
    except KeelError:
        return
    assert fast_chat_body(copy.deepcopy(built)) == built, "a chat body left unchecked is one chat would change"


def test_a_model_validated_body_is_translated_as_a_fast_one():
    """The framework route (pydantic) and the hot path build the same chat body."""
    data = {"model": "bench", "input": "hi", "temperature": 1, "max_output_tokens": 5, "truncation": "auto"}
    fast = fast_responses_body(data)
    slow = ResponsesBody.model_validate(data)
    assert fast is not None and type(fast["temperature"]) is float
    assert chat_data(fast, to_messages(input_items("hi"))) == chat_data(slow, to_messages(input_items("hi")))
    assert chat_data(fast, to_messages(input_items("hi")))["keel"] == {"context_overflow": "trim"}


# -- /v1/messages -------------------------------------------------------------------------------------------

block = st.sampled_from([{"type": "text", "text": "hi"}, {"type": "image", "source": {"type": "url", "url": "u"}},
                         {"type": "tool_result", "tool_use_id": "t", "content": "ok"}])
@st.composite
def turn(draw: st.DrawFn) -> dict[str, Any]:
    """A turn: mostly a plain one, sometimes with an extra field (null or not) or a role of no Messages turn."""
    role = "system" if draw(st.integers(0, 9)) == 0 else draw(st.sampled_from(["user", "assistant"]))
    kind = draw(st.integers(0, 9))
    content = draw(junk if kind == 0 else st.lists(block, max_size=2) if kind < 3 else text)
    out = {"role": role, "content": content}
    if draw(st.integers(0, 9)) == 0:
        out[draw(st.sampled_from(["name", "cache_control"]))] = draw(st.none() | junk)
    return out


MESSAGES = {
    "model": st.sampled_from(["bench", "", "x" * 257]), "messages": st.lists(turn(), max_size=2),
    "max_tokens": number, "system": text | st.just([{"type": "text", "text": "be brief"}]),
    "temperature": number, "top_p": number, "top_k": number,
    "stop_sequences": st.lists(text, max_size=2), "stream": st.booleans(), "metadata": meta,
    "keel": st.sampled_from([{"cache": "off"}, {"context_overflow": "x"}]),
    "tools": st.just([{"name": "f", "input_schema": {"type": "object"}}]),
    "tool_choice": st.sampled_from([{"type": "auto"}, {"type": "any"}]), "thinking": junk,
    "output_config": st.just({"format": {"type": "json_schema", "schema": {"type": "object"}}}),
    "unknown": st.just(1),
}


@st.composite
def messages_bodies(draw: st.DrawFn) -> tuple[Any, type]:
    """A Messages body, and the model of the route it is for (count_tokens' body has no `max_tokens`)."""
    model = draw(st.sampled_from([MessagesBody, MessagesBody, CountTokensBody]))
    data: dict[str, Any] = {"model": "bench", "messages": draw(st.lists(turn(), min_size=1, max_size=2))}
    if model is MessagesBody or draw(st.integers(0, 4)) == 0:
        data["max_tokens"] = 16
    for key in draw(st.lists(st.sampled_from(sorted(MESSAGES)), max_size=4, unique=True)):
        data[key] = draw(junk if draw(st.integers(0, 4)) == 0 else MESSAGES[key])
    return decoded(data), model


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages_bodies())
def test_fast_messages_body_accepts_only_what_the_model_accepts_and_gives_the_same_result(generated):
    data, model = generated
    assume(data is not None)
    before = canonical(data)
    fast = fast_body(copy.deepcopy(data), model)
    assert canonical(data) == before
    slow = agree(fast, model, data)
    if slow is None or fast is None or model is not MessagesBody:
        return
    try:
        built = _chat_body(fast)
    except KeelError:
        return
    assert canonical(built) == canonical(_chat_body(slow))
    if built is not None and all(type(m["content"]) is str and len(m) == 2 for m in openai_body(fast)["messages"]):
        assert fast_chat_body(copy.deepcopy(built)) == built, "a chat body left unchecked is one chat would change"


# -- every field at and across its bounds, one at a time ----------------------------------------------------

EDGES = [None, 0, 0.0, 0.5, 1, 1.0, 1.5, 2, 2.0, 2.5, -1, -0.5, 16, 2**31 - 1, 2**31, 2**63, True, False, "1", "",
         "x" * 65, "x" * 257, [], ["a"], [{}], {}, {"a": "b"}, {"use_case": 5}, {"cache": "x"}, {"cache": "off"}]
MINIMAL = {ResponsesBody: {"model": "bench", "input": "hi"},
           MessagesBody: {"model": "bench", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]},
           CountTokensBody: {"model": "bench", "messages": [{"role": "user", "content": "hi"}]}}
FAST = {ResponsesBody: fast_responses_body, MessagesBody: lambda d: fast_body(d, MessagesBody),
        CountTokensBody: lambda d: fast_body(d, CountTokensBody)}


@pytest.mark.parametrize("model", list(MINIMAL), ids=lambda m: m.__name__)
def test_each_field_at_its_bounds_is_parsed_as_the_model_parses_it(model):
    accepted = 0
    for field in [*model.model_fields, "unknown"]:
        for value in EDGES:
            data = {**MINIMAL[model], field: value}
            fast = FAST[model](copy.deepcopy(data))
            accepted += fast is not None
            agree(fast, model, data)
    assert accepted > 3 * len(model.model_fields)  # the fast parser does take the ordinary bodies
