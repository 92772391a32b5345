"""`POST /v1/rerank` (Cohere/Jina shape) against a real Keel on loopback with httpx: a `rerank_api`
deployment served by a loopback Cohere-shaped fake (indices mapped back, top_n, documents echoed, tokens
and cost metered, upstream errors translated), a `local_rerank` deployment running a test-made ONNX
cross-encoder in process, and the caller's mistakes and permissions (no key, a key not allowed the model,
a chat model, malformed and oversized bodies) as 4xx problems."""

from __future__ import annotations

import httpx
import pytest

from conftest import ADMIN_KEY, eventually, problem, wait_ledger
from tests.fakes.cross_encoder import build
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.rerank_upstream import FakeRerank

DOCS = ["Bananas are a yellow fruit.", "Use pip to install Python packages.", "Python is a snake.",
        {"text": "Install packages with pip, the Python package installer.", "id": "doc-4"}]
QUERY = "how do I install python packages with pip"


@pytest.fixture(scope="module")
def upstreams():
    with FakeRerank(api_key="sk-upstream-rerank") as rr, FakeOpenAI() as chat:
        yield rr, chat


@pytest.fixture(scope="module")
def srv(module_server_factory, tmp_path_factory, upstreams):
    rr, chat = upstreams
    base = tmp_path_factory.mktemp("rerank")
    model = build(base / "cross-encoder")
    (base / "keel.yaml").write_text(f"""
models:
  - {{alias: rerank, provider: rerank_api, kind: rerank, model: rerank-fake, base_url: {rr.url},
      credential: rerank-key, input_price_per_1m: 2.0}}
  - {{alias: local-rerank, provider: local_rerank, kind: rerank, model: bag-ce, path: {model}}}
  - {{alias: chat, provider: openai_compatible, model: gpt-fake, base_url: {chat.url}}}
ledger_flush_interval_s: 0.1
""")
    server = module_server_factory(config=base / "keel.yaml")
    with server.admin() as admin:
        assert admin.put("/admin/secrets/rerank-key", json={"value": "sk-upstream-rerank"}).status_code in (200, 201)
    return server


