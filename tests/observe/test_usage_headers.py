"""Headers peers' clients read on every gateway answer: `x-keel-cost` (exact for a finished answer, an
upper bound for a stream, which must send its headers first), `x-ratelimit-*` from Keel's own key and team
limits, and `Retry-After` on every 429 and 503 Keel returns."""

from __future__ import annotations

import contextlib
import re

import httpx
import pytest

from conftest import fake_upstream, problem, wait_ledger
from keel.core.errors import RateLimited, Unavailable
from keel.core.http import problem_response

pytestmark = pytest.mark.store
CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 20}


@pytest.fixture
def upstream():
    with contextlib.ExitStack() as stack:
        yield stack.enter_context(fake_upstream())


def write_config(tmp_path, root: str):
    cfg = tmp_path / "keel.yaml"
    cfg.write_text(f"""
models:
  - alias: fake
    provider: openai_compatible
    model: gpt-fake
    base_url: {root}/v1
    input_price_per_1m: 1.0
    output_price_per_1m: 2.0
  - alias: fake-embed
    provider: openai_compatible
    model: embed-fake
    kind: embedding
    base_url: {root}/v1
    input_price_per_1m: 3.0
aliases:
  fake:
    retries: 0
ledger_flush_interval_s: 0.1
""")
    return cfg


def test_cost_header_is_exact_for_answers_and_an_upper_bound_for_streams(server_factory, upstream, tmp_path):
    srv = server_factory(config=write_config(tmp_path, upstream))
    c = srv.admin()
    r = c.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200, r.text
    u = r.json()["usage"]
    assert float(r.headers["x-keel-cost"]) == pytest.approx((u["prompt_tokens"] * 1 + u["completion_tokens"] * 2) / 1e6)
    assert "e" not in r.headers["x-keel-cost"] and "x-keel-cost-estimated" not in r.headers
    row, = wait_ledger(srv.extra["db_url"], f"request_id = '{r.headers['x-request-id']}'")
    assert float(r.headers["x-keel-cost"]) == pytest.approx(row.cost)

    with c.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as s:
        assert s.status_code == 200
        bound = float(s.headers["x-keel-cost"])
        assert s.headers["x-keel-cost-estimated"] == "upper-bound"
        s.read()
    row, = wait_ledger(srv.extra["db_url"], f"request_id = '{s.headers['x-request-id']}'")
    assert 0 < row.cost <= bound

    e = c.post("/v1/embeddings", json={"model": "fake-embed", "input": ["one two three"]})
    assert e.status_code == 200, e.text
    assert float(e.headers["x-keel-cost"]) == pytest.approx(e.json()["usage"]["prompt_tokens"] * 3 / 1e6)


def test_rate_limit_headers_count_down_and_the_429_says_when_to_retry(server_factory, upstream, tmp_path):
    srv = server_factory(config=write_config(tmp_path, upstream))
    admin = srv.admin()
    key = admin.post("/admin/keys", json={"role": "member", "name": "limited"}).json()
    assert admin.put(f"/admin/limits/keys/{key['id']}", json={"rpm": 3, "tpm": 100_000}).status_code == 200
    c = srv.client(key["key"])
    seen = []
    for _ in range(3):
        r = c.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 200, r.text
        h = r.headers
        assert h["x-ratelimit-limit-requests"] == "3" and h["x-ratelimit-limit-tokens"] == "100000"
        reset = h["x-ratelimit-reset-requests"]
        assert re.fullmatch(r"\d+s", reset) and int(reset[:-1]) <= 60
        assert 0 < int(h["x-ratelimit-remaining-tokens"]) < 100_000
        seen.append(int(h["x-ratelimit-remaining-requests"]))
    assert all(0 <= n <= 2 for n in seen), seen
    if seen != [2, 1, 0]:  # requests after a minute boundary count in a new window: the countdown restarts
        pytest.skip(f"the requests straddled a minute boundary: {seen}")
    r = c.post("/v1/chat/completions", json=CHAT)
    problem(r, 429, "3 requests per minute")
    assert int(r.headers["retry-after"]) >= 1
    assert r.headers["x-ratelimit-remaining-requests"] == "0" and r.headers["x-ratelimit-limit-requests"] == "3"

    # Without a limit, no rate-limit headers are made up.
    assert "x-ratelimit-limit-requests" not in admin.post("/v1/chat/completions", json=CHAT).headers


def test_every_429_and_503_has_retry_after(server_factory, upstream, tmp_path):
    """Regression guard: an upstream 429 without its own retry-after was passed on with none."""
    srv = server_factory(config=write_config(tmp_path, upstream))
    httpx.post(upstream + "/_control", json={"fault": "429", "times": 1, "retry_after": ""})
    r = srv.admin().post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 429, r.text
    assert int(r.headers["retry-after"]) >= 1
    httpx.post(upstream + "/_control", json={"fault": "429", "times": 1, "retry_after": ""})
    m = srv.admin().post("/v1/messages", headers={"anthropic-version": "2023-06-01"},
                         json={"model": "fake", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]})
    assert m.status_code == 429 and m.json()["type"] == "error", m.text  # Anthropic's error shape, same header
    assert int(m.headers["retry-after"]) >= 1
    for err in (Unavailable("down"), RateLimited("slow down"), Unavailable("later", headers={"Retry-After": "7"})):
        resp = problem_response(err)
        assert int(resp.headers["retry-after"]) >= 1
    assert problem_response(Unavailable("later", headers={"Retry-After": "7"})).headers["retry-after"] == "7"
