"""OpenAI's legacy completions (`/v1/completions`) with the official `openai` SDK against a real Keel on
loopback, served by a scripted loopback OpenAI-compatible upstream: plain and streamed answers, several
prompts, options passed on, what Keel does not serve refused by name, governance, and ledger rows."""

from __future__ import annotations

import httpx
import openai
import pytest

from conftest import ADMIN_KEY, problem, wait_ledger
from tests.fakes import DEFAULT_REPLY
from tests.fakes.openai_upstream import FakeOpenAI
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
    base = tmp_path_factory.mktemp("completions")
    (base / "policy.yaml").write_text(POLICY)
    (base / "keel.yaml").write_text(f"""
models:
  - {{alias: fake, provider: openai_compatible, model: gpt-fake, id: fake/remote, base_url: {fake.url},
      input_price_per_1m: 1.0, output_price_per_1m: 2.0}}
ledger_flush_interval_s: 0.1
""")
    return module_server_factory(config=base / "keel.yaml", KEEL_POLICY_FILE=str(base / "policy.yaml"))


@pytest.fixture(scope="module")
def client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=ADMIN_KEY, max_retries=0)


def upstream_bodies(fake) -> list[dict]:
    return [r["body"] for r in fake.received if r["path"].endswith("/chat/completions")]


def test_completion_answers_text_with_usage_and_a_ledger_row(srv, client, fake):
    raw = client.completions.with_raw_response.create(model="fake", prompt="Say hello", max_tokens=40,
                                                      temperature=0.5, stop=["\n\n"], seed=7)
    resp = raw.parse()
    assert resp.object == "text_completion" and resp.model == "fake"
    [choice] = resp.choices
    assert choice.text == DEFAULT_REPLY and choice.index == 0 and choice.finish_reason == "stop"
    assert resp.usage.prompt_tokens > 0 and resp.usage.completion_tokens > 0
    body = upstream_bodies(fake)[-1]
    assert body["messages"] == [{"role": "user", "content": "Say hello"}]
    assert body["stop"] == ["\n\n"] and body["seed"] == 7 and body["temperature"] == 0.5
    rid = raw.headers["x-request-id"]
    assert resp.id == f"cmpl-{rid}"
    [row] = wait_ledger(srv.extra["db_url"], f"request_id = '{rid}'")
    assert row.status == "ok" and row.kind == "chat" and not row.stream
    assert (row.tokens_in, row.tokens_out) == (resp.usage.prompt_tokens, resp.usage.completion_tokens)
    assert float(raw.headers["x-keel-cost"]) == pytest.approx(row.cost) and row.cost > 0


def test_completion_streams_text_completion_chunks(srv, client):
    raw = client.completions.with_raw_response.create(model="fake", prompt="Say hello", stream=True,
                                                      stream_options={"include_usage": True})
    chunks = list(raw.parse())
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == DEFAULT_REPLY and len(texts) > 1
    assert all(c.object == "text_completion" for c in chunks)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens > 0 and not chunks[-1].choices
    [row] = wait_ledger(srv.extra["db_url"], f"request_id = '{raw.headers['x-request-id']}'")
    assert row.stream and row.status == "ok" and row.tokens_out == usage.completion_tokens


def test_several_prompts_give_one_choice_each_and_one_ledger_row_each(srv, client, fake):
    raw = client.completions.with_raw_response.create(model="fake", prompt=["one", "two", "three"], max_tokens=3)
    resp = raw.parse()
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in resp.choices)
    assert {b["messages"][0]["content"] for b in upstream_bodies(fake)[-3:]} == {"one", "two", "three"}
    rid = raw.headers["x-request-id"]
    rows = wait_ledger(srv.extra["db_url"], f"request_id LIKE '{rid}/%'", 3)
    assert sorted(r.request_id for r in rows) == [f"{rid}/0", f"{rid}/1", f"{rid}/2"]
    assert sum(r.tokens_out for r in rows) == resp.usage.completion_tokens


@pytest.mark.parametrize("extra, name", [
    ({"echo": True}, "echo"), ({"n": 2}, "n"), ({"best_of": 3}, "best_of"), ({"logprobs": 2}, "logprobs"),
    ({"suffix": "end"}, "suffix"), ({"frobnicate": 1}, "frobnicate")])
def test_what_keel_does_not_serve_is_refused_by_name(client, extra, name):
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="fake", prompt="x", extra_body=extra)
    assert refused.value.body["code"] == "not_supported" and f"`{name}`" in refused.value.message


def test_neutral_values_of_unsupported_options_pass(client):
    resp = client.completions.create(model="fake", prompt="x", echo=False, n=1, best_of=1)
    assert resp.choices[0].text == DEFAULT_REPLY


def test_caller_mistakes_are_4xx_problems(srv):
    url, auth = srv.url + "/v1/completions", {"Authorization": f"Bearer {ADMIN_KEY}"}

    def post(body) -> httpx.Response:
        return httpx.post(url, json=body, headers=auth, timeout=30)

    assert problem(httpx.post(url, content=b"{nope", headers=auth), 400)["code"] == "malformed_json"
    problem(httpx.post(url, json={"model": "fake", "prompt": "x"}), 401)
    assert problem(post({"model": "fake", "prompt": [1, 2, 3]}), 400)["code"] == "not_supported"
    assert problem(post({"model": "fake", "prompt": ["a", "b"], "stream": True}), 400)["code"] == "not_supported"
    assert problem(post({"model": "fake", "prompt": []}), 400)["code"] == "bad_request"
    assert problem(post({"model": "fake", "prompt": ["x"] * 17}), 400)["code"] == "bad_request"
    assert problem(post({"model": "fake", "prompt": "x", "max_tokens": 0}), 422)["code"] == "validation_error"
    assert problem(post({"model": "fake"}), 422)["code"] == "validation_error"
    assert problem(post({"model": "fake", "prompt": "x" * (11 * 1024 * 1024)}), 413)["code"] == "payload_too_large"
    assert problem(post({"model": "nope", "prompt": "x"}), 404)["code"] == "not_found"


def test_one_refused_prompt_refuses_the_request_and_every_prompt_is_metered(srv, client, fake):
    raw = client.completions.with_raw_response
    with pytest.raises(openai.PermissionDeniedError) as refused:
        raw.create(model="fake", prompt=["fine", "my key is AKIAIOSFODNN7EXAMPLE", "also fine"])
    rid = refused.value.response.headers["x-request-id"]
    rows = wait_ledger(srv.extra["db_url"], f"request_id LIKE '{rid}/%'", 3)
    assert sorted(r.status for r in rows) == ["error", "ok", "ok"]


def test_governance_applies(srv, client, fake):
    before = fake.stats()["requests"]
    with pytest.raises(openai.PermissionDeniedError):
        client.completions.create(model="fake", prompt="hi", extra_body={"metadata": {"classification": "restricted"}})
    with pytest.raises(openai.PermissionDeniedError):
        client.completions.create(model="fake", prompt="my key is AKIAIOSFODNN7EXAMPLE", stream=True)
    assert fake.stats()["requests"] == before