def post(srv, body, key: str | None = ADMIN_KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(srv.url + "/v1/rerank", json=body, headers=headers, timeout=30)


def key(srv, **body) -> str:
    with srv.admin() as admin:
        r = admin.post("/admin/keys", json=body)
        assert r.status_code == 201, r.text
        return r.json()["key"]


def test_provider_reranker_orders_cuts_echoes_and_meters(srv, upstreams):
    rr, _ = upstreams
    r = post(srv, {"model": "rerank", "query": QUERY, "documents": DOCS, "top_n": 2})
    assert r.status_code == 200, r.text
    out = r.json()
    assert [x["index"] for x in out["results"]] == [3, 1]
    assert out["results"][0]["document"] == {"text": DOCS[3]["text"]}  # Cohere v2's echo: the text
    assert out["results"][1]["document"] == {"text": DOCS[1]}
    assert out["results"][0]["relevance_score"] >= out["results"][1]["relevance_score"]
    sent = [x["body"] for x in rr.received if x["path"] == "/v1/rerank"][-1]
    assert sent["documents"] == [d if isinstance(d, str) else d["text"] for d in DOCS]
    assert sent["model"] == "rerank-fake" and sent["top_n"] == len(DOCS)  # every score, cut by Keel
    tokens = out["usage"]["total_tokens"]
    assert tokens > 0 and out["meta"]["tokens"]["input_tokens"] == tokens
    rid = r.headers["x-request-id"]
    [row] = wait_ledger(srv.extra["db_url"], f"request_id = '{rid}'")
    assert row.kind == "rerank" and row.status == "ok" and row.alias == "rerank" and row.tokens_in == tokens
    assert row.cost == pytest.approx(tokens * 2.0 / 1e6) and float(r.headers["x-keel-cost"]) == pytest.approx(row.cost)


def test_without_documents_in_the_answer(srv):
    r = post(srv, {"model": "rerank", "query": QUERY, "documents": DOCS[:3], "return_documents": False})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 3 and all("document" not in x for x in results)
    assert sorted(x["index"] for x in results) == [0, 1, 2]


def test_local_cross_encoder_ranks_in_process(srv):
    r = post(srv, {"model": "local-rerank", "query": QUERY, "documents": DOCS})
    assert r.status_code == 200, r.text
    out = r.json()
    order = [x["index"] for x in out["results"]]
    assert order[-1] == 0 and set(order[:2]) == {1, 3}  # the fruit last, the pip answers first
    assert out["usage"]["total_tokens"] > 0
    [row] = wait_ledger(srv.extra["db_url"], f"request_id = '{r.headers['x-request-id']}'")
    assert row.kind == "rerank" and row.provider == "local_rerank"


def test_upstream_failure_is_a_clear_gateway_error(srv, upstreams):
    rr, _ = upstreams
    rr.fail_next("500", times=3)  # the first try and both retries
    assert problem(post(srv, {"model": "rerank", "query": QUERY, "documents": DOCS}), 502)["code"] == "upstream_error"
    rr.fail_next("500")  # one failure: the router's retry answers
    assert post(srv, {"model": "rerank", "query": QUERY, "documents": DOCS}).status_code == 200


def test_callers_who_may_not_use_the_model(srv):
    problem(post(srv, {"model": "rerank", "query": "q", "documents": ["a"]}, key=None), 401)
    scoped = key(srv, role="member", name="only-chat", scopes={"models": ["chat"]})
    assert problem(post(srv, {"model": "rerank", "query": "q", "documents": ["a"]}, key=scoped), 404)["code"] == "not_found"
    teamless = key(srv, role="member", name="no-team")
    assert post(srv, {"model": "rerank", "query": "q", "documents": ["a"]}, key=teamless).status_code == 200
    assert problem(post(srv, {"model": "nope", "query": "q", "documents": ["a"]}), 404)["code"] == "not_found"


def test_a_chat_model_is_not_a_reranker(srv):
    body = problem(post(srv, {"model": "chat", "query": "q", "documents": ["a"]}), 400)
    assert body["code"] == "not_supported" and "/v1/chat/completions" in body["fix"]


@pytest.mark.parametrize("body, status", [
    ({"model": "rerank", "query": "q"}, 422),
    ({"model": "rerank", "query": "", "documents": ["a"]}, 422),
    ({"model": "rerank", "query": "q", "documents": []}, 400),
    ({"model": "rerank", "query": "q", "documents": [1, 2]}, 422),
    ({"model": "rerank", "query": "q", "documents": ["a"], "top_n": 0}, 422),
    ({"model": "rerank", "query": "q", "documents": ["a"], "rank_fields": ["title"]}, 400),
    ({"model": "rerank", "query": "q", "documents": ["doc"] * 10_000}, 422),
    ({"model": "rerank", "query": "q", "documents": ["a"], "metadata": {"n": 10**30}}, 422),
])
def test_malformed_and_oversized_requests_are_4xx(srv, body, status):
    assert problem(post(srv, body), status)["code"]


def test_rerank_spend_counts_against_a_budget(srv):
    """Regression: a rerank call reserved nothing and settled nothing, so reranks never spent a budget."""
    with srv.admin() as admin:
        k = admin.post("/admin/keys", json={"role": "member", "name": "budgeted-rerank"}).json()
        budget = admin.post("/admin/budgets", json={"scope": "key", "scope_id": k["id"], "amount": 1.0,
                                                    "period": "day"}).json()
    r = post(srv, {"model": "rerank", "query": QUERY, "documents": DOCS}, key=k["key"])
    assert r.status_code == 200, r.text
    cost = float(r.headers["x-keel-cost"])
    assert cost > 0

    def spent() -> dict | None:
        with srv.admin() as admin:
            got = admin.get(f"/admin/budgets/{budget['id']}").json()
        return got if got["reserved"] == 0 and got["spent"] > 0 else None

    assert eventually(spent, timeout=15, interval=0.1)["spent"] == pytest.approx(cost, rel=1e-3)
