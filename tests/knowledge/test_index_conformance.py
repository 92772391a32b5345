"""The chunk index conformance suite. One class, run against the index of whichever store the
suite runs on: the embedded index (FTS5 + HNSW files) on SQLite, pgvector + tsvector on PostgreSQL
(`KEEL_TEST_DATABASE=postgres`). Vectors are synthetic so the suite needs no model."""

from __future__ import annotations

import numpy as np
import pytest
import sqlalchemy as sa

from keel.core.db import Store
from keel.identity.principal import Principal
from keel.knowledge.acl import Collection, Scope
from keel.knowledge.index import ChunkIn, TermStats, open_index, transaction
from keel.knowledge.tables import documents
from tests.knowledge.index_rows import add_collection, put_document

pytestmark = pytest.mark.store
DIMS = 384
ADMIN = Principal(key_id="k_admin", role="admin")
MEMBER = Principal(key_id="k_m", role="member", team_id="team_a")


def unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIMS).astype(np.float32)
    return v / np.linalg.norm(v)


class ChunkIndexConformance:
    """Semantics every `ChunkIndex` keeps; subclasses provide the `make_index` fixture."""

    @pytest.fixture
    def env(self, make_index):
        store, index = make_index()
        made: dict[str, Collection] = {}

        def coll(name: str) -> Collection:
            made[name] = add_collection(store, index, name, DIMS)
            return made[name]

        def doc(c: Collection, doc_id: str, texts: list[str], seeds: list[int], *, restricted_to: str | None = None,
                fmt: str = "md", fail: bool = False) -> None:
            items = [ChunkIn(i, t, "S", None, 0, len(t), len(t.split()), unit(s)) for i, (t, s) in
                     enumerate(zip(texts, seeds))]
            put_document(store, index, c, doc_id, items, fmt=fmt, restricted_to=restricted_to, fail=fail)

        yield store, index, coll, doc
        index.close()
        store.dispose()

    @staticmethod
    def ids(store, hits) -> list[str]:
        with store.engine.connect() as conn:
            rows = dict(conn.execute(sa.text("SELECT id, text FROM knowledge_chunks")).all())
        return [rows[h.chunk_id] for h in hits]

    def test_keyword_and_vector_find_the_right_chunk(self, env):
        store, index, coll, doc = env
        c = coll("a")
        doc(c, "d1", ["the invoice approval workflow", "holiday allowance for staff"], [1, 2])
        scope = Scope(ADMIN, (c,))
        kw = index.keyword("How are invoices approved?", scope, 5)
        assert self.ids(store, kw)[0] == "the invoice approval workflow"
        vec = index.vector(unit(2), scope, 5)
        assert self.ids(store, vec)[0] == "holiday allowance for staff" and vec[0].score > 0.99
        assert all(a.score >= b.score for a, b in zip(vec, vec[1:]))
        assert index.keyword("the of and", scope, 5) == [] or all(h.score is not None for h in kw)
        assert index.keyword("", scope, 5) == []

    def test_rewrite_replaces_all_chunks_and_delete_removes_them(self, env):
        store, index, coll, doc = env
        c = coll("a")
        doc(c, "d1", ["alpha version of the policy", "second alpha chunk"], [1, 2])
        doc(c, "d1", ["beta version of the policy"], [3])
        scope = Scope(ADMIN, (c,))
        assert self.ids(store, index.keyword("alpha", scope, 5)) == []
        assert self.ids(store, index.keyword("policy", scope, 5)) == ["beta version of the policy"]
        assert self.ids(store, index.vector(unit(1), scope, 5)) == ["beta version of the policy"]
        with transaction(store) as tx:
            index.delete_documents(tx, c, ["d1"])
            tx.conn.execute(documents.delete().where(documents.c.id == "d1"))
        assert index.keyword("policy", scope, 5) == [] and index.vector(unit(3), scope, 5) == []

    def test_rolled_back_write_leaves_nothing(self, env):
        store, index, coll, doc = env
        c = coll("a")
        with pytest.raises(RuntimeError):
            doc(c, "d1", ["phantom text never committed"], [7], fail=True)
        scope = Scope(ADMIN, (c,))
        assert index.keyword("phantom", scope, 5) == [] and index.vector(unit(7), scope, 5) == []

    def test_scope_limits_collections_and_document_acl_inside_the_query(self, env):
        store, index, coll, doc = env
        a, b = coll("a"), coll("b")
        doc(a, "open", ["salary bands are public"], [1])
        doc(a, "secret", ["salary of the ceo"], [2], restricted_to="team_hr")
        doc(b, "other", ["salary survey of competitors"], [3])
        member_a = Scope(MEMBER, (a,))
        got = self.ids(store, index.keyword("salary", member_a, 10)) + self.ids(store, index.vector(unit(2), member_a, 10))
        assert "salary of the ceo" not in got and "salary survey of competitors" not in got
        assert "salary bands are public" in got
        hr = Principal(key_id="k_hr", role="member", team_id="team_hr")
        assert "salary of the ceo" in self.ids(store, index.vector(unit(2), Scope(hr, (a,)), 10))
        assert len(index.vector(unit(2), member_a, 10)) == 1, "k is filled only with readable chunks"

    def test_filters_apply_inside_the_query(self, env):
        store, index, coll, doc = env
        c = coll("a")
        doc(c, "guide.md", ["refund rules in markdown"], [1], fmt="md")
        doc(c, "guide.pdf", ["refund rules in pdf"], [2], fmt="pdf")
        scope = Scope(ADMIN, (c,), {"format": "pdf"})
        assert self.ids(store, index.keyword("refund", scope, 5)) == ["refund rules in pdf"]
        assert self.ids(store, index.vector(unit(1), scope, 5)) == ["refund rules in pdf"]
        assert self.ids(store, index.keyword("refund", Scope(ADMIN, (c,), {"source": "guide.*"}), 5)) != []

    def test_results_do_not_depend_on_other_collections(self, env):
        store, index, coll, doc = env
        a, b = coll("a"), coll("b")
        doc(a, "d1", ["vacation policy for engineers", "vacation carry over rules", "parental leave"], [1, 2, 3])
        scope = Scope(MEMBER, (a,))
        before = (index.keyword("vacation policy rules", scope, 5), index.vector(unit(2), scope, 5))
        doc(b, "noise", ["vacation vacation vacation policy"] * 3 + ["unrelated"], [4, 5, 6, 7])
        after = (index.keyword("vacation policy rules", scope, 5), index.vector(unit(2), scope, 5))
        assert before == after

    def test_hybrid_keyword_leg_keeps_only_the_rarest_terms_within_its_budget(self, env):
        """Hybrid search's keyword leg (`bounded_keyword`) ranks a smaller share of a large collection than
        keyword-only search: the commonest query terms are dropped first, the vector leg backs it up."""
        store, index, coll, doc = env
        if index.name != "embedded":
            pytest.skip("PostgreSQL judges term frequencies from ANALYZE's statistics (its KEYWORD_BUDGET)")
        c = coll("a")
        doc(c, "d1", [f"common words about topic {i}" for i in range(30)] + ["a rare common thing", "rare alone"],
            list(range(100, 132)))
        index.hybrid_stats = TermStats(0.1, min_chunks=10)  # a 32-chunk collection counts as large here
        keyword_only = self.ids(store, index.keyword("common rare", Scope(ADMIN, (c,)), 50))
        hybrid_leg = self.ids(store, index.keyword("common rare", Scope(ADMIN, (c,), bounded_keyword=True), 50))
        assert len(keyword_only) == 32, "keyword-only search in a small collection: every term"
        assert sorted(hybrid_leg) == ["a rare common thing", "rare alone"]

    def test_hybrid_keyword_leg_keeps_the_rarest_of_common_terms_and_bounds_its_rows(self, env):
        """When every query term matches more than the hybrid leg's budget, the one kept is the rarest
        (not the first in the query), and only its first budget's worth of matches is ranked."""
        store, index, coll, doc = env
        if index.name != "embedded":
            pytest.skip("PostgreSQL judges term frequencies from ANALYZE's statistics (its KEYWORD_BUDGET)")
        c = coll("a")
        texts = [f"common words about topic {i}" for i in range(25)] + [f"common and rare {i}" for i in range(7)]
        doc(c, "d1", texts, list(range(200, 232)))
        index.hybrid_stats = TermStats(0.1, min_chunks=10)  # 32 chunks count as large: 3 rows ranked
        hybrid_leg = self.ids(store, index.keyword("common rare", Scope(ADMIN, (c,), bounded_keyword=True), 50))
        assert len(hybrid_leg) == 3 and all("rare" in t for t in hybrid_leg), hybrid_leg
        assert len(index.keyword("common rare", Scope(ADMIN, (c,)), 50)) == 32, "keyword-only: every match"
        doc(c, "d2.pdf", ["common rare in a pdf", "rare pdf again"], [300, 301], fmt="pdf")
        pdf = self.ids(store, index.keyword("common rare", Scope(ADMIN, (c,), {"format": "pdf"}, True), 50))
        assert sorted(pdf) == ["common rare in a pdf", "rare pdf again"], "the bound counts readable matches only"

    def test_reopen_after_crash_recovers_from_the_store(self, env, make_index):
        store, index, coll, doc = env
        c = coll("a")
        doc(c, "d1", ["persisted chunk about printers"], [11])
        doc(c, "d2", ["chunk that will be deleted"], [12])
        with transaction(store) as tx:
            index.delete_documents(tx, c, ["d2"])
            tx.conn.execute(documents.delete().where(documents.c.id == "d2"))
        # no close(): as after kill -9; a new process opens the same store and data dir
        if hasattr(index, "_lockfile") and index._lockfile is not None:
            index._lockfile.close()
            index._lockfile = None
        _store2, again = make_index(reuse=True)
        scope = Scope(ADMIN, (c,))
        assert self.ids(store, again.vector(unit(11), scope, 5)) == ["persisted chunk about printers"]
        assert self.ids(store, again.keyword("printers", scope, 5)) == ["persisted chunk about printers"]
        again.close()


class TestStoreIndex(ChunkIndexConformance):
    """Runs the conformance suite on the index of the store under test (SQLite or PostgreSQL)."""

    @pytest.fixture
    def make_index(self, db_url, tmp_path):
        opened = {}

        def make(reuse: bool = False):
            store = opened.get("store") if reuse else None
            if store is None:
                store = Store.open(db_url)
                store.upgrade()
                opened["store"] = store
            index = open_index(store, tmp_path / "data")
            index.open()
            return store, index

        return make
