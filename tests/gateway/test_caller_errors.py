"""Caller errors are the caller's (issue 16, holes 4 and 6): a malformed request is answered 4xx with a typed
problem before any provider sees it, an upstream's 4xx goes back to its caller unretried, and neither counts
against a deployment — so one team cannot switch a model off for every other team.

The real server on loopback, the bundled local model and a loopback OpenAI-compatible upstream."""

from __future__ import annotations

import httpx
import pytest

from tests.fakes.openai_upstream import FakeOpenAI

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def upstream():
    fake = FakeOpenAI().start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def srv(module_server_factory, upstream, tmp_path_factory):
    cfg = tmp_path_factory.mktemp("callers") / "keel.yaml"
    cfg.write_text(f"""
models:
  - {{"alias": "remote", "provider": "openai_compatible", "model": "gpt-fake", "id": "remote/one",
      "base_url": "{upstream.url}"}}
aliases:
  local-chat: {{circuit_failures: 2, retries: 2, backoff_ms: 5}}
  remote: {{circuit_failures: 2, retries: 2, backoff_ms: 5}}
""")
    return module_server_factory(config=cfg, KEEL_EMBEDDED_MODELS="true", KEEL_LOCAL_THREADS="1")


@pytest.fixture(scope="module")
def keys(srv):
    """A member key in each of two teams: `red` makes the mistakes, `blue` must not notice."""
    out = {}
    with srv.admin() as admin:
        for team in ("red", "blue"):
            assert admin.post("/admin/teams", json={"name": team}).status_code == 201
            r = admin.post("/admin/keys", json={"role": "member", "team": team, "name": f"{team}-key"})
            assert r.status_code == 201, r.text
            out[team] = r.json()["key"]
    return out


def post(srv, key, body, path="/v1/chat/completions"):
    with srv.client(key, timeout=120) as c:
        if isinstance(body, (bytes, str)):
            return c.post(path, content=body, headers={"content-type": "application/json"})
        return c.post(path, json=body)


def circuits(srv) -> dict[str, dict]:
    with srv.admin() as admin:
        r = admin.get("/admin/circuits")
    assert r.status_code == 200, r.text
    return {row["deployment"]: row for row in r.json()["data"]}


def assert_typed_4xx(r: httpx.Response, *field: str) -> dict:
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["code"] and body["detail"] and body.get("fix"), body
    for name in field:
        assert name in body["detail"], (name, body["detail"])
    return body


def assert_healthy(srv, keys, *deployments: str) -> None:
    for alias in ("local-chat", "remote"):
        r = post(srv, keys["blue"], {"model": alias, "messages": HI, "max_tokens": 2})
        assert r.status_code == 200, (alias, r.status_code, r.text)
    state = circuits(srv)
    for did in deployments:
        assert state[did]["circuit"] == "closed" and state[did]["failures"] == 0, state[did]


MALFORMED = {
    "a number where text belongs": {"messages": [{"role": "user", "content": 5}]},
    "a text part without text": {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
    "a part of no known type": {"messages": [{"role": "user", "content": [{"type": "video", "video": 1}]}]},
    "a part that is not an object": {"messages": [{"role": "user", "content": [["text", "hi"]]}]},
    "an unknown role": {"messages": [{"role": "wizard", "content": "hi"}]},
    "an invalid JSON schema": {"messages": HI, "response_format": {
        "type": "json_schema", "json_schema": {"name": "out", "schema": {"type": "objekt", "minLength": -1}}}},
    "a schema that is not an object": {"messages": HI, "response_format": {
        "type": "json_schema", "json_schema": {"name": "out", "schema": [1, 2]}}},
    "an unknown response format": {"messages": HI, "response_format": {"type": "yaml"}},
}


@pytest.mark.parametrize("what", list(MALFORMED))
def test_malformed_content_does_not_open_the_circuit_for_others(srv, keys, what):
    """Hole 4: two malformed requests used to become retried 502s from the local provider, opening the
    circuit: every team got 503 for 30 s."""
    for _ in range(3):  # more than circuit_failures
        assert_typed_4xx(post(srv, keys["red"], {"model": "local-chat", "max_tokens": 2, **MALFORMED[what]}))
    assert_healthy(srv, keys, "local-chat/local")


CLIENT_MISTAKES = {
    "metadata.classification": {"metadata": {"classification": ["restricted"]}},
    "metadata.use_case": {"metadata": {"use_case": {"nested": 1}}},
    "n": {"n": "abc"},
    "max_tokens": {"max_tokens": 2**70},
    "max_completion_tokens": {"max_completion_tokens": -1},
    "seed": {"seed": 2**70},
    "temperature": {"temperature": "hot"},
    "top_p": {"top_p": 3},
    "stop": {"stop": [1, 2]},
    "tools": {"tools": [{"type": "function", "function": {"name": "has space"}}]},
    "tool_choice": {"tool_choice": "sometimes"},
    "tools[0].function.parameters": {"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": 7}}}}}]},
    "stream_options": {"stream_options": {"include_usage": "yes"}},
    "keel.context_overflow": {"keel": {"context_overflow": "explode"}},
    "messages.0.tool_calls": {"messages": [{"role": "assistant", "tool_calls": [{"id": 1}]}]},
}


