"""The scale-out index: PostgreSQL full-text (a generated, weighted tsvector with GIN) and pgvector
HNSW (one partial index per embedding width), all in `knowledge_chunks`.

`ts_rank` uses no corpus-wide statistics, so one collection's contents never shift another's
keyword ranking. It reads each matching row's tsvector from the heap (a few µs a row), so in large
collections the commonest query terms are left out (see `TermStats`, judged by the lexeme
frequencies ANALYZE keeps for the tsvector column). As the keyword leg of hybrid search it is
bounded twice more: terms are dropped until the rest match at most `KEYWORD_BUDGET` of the chunks,
and when even the rarest term matches more, only the first that many matches (in table order) are
ranked — the vector leg backs it up. Keyword-only search ranks every match of the kept terms. Vector search uses pgvector's
iterative index scans, so the permission and filter predicates run inside the index scan and still
fill `k` results.
"""

from __future__ import annotations

import time
from typing import ClassVar

import numpy as np
import sqlalchemy as sa
from sqlalchemy.types import UserDefinedType

from keel.core.db import Store
from keel.knowledge.acl import Collection, Scope
from keel.knowledge.index.base import ChunkIn, Scored, TermStats, Tx, insert_chunks, query_terms
from keel.knowledge.tables import chunks, documents

EF_SEARCH = 100
# The keyword leg's row budget, below TermStats' shared one: ranking every match the shared budget allows
# is slow on PostgreSQL at scale, and this smaller share keeps the leg's p95 bounded even with other work on
# the machine (bench/ingest.py; the figures are in bench/README.md).
KEYWORD_BUDGET = 0.04


class _VectorN(UserDefinedType):
    """`vector(n)`, for casting a query vector to the width of an HNSW expression index."""

    cache_ok = True

    def __init__(self, dims: int) -> None:
        self.dims = dims

    def get_col_spec(self, **kw: object) -> str:
        return f"vector({int(self.dims)})"


