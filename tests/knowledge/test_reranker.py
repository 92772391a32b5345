"""The retrieval reranker chosen per collection (`metadata.reranker`: an alias of a reranker deployment, a
chat alias, or `off`), overridden per request (`rerank`: an alias, true, false), against a real server with
the embedded embedder: a `local_rerank` cross-encoder (a test-made ONNX model) and a `rerank_api` deployment
on a loopback Cohere-shaped fake. The final order is the reranker's; a failing reranker keeps the fused
order; each rerank is a metered call of kind `rerank`."""

from __future__ import annotations

import pytest

from conftest import EMBEDDED, wait_ledger
from tests.fakes.cross_encoder import build
from tests.fakes.rerank_upstream import FakeRerank
from tests.knowledge.conftest import make_key, upload

pytestmark = pytest.mark.store

FILES = {
    "pip.md": b"# Installing packages\n\nUse pip to install Python packages from the package index.\n",
    "venv.md": b"# Virtual environments\n\nA virtual environment keeps the packages of one project apart.\n",
    "fruit.md": b"# Fruit\n\nBananas and apples are fruit; they are not Python packages.\n",
    "snake.md": b"# Snakes\n\nA python is a large snake that does not install anything.\n",
    "wheel.md": b"# Wheels\n\nA wheel is a built package that pip can install without compiling.\n",
}
QUERY = "how do I install python packages with pip"


@pytest.fixture(scope="module")
def fake():
    with FakeRerank(boost="fruit") as upstream:  # its order differs from the fused one: fruit first
        yield upstream


@pytest.fixture(scope="module")
def srv(module_server_factory, tmp_path_factory, fake):
    base = tmp_path_factory.mktemp("reranker")
    model = build(base / "ce")
    (base / "keel.yaml").write_text(f"""
models:
  - {{alias: local-rerank, provider: local_rerank, kind: rerank, path: {model}}}
  - {{alias: remote-rerank, provider: rerank_api, kind: rerank, model: rr, base_url: {fake.url}}}
ledger_flush_interval_s: 0.1
""")
    server = module_server_factory(config=base / "keel.yaml", **EMBEDDED)
    with server.admin() as c:
        for name, reranker in (("docs-local", "local-rerank"), ("docs-remote", "remote-rerank"), ("docs-plain", None)):
            meta = {"reranker": reranker} if reranker else {}
            assert c.post("/v1/collections", json={"name": name, "classification": "internal",
                                                   "metadata": meta}).status_code == 201
            assert upload(c, name, FILES).json()["status"] == "succeeded"
    return server


def search(srv, collection: str, key: str | None = None, **kw):
    with srv.client(key or srv.admin_key) as c:
        return c.post("/v1/search", json={"query": QUERY, "collections": [collection], "top_k": 5, **kw})


def test_collection_reranker_orders_the_hits(srv, fake):
    r = search(srv, "docs-remote")
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["timings"]["reranker"] == "remote-rerank" and out["timings"]["rerank_ms"] > 0
    sent = [x["body"] for x in fake.received if x["path"] == "/v1/rerank"][-1]
    assert sent["query"] == QUERY and len(sent["documents"]) == len(FILES)
    by_fake = sorted(range(len(sent["documents"])), key=lambda i: (-fake.score(QUERY, sent["documents"][i]), i))
    texts = [h["text"] for h in out["data"]]
    assert texts == [next(h for h in texts if h in sent["documents"][i]) for i in by_fake]
    assert out["data"][0]["source"].endswith("fruit.md")  # the reranker's choice, not the fused one
    rows = wait_ledger(srv.extra["db_url"], f"request_id = '{r.headers['x-request-id']}/rerank'")
    assert rows[0].kind == "rerank" and rows[0].alias == "remote-rerank" and rows[0].use_case == "knowledge.rerank"


def test_local_cross_encoder_reranks_and_false_turns_it_off(srv):
    on = search(srv, "docs-local").json()
    assert on["timings"]["reranker"] == "local-rerank"
    assert on["data"][0]["source"].endswith(("pip.md", "wheel.md"))
    assert on["data"][-1]["source"].endswith(("fruit.md", "snake.md", "venv.md"))
    off = search(srv, "docs-local", rerank=False).json()
    assert "reranker" not in off["timings"] and "rerank_ms" not in off["timings"]
    assert sorted(h["chunk_id"] for h in on["data"]) == sorted(h["chunk_id"] for h in off["data"])


def test_no_setting_no_reranker_and_a_request_may_name_one(srv):
    plain = search(srv, "docs-plain").json()
    assert "reranker" not in plain["timings"]
    named = search(srv, "docs-plain", rerank="local-rerank").json()
    assert named["timings"]["reranker"] == "local-rerank"


def test_a_failing_reranker_keeps_the_fused_order(srv, fake):
    fake.fail_next("500", times=-1)
    try:
        failed = search(srv, "docs-remote")
    finally:
        fake.fail_next("", times=-1)
    assert failed.status_code == 200, failed.text
    fused = search(srv, "docs-remote", rerank=False).json()
    assert [h["chunk_id"] for h in failed.json()["data"]] == [h["chunk_id"] for h in fused["data"]]


def test_a_key_not_allowed_the_reranker_gets_a_clear_404(srv):
    key = make_key(srv, "admin", None, models=["local-embed"])
    r = search(srv, "docs-local", key=key)
    assert r.status_code == 404 and r.json()["code"] == "not_found" and "local-rerank" in r.json()["detail"]