@pytest.mark.parametrize("field", list(CLIENT_MISTAKES))
@pytest.mark.parametrize("model", ["local-chat", "remote"])
def test_client_mistakes_answer_a_typed_4xx_naming_the_field(srv, keys, field, model):
    """Hole 6: these answered 5xx (a plain-text 500 and a dropped connection for max_tokens = 2**70)."""
    body = {"model": model, "messages": HI, "max_tokens": 2, **CLIENT_MISTAKES[field]}
    assert_typed_4xx(post(srv, keys["red"], body), field.split(".")[0])


def test_extra_fields_too_big_for_json_numbers_are_refused_not_crashed_on(srv, keys, upstream):
    """An unknown field passes through to the upstream; one that no 64-bit JSON writer can write must be
    refused as the caller's, not crash the provider."""
    before = upstream.requests
    r = post(srv, keys["red"], b'{"model": "remote", "messages": [{"role": "user", "content": "hi"}], '
                               b'"max_tokens": 2, "weird": [1180591620717411303424]}')
    assert r.status_code in (200, 400, 422), r.text
    r = post(srv, keys["red"], b'{"model": "remote", "messages": [], "weird": NaN}')
    assert_typed_4xx(r)
    assert upstream.requests - before <= 1
    assert_healthy(srv, keys, "remote/one")


def test_upstream_rejection_is_the_callers_not_retried_and_not_held_against_the_deployment(srv, keys, upstream):
    """An upstream's 400 goes back to its caller at once: no retry, no fallback, no circuit failure."""
    upstream.reset()
    upstream.fail_next("400", times=4)
    for _ in range(4):
        r = post(srv, keys["red"], {"model": "remote", "messages": HI})
        assert r.status_code == 400 and r.json()["code"] == "upstream_rejected", r.text
    assert upstream.requests == 4, "one upstream call per request: never retried"
    assert_healthy(srv, keys, "remote/one")


EMBED_MISTAKES = {
    "metadata": {"input": "hi", "metadata": {"use_case": 3}},
    "dimensions": {"input": "hi", "dimensions": 2**70},
    "input": {"input": [{"text": "hi"}]},
    "encoding_format": {"input": "hi", "encoding_format": "hex"},
}


@pytest.mark.parametrize("field", list(EMBED_MISTAKES))
def test_embedding_mistakes_answer_a_typed_4xx_naming_the_field(srv, keys, field):
    r = post(srv, keys["red"], {"model": "local-embed", **EMBED_MISTAKES[field]}, path="/v1/embeddings")
    assert_typed_4xx(r, field)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/embeddings"])
@pytest.mark.parametrize("body", [b"{not json", b'{"model": 5}', b"\xff\xfe", b"[]"])
def test_anonymous_malformed_body_is_401_not_4xx_about_the_body(srv, path, body):
    """Authentication comes before body validation on the hot endpoints: an anonymous caller learns nothing
    about what the body should look like."""
    r = post(srv, None, body, path=path)
    assert r.status_code == 401 and r.json()["code"] == "unauthorized", r.text


@pytest.mark.parametrize("method,path", [("POST", "/admin/budgets"), ("PUT", "/admin/limits/keys/x"),
                                         ("POST", "/admin/deployments")])
@pytest.mark.parametrize("body", [b"{not json", b'{"scope": 5}'])
def test_anonymous_malformed_body_is_401_on_ordinary_routes(srv, method, path, body):
    with srv.client(None) as c:
        r = c.request(method, path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 401 and r.json()["code"] == "unauthorized", r.text
