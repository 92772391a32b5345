"""Generated chat bodies, valid and broken (wrong types, huge numbers, nested junk, unknown roles, bad
schemas, non-UTF-8, non-standard JSON): the hot path's parser agrees with the pydantic model, and the real
server answers each one 200 or a typed 4xx — never a 5xx, never a deployment marked unhealthy.

Guards issue 16 hole 4 (one caller switching a model off for everyone) as a class, not an instance."""

from __future__ import annotations

import copy
import json
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from keel.gateway.routes import chat_body, chat_request
from keel.gateway.schemas import ChatCompletionBody, fast_chat_body
from tests.fakes.openai_upstream import FakeOpenAI

HI = [{"role": "user", "content": "hi"}]
DEPLOYMENTS = ("local-chat/local", "remote/one")

# -- what bodies are made of: a valid body, then up to three things broken in it --------------------------

junk = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**80, max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)
text = st.text(max_size=24)
huge = st.sampled_from([2**31 - 1, 2**31, 2**63, 2**64, 2**70, -2**70]) | st.integers(min_value=-2**80,
                                                                                       max_value=2**80)

GOOD_SCHEMAS = [
    {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
    {"type": "string", "enum": ["x", "y"]},
    {"type": "array", "items": {"type": "integer"}, "maxItems": 3},
    {"anyOf": [{"type": "string"}, {"type": "null"}]},
    {"$ref": "#/$defs/x", "$defs": {"x": {"type": "boolean"}}},
    {"type": "string", "pattern": "^[a-z]+$"},
    {"$ref": "https://example.invalid/schema.json"},
]
BAD_SCHEMAS = [{"type": "objekt"}, {"type": "string", "pattern": "(["}, {"minLength": -1}, {"required": "a"},
               {"properties": [1]}, [1, 2], "string", {"$ref": 5}]


def json_schema(schema: Any, name: Any = "out") -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}


def function_tool(name: Any = "lookup", params: Any = None) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": params or {
        "type": "object", "properties": {"q": {"type": "string"}}}}}


good_part = st.builds(lambda t: {"type": "text", "text": t}, text) | st.just(
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}})
bad_part = st.one_of(st.builds(lambda t: {"type": "text", "text": t}, junk), st.just({"type": "video"}),
                     st.just({"type": []}), st.just({"type": "image_url", "image_url": {"url": 5}}), junk)
good_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant"])},
    optional={"content": text | st.lists(good_part, min_size=1, max_size=2) | st.none(),
              "name": st.sampled_from(["ann", "bob"])})
GOOD = {
    "max_tokens": st.integers(1, 8), "max_completion_tokens": st.integers(1, 8), "n": st.just(1),
    "temperature": st.floats(0, 2) | st.integers(0, 2), "top_p": st.floats(0, 1), "seed": st.integers(-2**63, 2**63 - 1),
    "presence_penalty": st.floats(-2, 2), "stop": text | st.lists(text, max_size=3), "stream": st.booleans(),
    "stream_options": st.builds(lambda b: {"include_usage": b}, st.booleans()),
    "metadata": st.dictionaries(st.sampled_from(["classification", "use_case", "task_id"]), text, max_size=3),
    "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}]
                                       + [json_schema(s) for s in GOOD_SCHEMAS]),
    "tools": st.just([function_tool()]), "tool_choice": st.sampled_from(["auto", "none"]),
    "keel": st.sampled_from([{"context_overflow": "trim"}, {"cache": "off"}, {"cache": "exact"}]),
    "user": text, "logprobs": st.booleans(), "unknown_extra": junk,
}
BAD = {
    "model": st.sampled_from(["", "nope", "x" * 300]) | junk,
    "messages": st.just([]) | junk,
    "role": st.sampled_from(["wizard", "", "function"]) | junk,
    "content": st.lists(bad_part, min_size=1, max_size=2) | junk,
    "message_extra": junk,
    "tool_calls": st.just([{"id": 1}]) | st.just([{"id": "c", "function": {"name": "f", "arguments": 5}}]) | junk,
    "max_tokens": st.integers(-3, 0) | huge | st.floats(allow_infinity=False, allow_nan=False) | junk,
    "max_completion_tokens": huge | junk, "n": st.just("abc") | huge | st.just(0),
    "temperature": huge | st.just("hot") | junk, "top_p": st.just(3) | junk, "seed": huge | junk,
    "top_logprobs": huge | junk, "stop": st.just([1, 2]) | junk, "stream": st.just("yes") | junk,
    "stream_options": st.just({"include_usage": 1}) | junk,
    "metadata": st.builds(lambda k, v: {k: v}, st.sampled_from(["classification", "use_case", "x" * 70]), junk)
    | junk,
    "response_format": st.sampled_from([json_schema(s) for s in BAD_SCHEMAS] + [json_schema(GOOD_SCHEMAS[0], name)
                                                                             for name in ("has space", "", 5)]
                                       + [{"type": "yaml"}, {}]) | junk,
    "tools": st.sampled_from([[function_tool("bad name")], [function_tool(params={"type": 7})], ["x"]]) | junk,
    "tool_choice": st.just("sometimes") | junk, "keel": st.just({"context_overflow": "explode"}) | junk,
    "logit_bias": st.just({"x": 1}) | st.just({"50256": 500}) | junk, "unknown_extra": huge,
}
MESSAGE_FIELDS = ("role", "content", "message_extra", "tool_calls")


