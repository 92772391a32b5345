"""A reader's keyword ranking is computed as if the documents it may not read were not in the index at all:
scores equal, to rounding, those of a twin collection that never held them (term document frequencies,
chunk count and average length all taken over readable chunks). Run on the store under test: the embedded
index (FTS5) on SQLite, tsvector on PostgreSQL (whose ts_rank uses no corpus statistics)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import sqlalchemy as sa

from keel.core.db import Store
from keel.identity.principal import Principal
from keel.knowledge.acl import Collection, Scope
from keel.knowledge.index import ChunkIn, TermStats
from tests.knowledge.index_rows import add_collection, opened_index, put_document

pytestmark = pytest.mark.store
DIMS = 8
ADMIN = Principal(key_id="k_admin", role="admin")
MEMBER = Principal(key_id="k_m", role="member", team_id="team_a")
VISIBLE = {  # source -> [(section, text)]; punctuation, accents and underscores exercise the length count
    "guide.md": [("Refunds > Policy", "Refund requests within 30 days get a full refund; refund after that, credit."),
                 ("Refunds > Exceptions", "Naïve exceptions: déjà-vu orders, gift_cards and x² promos — no refund.")],
    "notes.txt": [("", "Shipping takes 3-5 days. Express shipping costs extra; refund of shipping is partial.")],
    "faq.pdf": [("FAQ", "Can I get a refund? Yes. Can I change shipping? Yes, before dispatch."),
                ("FAQ > Credit", "Store credit never expires and beats a refund for gift orders.")],
}
HIDDEN = [("Board", "refund refund refund shipping shipping credit gift_cards " * 6), ("Board", "refund plan for the merger")]
QUERIES = ["refund", "gift_cards refund", "refund shipping", "store credit refund", "express shipping days", "gift orders credit"]


@pytest.fixture
def env(db_url, tmp_path):
    with opened_index(db_url, tmp_path / "data") as (store, index):
        def coll(name: str) -> Collection:
            return add_collection(store, index, name, DIMS)

        def doc(c: Collection, source: str, parts: list[tuple[str, str]], restricted_to: str | None = None) -> None:
            rng = np.random.default_rng(len(source))
            items = [ChunkIn(i, text, section, None, 0, len(text), len(text.split()),
                             rng.standard_normal(DIMS).astype(np.float32)) for i, (section, text) in enumerate(parts)]
            put_document(store, index, c, f"{c.id}_{source}".replace(".", "_"), items, source=source,
                         restricted_to=restricted_to)

        yield store, index, coll, doc


def texts(store: Store, hits) -> list[tuple[str, float]]:
    with store.engine.connect() as conn:
        rows = dict(conn.execute(sa.text("SELECT id, text FROM knowledge_chunks")).all())
    return [(rows[h.chunk_id], h.score) for h in hits]


def same(got: list[tuple[str, float]], want: list[tuple[str, float]]) -> bool:
    """The same chunks with the same scores (order among equal scores aside)."""
    return sorted(t for t, _ in got) == sorted(t for t, _ in want) and all(
        math.isclose(g, w, rel_tol=1e-9, abs_tol=1e-12) for g, w in zip(sorted(s for _, s in got),
                                                                         sorted(s for _, s in want)))


def test_a_readers_keyword_scores_equal_a_twin_collection_without_the_hidden_document(env):
    store, index, coll, doc = env
    shared, twin = coll("shared"), coll("twin")
    for source, parts in VISIBLE.items():
        doc(shared, source, parts)
        doc(twin, source, parts)
    doc(shared, "board.md", HIDDEN, restricted_to="team_hr")
    for q in QUERIES:
        want = texts(store, index.keyword(q, Scope(ADMIN, (twin,)), 10))
        got = texts(store, index.keyword(q, Scope(MEMBER, (shared,)), 10))
        assert want and same(got, want), (q, got, want)
        pdf_only = texts(store, index.keyword(q, Scope(MEMBER, (shared,), {"format": "pdf"}), 10))
        want_pdf = [h for h in want if any(h[0] == t for _, t in VISIBLE["faq.pdf"])]
        assert same(pdf_only, want_pdf), (q, pdf_only, want_pdf)
    hr = Principal(key_id="k_hr", role="member", team_id="team_hr")
    assert any("merger" in t for t, _ in texts(store, index.keyword("merger refund", Scope(hr, (shared,)), 10)))


def test_a_rewritten_hidden_document_moves_nothing_a_reader_sees(env):
    """The oracle itself: what a restricted document says, rewritten, must not change a reader's hits."""
    store, index, coll, doc = env
    c = coll("shared")
    for source, parts in VISIBLE.items():
        doc(c, source, parts)
    runs = []
    for word in ("refund", "shipping", "credit"):
        doc(c, "board.md", [("Board", f"{word} {word} {word} memo")] * 8, restricted_to="team_hr")
        runs.append([texts(store, index.keyword(q, Scope(MEMBER, (c,)), 10)) for q in QUERIES])
    assert runs[0] == runs[1] == runs[2]


def test_the_hybrid_legs_term_choice_in_a_large_collection_ignores_hidden_documents(env):
    """Large collections keep only the rarest query terms: rarity counted over readable chunks, so a hidden
    document repeating a word cannot make it 'common' for a reader and drop it from the reader's query."""
    store, index, coll, doc = env
    if index.name != "embedded":
        pytest.skip("PostgreSQL judges term frequencies from ANALYZE's statistics (its KEYWORD_BUDGET)")
    index.hybrid_stats = TermStats(0.2, min_chunks=10)
    c = coll("large")
    doc(c, "base.md", [("", f"plain filler text number {i}") for i in range(20)]
        + [("", "alpha item one"), ("", "beta item one"), ("", "beta item two")])
    leg = Scope(MEMBER, (c,), bounded_keyword=True)
    runs = []
    for word in ("alpha", "beta"):
        doc(c, "hidden.md", [("", f"{word} secret")] * 12, restricted_to="team_hr")
        runs.append(texts(store, index.keyword("alpha beta", leg, 10)))
    assert runs[0] == runs[1], runs
    assert "alpha item one" in [t for t, _ in runs[0]], "both terms are rare among readable chunks"
