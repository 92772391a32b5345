"""The fast body parsers of `/v1/responses` and `/v1/messages` (b8a932e) must refuse what the pydantic shapes
refused: wrong types, unknown roles, malformed content blocks and input items, bounds, deep nesting and huge
numbers are a 4xx with a stable code — never a 5xx and never a call upstream. A continuation
(`previous_response_id`) of another team's or another key's response is a 404, as for an unknown id."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.fakes.openai_upstream import FakeOpenAI

pytestmark = pytest.mark.store
DEEP = "[" * 5000 + "]" * 5000


@pytest.fixture(scope="module")
def env(module_server_factory, tmp_path_factory):
    with FakeOpenAI(reply="ok") as fake:
        base = tmp_path_factory.mktemp("ingress-attacks")
        (base / "keel.yaml").write_text(
            f"models:\n  - {{alias: fake, provider: openai_compatible, model: m, base_url: {fake.url}}}\n")
        srv = module_server_factory(config=base / "keel.yaml")
        keys = {}
        with srv.admin() as a:
            for team in ("red", "blue"):
                assert a.post("/admin/teams", json={"name": team}).status_code in (201, 409)
                for role in ("member", "builder"):
                    keys[(role, team)] = a.post("/admin/keys", json={"role": role, "team": team}).json()["key"]
            keys[("member", None)] = a.post("/admin/keys", json={"role": "member"}).json()["key"]
            keys[("member", None, 2)] = a.post("/admin/keys", json={"role": "member"}).json()["key"]
        yield srv, keys, fake


def post(srv, key: str, path: str, body) -> httpx.Response:
    raw = body if isinstance(body, (str, bytes)) else json.dumps(body)
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        return c.post(path, content=raw, headers={"authorization": f"Bearer {key}", "content-type": "application/json"})


MSG = {"model": "fake", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
RESPONSES_BAD = [
    {"model": "fake", "input": [{"role": "root", "content": "x"}]},
    {"model": "fake", "input": [{"type": "message", "role": "user", "content": [{"type": "input_text"}]}]},
    {"model": "fake", "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": 5}]}]},
    {"model": "fake", "input": [{"type": "message", "role": "user", "content": 7}]},
    {"model": "fake", "input": [{"type": "function_call", "name": 1}]},
    {"model": "fake", "input": [{"type": "function_call_output", "call_id": "c", "output": {"a": 1}}]},
    {"model": "fake", "input": [{"type": "wat"}]},
    {"model": "fake", "input": []},
    {"model": "fake", "input": "x", "tool_choice": 5},
    {"model": "fake", "input": "x", "tool_choice": {"type": "function"}},
    {"model": "fake", "input": "x", "tools": [{"type": "function"}]},
    {"model": "fake", "input": "x", "tools": [{"type": "function", "name": "f", "parameters": "nope"}]},
    {"model": "fake", "input": "x", "text": {"format": {"type": "json_schema"}}},
    {"model": "fake", "input": "x", "text": {"format": 3}},
    {"model": "fake", "input": "x", "temperature": 1e308 * 10},
    {"model": "fake", "input": "x", "temperature": 2.5},
    {"model": "fake", "input": "x", "max_output_tokens": 10 ** 30},
    {"model": "fake", "input": "x", "previous_response_id": ""},
    {"model": "fake", "input": "x", "previous_response_id": "r" * 65},
    {"model": "fake", "input": "x", "metadata": {"k": 1}},
    {"model": "fake", "input": "x", "metadata": {f"k{i}": "v" for i in range(65)}},
    {"model": "fake", "input": "x", "keel": {"context_overflow": "explode"}},
    {"model": "fake", "input": "x", "keel": []},
    {"model": "fake", "input": "x", "truncation": "sometimes"},
    {"model": "fake", "input": "x", "include": ["reasoning.encrypted_content"]},
    {"model": "fake", "input": "x", "user": "u" * 257},
    {"model": "fake", "input": "x", "stream": "yes please"},
    {"model": "", "input": "x"},
    {"model": "m" * 257, "input": "x"},
    {"model": ["fake"], "input": "x"},
    {"input": "x"},
    ["not", "an", "object"],
    '{"model": "fake", "input": "x", "temperature": NaN}',
    '{"model": "fake", "input": "x", "max_output_tokens": 1' + "0" * 5000 + "}",
    '{"model": "fake", "input": ' + DEEP + "}",
]
MESSAGES_BAD = [
    {**MSG, "messages": [{"role": "system", "content": "x"}]},
    {**MSG, "messages": [{"role": "user", "content": [{"type": "text"}]}]},
    {**MSG, "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
    {**MSG, "messages": [{"role": "user", "content": [{"type": "image", "source": 5}]}]},
    {**MSG, "messages": [{"role": "user", "content": [{"type": "tool_result"}]}]},
    {**MSG, "messages": [{"role": "assistant", "content": [{"type": "tool_use", "name": 3}]}]},
    {**MSG, "messages": [{"role": "user", "content": [{"kind": "text"}]}]},
    {**MSG, "messages": [{"role": "user", "content": 5}]},
    {**MSG, "messages": []},
    {**MSG, "system": [{"type": "text"}]},
    {**MSG, "system": 5},
    {**MSG, "tools": [{"name": "t"}]},
    {**MSG, "tools": [{"name": "t", "input_schema": "x"}]},
    {**MSG, "tool_choice": {"type": "tool"}},
    {**MSG, "tool_choice": "auto"},
    {**MSG, "max_tokens": 0},
    {**MSG, "max_tokens": 10 ** 30},
    {**MSG, "max_tokens": 1.5},
    {**MSG, "temperature": 1.5},
    {**MSG, "top_k": -1},
    {**MSG, "stop_sequences": [1]},
    {**MSG, "stop_sequences": "x"},
    {**MSG, "metadata": {"user_id": 5}},
    {**MSG, "keel": {"cache": "sideways"}},
    {k: v for k, v in MSG.items() if k != "max_tokens"},
    '{"model": "fake", "max_tokens": 16, "messages": ' + DEEP + "}",
    '{"model": "fake", "max_tokens": Infinity, "messages": [{"role": "user", "content": "hi"}]}',
]


@pytest.mark.parametrize("body", RESPONSES_BAD, ids=range(len(RESPONSES_BAD)))
def test_responses_refuses_what_its_shape_refused(env, body):
    srv, keys, fake = env
    before = len(fake.received)
    r = post(srv, keys[("member", "red")], "/v1/responses", body)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    assert r.json().get("code") or r.json().get("error"), r.text[:300]
    assert len(fake.received) == before, "a refused body reached the upstream"


@pytest.mark.parametrize("body", MESSAGES_BAD, ids=range(len(MESSAGES_BAD)))
def test_messages_refuses_what_its_shape_refused(env, body):
    srv, keys, fake = env
    before = len(fake.received)
    r = post(srv, keys[("member", "red")], "/v1/messages", body)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    assert r.json()["type"] == "error", r.text[:300]
    assert len(fake.received) == before, "a refused body reached the upstream"


def test_a_continuation_of_someone_elses_response_is_an_unknown_id(env):
    srv, keys, _fake = env
    first = post(srv, keys[("member", "red")], "/v1/responses", {"model": "fake", "input": "red's secret plan"})
    assert first.status_code == 200, first.text
    rid = first.json()["id"]
    own = post(srv, keys[("member", "red")], "/v1/responses",
               {"model": "fake", "input": "and then?", "previous_response_id": rid})
    assert own.status_code == 200, own.text
    lone = post(srv, keys[("member", None)], "/v1/responses", {"model": "fake", "input": "mine"}).json()["id"]
    for who, target in ((("member", "blue"), rid), (("builder", "blue"), rid), (("member", None), rid),
                        (("member", None, 2), lone)):
        r = post(srv, keys[who], "/v1/responses", {"model": "fake", "input": "x", "previous_response_id": target})
        assert r.status_code == 404, (who, r.status_code, r.text[:300])
        with httpx.Client(base_url=srv.url, headers={"authorization": f"Bearer {keys[who]}"}) as c:
            assert c.get(f"/v1/responses/{target}").status_code == 404, who
            assert c.get(f"/v1/responses/{target}/input_items").status_code == 404, who
            assert c.delete(f"/v1/responses/{target}").status_code == 404, who


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens", "/v1/responses"])
def test_an_oversized_body_read_straight_from_receive_is_a_413(env, path):
    """The hot routes read the body from ASGI `receive` (deaa202, f98fad3): the edge's size limit still holds
    for a chunked body with no Content-Length, and nothing reaches the upstream."""
    srv, keys, fake = env
    before = len(fake.received)
    head = b'{"model": "fake", "max_tokens": 4, "input": "x", "messages": [{"role": "user", "content": "'

    def chunks():
        yield head
        for _ in range(11):
            yield b"a" * (1024 * 1024)
        yield b'"}]}'

    with httpx.Client(base_url=srv.url, timeout=60) as c:
        r = c.post(path, content=chunks(), headers={"authorization": f"Bearer {keys[('member', 'red')]}",
                                                    "content-type": "application/json"})
    assert r.status_code == 413, (r.status_code, r.text[:300])
    assert len(fake.received) == before