@st.composite
def bodies(draw: st.DrawFn) -> dict[str, Any]:
    data: dict[str, Any] = {"model": draw(st.sampled_from(["remote", "remote", "remote", "local-chat"])),
                            "messages": draw(st.lists(good_message, min_size=1, max_size=3))}
    for key in draw(st.lists(st.sampled_from(sorted(GOOD)), max_size=4, unique=True)):
        data[key] = draw(GOOD[key])
    for where in draw(st.lists(st.sampled_from(sorted(BAD)), max_size=3, unique=True)):
        value = draw(BAD[where])
        if where in MESSAGE_FIELDS and isinstance(data["messages"], list) and data["messages"]:
            target = draw(st.sampled_from(data["messages"]))
            if isinstance(target, dict):
                target["extra" if where == "message_extra" else where] = value
        elif where not in MESSAGE_FIELDS:
            data[where] = value
    return data


body = bodies()


def wire(data: Any, how: str) -> bytes:
    """The body as the client sends it: plain JSON (big integers as written), or broken on purpose."""
    raw = json.dumps(data).encode()
    if how == "truncated":
        return raw[:max(1, len(raw) // 2)]
    if how == "latin-1":
        return raw.replace(b'"', b'"\xe9', 1)
    if how == "surrogate":
        return raw.replace(b'"', b'"\\ud800', 1)
    if how == "nan":
        return raw[:-1] + b', "temperature": NaN}' if raw.endswith(b"}") else raw
    return raw


def decoded(data: Any) -> Any:
    """What the server's strict JSON decoder makes of `data` sent as JSON (None: it is not JSON to it)."""
    try:
        return orjson.loads(json.dumps(data))
    except orjson.JSONDecodeError:
        return None


def canonical(data: Any) -> bytes:
    """Equal only when equal with types: 1, 1.0 and True differ."""
    return orjson.dumps(data, option=orjson.OPT_SORT_KEYS)


# -- the two validators agree --------------------------------------------------------------------------

@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body)
def test_fast_chat_body_accepts_only_what_the_model_accepts_and_gives_the_same_result(generated):
    data = decoded(generated)
    assume(data is not None)
    before = canonical(data)
    fast = fast_chat_body(copy.deepcopy(data))
    assert canonical(data) == before
    try:
        model = ChatCompletionBody.model_validate(copy.deepcopy(data))
    except ValidationError:
        assert fast is None, f"the fast parser accepted what the model refuses: {data!r}"
        return
    slow = chat_body(model)
    canonical(slow)  # whatever passes validation can be written back as JSON (no number past 64 bits)
    chat_request(slow)
    if fast is not None:
        assert canonical(fast) == canonical(slow)


# -- the real server never answers 5xx and keeps every deployment healthy ------------------------------

@pytest.fixture(scope="module")
def upstream():
    fake = FakeOpenAI().start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def srv(module_server_factory, upstream, tmp_path_factory):
    cfg = tmp_path_factory.mktemp("fuzz") / "keel.yaml"
    cfg.write_text(f"""
models:
  - {{"alias": "remote", "provider": "openai_compatible", "model": "gpt-fake", "id": "remote/one",
      "base_url": "{upstream.url}"}}
aliases:
  local-chat: {{circuit_failures: 2, backoff_ms: 5}}
  remote: {{circuit_failures: 2, backoff_ms: 5}}
""")
    return module_server_factory(config=cfg, KEEL_EMBEDDED_MODELS="true", KEEL_LOCAL_THREADS="1")


@pytest.fixture(scope="module")
def keys(srv):
    out = {}
    with srv.admin() as admin:
        for team in ("fuzz", "bystander"):
            assert admin.post("/admin/teams", json={"name": team}).status_code == 201
            r = admin.post("/admin/keys", json={"role": "member", "team": team, "name": team})
            assert r.status_code == 201, r.text
            out[team] = r.json()["key"]
    return out


@pytest.fixture(scope="module")
def fuzz_client(srv, keys):
    with srv.client(keys["fuzz"], timeout=120) as c:
        yield c


def cheap(data: Any) -> Any:
    """Requests to the local model generate at most a few tokens, so the run stays short."""
    if isinstance(data, dict) and data.get("model") == "local-chat":
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(data.get(key), int) and not isinstance(data[key], bool) and data[key] > 3:
                data[key] = 2
        if "max_tokens" not in data and "max_completion_tokens" not in data:
            data["max_tokens"] = 2
    return data


def check_answer(r: httpx.Response, raw: bytes) -> None:
    assert r.status_code == 200 or 400 <= r.status_code < 500, (r.status_code, r.text[:500], raw[:500])
    if r.status_code != 200:
        assert r.headers["content-type"].startswith("application/problem+json"), r.text[:300]
        problem = r.json()
        assert problem["code"] and problem["detail"], problem
    elif r.headers["content-type"].startswith("text/event-stream"):
        for line in r.text.splitlines():
            if line.startswith("data: {") and '"status"' in line:
                assert not 500 <= orjson.loads(line[6:]).get("status", 0) < 600, (line, raw[:500])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(body, st.sampled_from(["json"] * 8 + ["truncated", "latin-1", "surrogate", "nan"]))
def test_generated_chat_bodies_get_200_or_a_typed_4xx_never_5xx(fuzz_client, generated, how):
    raw = wire(cheap(generated), how)
    r = fuzz_client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    check_answer(r, raw)


def test_after_the_fuzzing_another_team_is_served_and_no_deployment_is_unhealthy(srv, keys, fuzz_client):
    with srv.client(keys["bystander"], timeout=120) as c:
        for alias in ("local-chat", "remote"):
            r = c.post("/v1/chat/completions", json={"model": alias, "messages": HI, "max_tokens": 2})
            assert r.status_code == 200, (alias, r.text)
    with srv.admin() as admin:
        state = {row["deployment"]: row for row in admin.get("/admin/circuits").json()["data"]}
    for did in DEPLOYMENTS:
        assert state[did]["circuit"] == "closed" and state[did]["failures"] == 0, state[did]