class PostgresIndex:
    """tsvector + pgvector. See `ChunkIndex` for the semantics."""

    name: ClassVar[str] = "postgres"

    def __init__(self, store: Store) -> None:
        self.store = store
        self._widths: set[int] = {384}
        self.stats = TermStats()  # keyword-only search: the shared 15% budget, every match ranked
        self.hybrid_stats = TermStats(KEYWORD_BUDGET)
        self._stems: dict[str, str] = {}
        self._totals: dict[str, tuple[float, int]] = {}
        self._freqs: tuple[float, dict[str, float]] = (0.0, {})

    def open(self) -> None:
        return None

    def close(self) -> None:
        return None

    def checkpoint(self) -> None:
        return None

    def create_collection(self, tx: Tx, c: Collection) -> None:
        if c.dims:
            self._ensure_width(tx.conn, c.dims)

    def _ensure_width(self, conn: sa.Connection, dims: int) -> None:
        if dims in self._widths:
            return
        conn.exec_driver_sql(
            f"CREATE INDEX IF NOT EXISTS ix_knowledge_chunks_hnsw_{int(dims)} ON knowledge_chunks USING hnsw "
            f"((embedding::vector({int(dims)})) vector_cosine_ops) WHERE vector_dims(embedding) = {int(dims)}")
        self._widths.add(dims)

    def drop_collection(self, tx: Tx, c: Collection) -> None:
        tx.conn.execute(chunks.delete().where(chunks.c.collection_id == c.id))

    def write_document(self, tx: Tx, c: Collection, document_id: str, items: list[ChunkIn]) -> None:
        tx.conn.execute(chunks.delete().where(chunks.c.document_id == document_id))
        if items:
            self._ensure_width(tx.conn, int(items[0].embedding.shape[0]))
        insert_chunks(tx.conn, c, document_id, items)

    def delete_documents(self, tx: Tx, c: Collection, document_ids: list[str]) -> None:
        if document_ids:
            tx.conn.execute(chunks.delete().where(chunks.c.document_id.in_(document_ids)))

    def keyword(self, query: str, scope: Scope, k: int) -> list[Scored]:
        terms = query_terms(query)
        if not terms or k <= 0 or not scope.collections:
            return []
        tsv = sa.literal_column("knowledge_chunks.tsv")
        english = sa.literal_column("'english'::regconfig")
        key = ",".join(sorted(scope.collection_ids))
        most = None  # rows ranked at most
        with self.store.engine.connect() as conn:
            total = self._total(conn, key, scope.collection_ids)
            stats = self.hybrid_stats if scope.bounded_keyword else self.stats
            if total >= TermStats.MIN_CHUNKS:
                most = int(total * KEYWORD_BUDGET) if scope.bounded_keyword else None
                if len(terms) > 1:
                    freqs = self._lexeme_freqs(conn)
                    stems = self._stems_of(conn, terms)

                    def count(term: str, cap: int) -> int:
                        return min(cap, round(freqs.get(stems.get(term) or "", 0.0) * total))

                    terms = stats.select(key, terms, total, count)
            tsq = sa.func.to_tsquery(english, " | ".join(terms))
            matches = sa.select(chunks.c.id, tsv.label("tsv")).where(
                chunks.c.collection_id.in_(scope.collection_ids), tsv.op("@@")(tsq))
            if scope.filters or not scope.principal.is_admin:
                matches = matches.where(chunks.c.document_id.in_(
                    sa.select(documents.c.id).where(scope.documents_where())))
            m = (matches.limit(most) if most else matches).subquery()
            q = sa.select(m.c.id, sa.func.ts_rank(m.c.tsv, tsq, 1).label("s")).order_by(sa.desc("s")).limit(k)
            return [Scored(int(r[0]), float(r[1])) for r in conn.execute(q)]

    def _stems_of(self, conn: sa.Connection, terms: list[str]) -> dict[str, str]:
        """The english lexeme(s) of each term, as `to_tsvector` makes them (cached: they never change)."""
        missing = [t for t in terms if t not in self._stems]
        if missing:
            if len(self._stems) > 50_000:
                self._stems.clear()
            self._stems.update(conn.execute(sa.text(
                "SELECT t, array_to_string(tsvector_to_array(to_tsvector('english', t)), ' ') "
                "FROM unnest(CAST(:terms AS text[])) AS t"), {"terms": missing}).all())
        return {t: self._stems.get(t, "") for t in terms}

    def _lexeme_freqs(self, conn: sa.Connection) -> dict[str, float]:
        """Share of chunks holding each common lexeme, from the statistics ANALYZE keeps for the
        tsvector column (no scan); lexemes not listed are rarer than every listed one."""
        now = time.monotonic()
        if self._freqs[0] < now:
            row = conn.execute(sa.text(
                "SELECT most_common_elems::text::text[], most_common_elem_freqs FROM pg_stats "
                "WHERE tablename = 'knowledge_chunks' AND attname = 'tsv'")).first()
            freqs = dict(zip(row[0], row[1])) if row is not None and row[0] else {}
            self._freqs = (now + TermStats.TTL_S, freqs)
        return self._freqs[1]

    def _total(self, conn: sa.Connection, key: str, collection_ids: list[str]) -> int:
        """Chunks in these collections (from document counts), cached for a minute."""
        now = time.monotonic()
        hit = self._totals.get(key)
        if hit is None or hit[0] < now:
            n = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(documents.c.chunk_count), 0)).where(
                documents.c.collection_id.in_(collection_ids))).scalar()
            hit = self._totals[key] = (now + 60.0, int(n or 0))
        return hit[1]

    def vector(self, vector: np.ndarray, scope: Scope, k: int) -> list[Scored]:
        if k <= 0 or not scope.collections:
            return []
        q = np.asarray(vector, np.float32)
        dims = int(q.shape[0])
        literal = "[" + ",".join(map(repr, q.tolist())) + "]"
        qv = sa.cast(sa.bindparam("qv", literal, type_=sa.String), _VectorN(dims))
        dist = sa.literal_column(f"(knowledge_chunks.embedding::vector({dims}))").op("<=>")(qv).label("d")
        sql = (sa.select(chunks.c.id, dist)
               .select_from(chunks.join(documents, documents.c.id == chunks.c.document_id))
               # a literal, not a parameter: the planner must see it to use the partial HNSW index
               .where(sa.text(f"vector_dims(knowledge_chunks.embedding) = {dims}"),
                      chunks.c.collection_id.in_(scope.collection_ids), scope.documents_where())
               .order_by(sa.literal_column("d")).limit(k))
        with self.store.engine.begin() as conn:
            conn.exec_driver_sql("SET LOCAL hnsw.iterative_scan = relaxed_order")
            conn.exec_driver_sql(f"SET LOCAL hnsw.ef_search = {max(EF_SEARCH, 2 * k)}")
            rows = conn.execute(sql).all()
        hits = [Scored(int(r[0]), 1.0 - float(r[1])) for r in rows]
        hits.sort(key=lambda h: -h.score)
        return hits
