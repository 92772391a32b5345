"""Keyword ranking must not depend on documents the caller may not read. A restricted document (its own ACL
narrowing who reads it) is left out of a reader's hits, yet SQLite FTS5's bm25() weighs each term by its
frequency over the whole collection's index, hidden chunks included: two readable chunks, one with `alpha` and
one with `beta`, swap places for a reader depending on which word a restricted document repeats — an oracle for
what restricted documents say. (PostgreSQL's ts_rank uses no corpus statistics and does not leak.)"""

from __future__ import annotations

import json

import pytest

from tests.fakes.openai_upstream import FakeOpenAI
from tests.knowledge.conftest import upload

pytestmark = pytest.mark.store
VISIBLE = {"a.md": b"alpha gamma delta\n", "b.md": b"beta gamma delta\n"}


@pytest.fixture(scope="module")
def srv(module_server_factory, tmp_path_factory):
    with FakeOpenAI(reply="ok") as fake:
        base = tmp_path_factory.mktemp("stats-leak")
        (base / "keel.yaml").write_text(
            f"models:\n  - {{alias: fake-embed, provider: openai_compatible, model: e, kind: embedding, "
            f"base_url: {fake.url}}}\n")
        s = module_server_factory(config=base / "keel.yaml")
        with s.admin() as a:
            assert a.post("/admin/teams", json={"name": "red"}).status_code in (201, 409)
            keys = {role: a.post("/admin/keys", json={"role": role, "team": "red"}).json()["key"]
                    for role in ("builder", "member")}
        with s.client(keys["builder"]) as b:
            assert b.post("/v1/collections", json={"name": "handbook", "embedding_model": "fake-embed",
                                                   "classification": "internal"}).status_code == 201
            assert upload(b, "handbook", VISIBLE).json()["status"] == "succeeded"
        yield s, keys


def _hidden(s, keys, word: str) -> None:
    """The restricted document (builders only) now repeats `word`."""
    body = "\n\n".join(f"# Part {i}\n\n{word} {word} memo {i}" for i in range(12)).encode()
    with s.client(keys["builder"]) as b:
        job = upload(b, "handbook", {"secret.md": body}, acl=json.dumps({"roles": ["builder"]})).json()
        assert job["status"] == "succeeded", job


def _order(s, keys) -> list[str]:
    with s.client(keys["member"]) as m:
        r = m.post("/v1/search", json={"query": "alpha beta", "collections": ["handbook"], "mode": "bm25"})
        assert r.status_code == 200, r.text
        hits = r.json()["data"] if "data" in r.json() else r.json()["hits"]
    sources = [h["source"] for h in hits]
    assert "secret.md" not in sources
    return sources


def test_a_restricted_documents_words_do_not_reorder_a_readers_hits(srv):
    s, keys = srv
    _hidden(s, keys, "alpha")
    with_alpha = _order(s, keys)
    _hidden(s, keys, "beta")
    with_beta = _order(s, keys)
    assert sorted(with_alpha) == sorted(with_beta) == ["a.md", "b.md"]
    assert with_alpha == with_beta, (with_alpha, with_beta)
