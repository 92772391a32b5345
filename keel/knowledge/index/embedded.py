"""The embedded index: SQLite FTS5 (BM25) per collection in the store file, plus one HNSW file per
collection under `data_dir/knowledge/vectors/`.

Per-collection FTS tables keep BM25's corpus statistics (document frequencies, lengths) inside
the collection, so one collection's contents never shift another's ranking. One process owns
the vector files: a lock file in the data dir makes a second process fail fast at start.
"""

from __future__ import annotations

import fcntl
import logging
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import numpy as np
import sqlalchemy as sa

from keel.core.db import Store
from keel.core.errors import Unavailable
from keel.knowledge.acl import Collection, Scope, document_readable
from keel.knowledge.index import scoped_bm25
from keel.knowledge.index.base import ChunkIn, Scored, TermStats, Tx, insert_chunks, query_terms, reading
from keel.knowledge.index.hnsw import VectorShard
from keel.knowledge.tables import chunks, collections, documents

log = logging.getLogger("keel.knowledge.index")
_SAFE = re.compile(r"^[a-z0-9_]{1,60}$")
BM25_WEIGHTS = (2.0, 1.0)  # section path, text
# The keyword leg of hybrid search ranks at most this share of a large collection's chunks (the rarest query
# terms first; keyword-only search keeps TermStats' 15%). FTS5 computes bm25() for every row an OR-query
# matches, so its cost follows that row count: at 100k chunks the leg was most of a hybrid search's CPU.
# The vector leg backs it up; the figures (CPU, top-10 overlap, dev-half nDCG@10) are in docs/knowledge.md.
HYBRID_BUDGET = 0.05


def fts_table(collection_id: str) -> str:
    if not _SAFE.match(collection_id):
        raise ValueError(f"unsafe collection id {collection_id!r}")
    return f"kn_fts_{collection_id}"


class EmbeddedIndex:
    """SQLite FTS5 + on-disk HNSW. See `ChunkIndex` for the semantics."""

    name: ClassVar[str] = "embedded"

    def __init__(self, store: Store, root: Path) -> None:
        self.store = store
        self.root = root
        self.shards: dict[str, VectorShard] = {}
        self._lock = threading.Lock()
        self._lockfile = None
        self.stats = TermStats()  # keyword-only search
        self.hybrid_stats = TermStats(HYBRID_BUDGET)  # the keyword leg of hybrid search
        self.lengths = scoped_bm25.DocLengths()  # for BM25 over the chunks a caller may read

    # -- lifecycle ------------------------------------------------------------------------
    def open(self) -> None:
        if self._lockfile is not None:
            return
        (self.root / "vectors").mkdir(parents=True, exist_ok=True)
        fh = open(self.root / "LOCK", "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise Unavailable(f"another Keel process is using the embedded knowledge index in {self.root}",
                              fix="stop the other process, or run several replicas on PostgreSQL") from None
        self._lockfile = fh
        with self.store.engine.begin() as conn:
            rows = conn.execute(sa.select(collections.c.id, collections.c.dims)).all()
            for cid, _dims in rows:
                self._create_fts(conn, cid)
        for cid, dims in rows:
            if dims:
                self._reconcile(cid, dims)

    def _fetch(self, ids: list[int]) -> np.ndarray:
        """Embeddings of chunk ids from the store (the source of truth), in the order given."""
        got: dict[int, np.ndarray] = {}
        with reading(self.store) as conn:
            for i in range(0, len(ids), 900):
                got.update(conn.execute(sa.select(chunks.c.id, chunks.c.embedding).where(
                    chunks.c.id.in_(ids[i:i + 900]))).all())
        return np.stack([got[i] for i in ids])

    def _reconcile(self, cid: str, dims: int) -> None:
        shard = self._shard(cid, dims)
        with reading(self.store) as conn:
            rows = [(r[0], r[1]) for r in conn.execute(
                sa.select(chunks.c.id, chunks.c.document_id).where(chunks.c.collection_id == cid))]
        shard.reconcile(rows, self._fetch)
        shard.save()

    def close(self) -> None:
        self.checkpoint()
        if self._lockfile is not None:
            fcntl.flock(self._lockfile, fcntl.LOCK_UN)
            self._lockfile.close()
            self._lockfile = None

    def checkpoint(self) -> None:
        """Write every changed vector file (atomically); called periodically and at stop."""
        for shard in list(self.shards.values()):
            shard.save()

    def _shard(self, cid: str, dims: int) -> VectorShard:
        with self._lock:
            shard = self.shards.get(cid)
            if shard is None:
                shard = self.shards[cid] = VectorShard(self.root / "vectors" / f"{cid}.hnsw", dims)
            return shard

    # -- writes ---------------------------------------------------------------------------
    @staticmethod
    def _create_fts(conn: sa.Connection, cid: str) -> None:
        conn.exec_driver_sql(
            f'CREATE VIRTUAL TABLE IF NOT EXISTS "{fts_table(cid)}" USING fts5(section, text, '
            "content='knowledge_chunks', content_rowid='id', tokenize='porter unicode61')")

    def create_collection(self, tx: Tx, c: Collection) -> None:
        self._create_fts(tx.conn, c.id)

    def drop_collection(self, tx: Tx, c: Collection) -> None:
        tx.conn.exec_driver_sql(f'DROP TABLE IF EXISTS "{fts_table(c.id)}"')
        tx.conn.execute(chunks.delete().where(chunks.c.collection_id == c.id))

        def forget() -> None:
            self.lengths.changed(c.id)
            with self._lock:
                self.shards.pop(c.id, None)
            for suffix in (".hnsw", ".tmp"):
                (self.root / "vectors" / f"{c.id}{suffix}").unlink(missing_ok=True)

        tx.after_commit(forget)

    def _unindex(self, conn: sa.Connection, cid: str, document_ids: list[str]) -> None:
        t = fts_table(cid)
        for doc in document_ids:
            conn.exec_driver_sql(
                f'INSERT INTO "{t}"("{t}", rowid, section, text) '
                "SELECT 'delete', id, section, text FROM knowledge_chunks WHERE document_id = ?", (doc,))
        conn.execute(chunks.delete().where(chunks.c.document_id.in_(document_ids)))

    def write_document(self, tx: Tx, c: Collection, document_id: str, items: list[ChunkIn]) -> None:
        self._unindex(tx.conn, c.id, [document_id])
        ids = insert_chunks(tx.conn, c, document_id, items)
        t = fts_table(c.id)
        tx.conn.exec_driver_sql(f'INSERT INTO "{t}"(rowid, section, text) '
                                "SELECT id, section, text FROM knowledge_chunks WHERE document_id = ?", (document_id,))
        vectors = np.stack([it.embedding for it in items]).astype(np.float32) if items else None

        def publish() -> None:
            self.lengths.changed(c.id, [document_id])
            if vectors is None and c.id not in self.shards:
                return
            shard = self._shard(c.id, vectors.shape[1] if vectors is not None else c.dims or 0)
            shard.remove_documents([document_id])
            if vectors is not None:
                shard.add(document_id, ids, vectors)

        tx.after_commit(publish)

    def delete_documents(self, tx: Tx, c: Collection, document_ids: list[str]) -> None:
        if not document_ids:
            return
        self._unindex(tx.conn, c.id, document_ids)

        def publish() -> None:
            self.lengths.changed(c.id, document_ids)
            shard = self.shards.get(c.id)
            if shard is not None:
                shard.remove_documents(document_ids)

        tx.after_commit(publish)

    # -- reads ----------------------------------------------------------------------------
    def keyword(self, query: str, scope: Scope, k: int) -> list[Scored]:
        terms = query_terms(query)
        if not terms or k <= 0:
            return []
        gens = {c.id: self.lengths.generation(c.id) for c in scope.collections}  # before the read snapshot
        hits: list[Scored] = []
        with reading(self.store) as conn:
            for c in scope.collections:
                hits += self._keyword_one(conn, c, terms, scope, k, gens[c.id])
        hits.sort(key=lambda h: -h.score)
        return hits[:k]

    def _keyword_one(self, conn: sa.Connection, c: Collection, terms: list[str], scope: Scope,
                     k: int, gen: int) -> list[Scored]:
        t = fts_table(c.id)
        fts = sa.table(t, sa.column("rowid"))
        matches = sa.literal_column(f'"{t}"').op("MATCH")
        p = scope.principal
        doc_ok = sa.select(documents.c.id).where(documents.c.collection_id == c.id)
        # Documents this caller may not read must not weigh on its ranking either: with any in the collection,
        # term counts, N and the average length come from readable chunks and BM25 is computed here (FTS5's
        # bm25() would take them over the whole table, an oracle for what the hidden documents say).
        readable = None
        if not p.is_admin:
            hidden = doc_ok.where(documents.c.restricted == sa.true(), sa.not_(document_readable(p)))
            if conn.execute(hidden.limit(1)).first() is not None:
                readable = fts.c.rowid.not_in(sa.select(chunks.c.id).where(chunks.c.document_id.in_(hidden)))
        seen = [readable] if readable is not None else []

        def count(term: str, cap: int) -> int:
            inner = sa.select(fts.c.rowid).where(matches(f'"{term}"'), *seen).limit(cap).subquery()
            return int(conn.execute(sa.select(sa.func.count()).select_from(inner)).scalar() or 0)

        if readable is None:
            key = c.id
            shard = self.shards.get(c.id)
            total = len(shard.doc_of) if shard is not None else 0
        else:  # term rarity is a statistic too: counted over what this caller reads, cached per reader class
            key = f"{c.id}\x00{p.role}\x00{p.team_id or ''}"
            docs = list(conn.execute(doc_ok.where(document_readable(p))).scalars())
            total, length = self.lengths.totals(conn, c.id, docs, gen)
            if not total:
                return []
        stats = self.hybrid_stats if scope.bounded_keyword else self.stats
        terms = stats.select(key, terms, total, count)
        match = " OR ".join(f'"{w}"' for w in terms)
        # The predicate runs inside the query; when it cannot exclude anything (no filters, no
        # restricted documents this caller may not read) it is skipped, and FTS5 ranks on its own.
        where = [*seen]
        if scope.filters:
            where.append(fts.c.rowid.in_(sa.select(chunks.c.id).where(
                chunks.c.document_id.in_(doc_ok.where(scope.documents_where())))))
        most = stats.over_budget(key, terms, total) if scope.bounded_keyword else None
        if most:  # hybrid's leg, one common term left: rank only its first `most` readable matches (rowid order)
            last = conn.execute(sa.select(fts.c.rowid).where(matches(match), *where).order_by(fts.c.rowid)
                                .limit(1).offset(most - 1)).scalar()
            if last is not None:
                where.append(fts.c.rowid <= last)
        if readable is not None:
            return self._readable_bm25(conn, fts, t, terms, where, count, total, length, k)
        score = sa.func.bm25(sa.literal_column(f'"{t}"'), *BM25_WEIGHTS).label("s")
        q = sa.select(fts.c.rowid, score).where(matches(match), *where)
        q = q.order_by(sa.literal_column("s")).limit(k)
        return [Scored(int(r[0]), -float(r[1])) for r in conn.execute(q)]

    @staticmethod
    def _readable_bm25(conn: sa.Connection, fts: sa.TableClause, t: str, terms: list[str], where: list,
                       count: Callable[[str, int], int], rows: int, length: int, k: int) -> list[Scored]:
        """FTS5's bm25() with the statistics of the readable chunks: `rows` of them, `length` tokens in all,
        each term's rows `count`ed under the same predicate (see `scoped_bm25`)."""
        table = sa.literal_column(f'"{t}"')
        idfs = [scoped_bm25.idf(rows, count(term, rows + 1)) for term in terms]
        freqs: dict[int, list[float]] = {}
        lengths: dict[int, int] = {}
        marks = [sa.func.highlight(table, i, scoped_bm25.OPEN, scoped_bm25.CLOSE) for i in range(len(BM25_WEIGHTS))]
        for i, term in enumerate(terms):
            for rowid, *cols in conn.execute(sa.select(fts.c.rowid, *marks).where(table.op("MATCH")(f'"{term}"'),
                                                                               *where)):
                f = freqs.setdefault(rowid, [0.0] * len(terms))
                f[i] = sum(w * col.count(scoped_bm25.OPEN) for w, col in zip(BM25_WEIGHTS, cols))
                if rowid not in lengths:
                    lengths[rowid] = sum(scoped_bm25.tokens(col) for col in cols)
        avg = length / rows if length else 1.0
        scored = sorted(((scoped_bm25.bm25(f, idfs, lengths[r], avg), r) for r, f in freqs.items()),
                        key=lambda sr: (-sr[0], sr[1]))
        return [Scored(r, s) for s, r in scored[:k]]

    def vector(self, vector: np.ndarray, scope: Scope, k: int) -> list[Scored]:
        q = np.asarray(vector, np.float32)
        hits: list[Scored] = []
        for c in scope.collections:
            shard = self.shards.get(c.id)
            if shard is None or shard.dims != q.shape[0]:
                continue
            allowed = None
            if scope.narrowed:
                allowed = self._allowed_documents(scope, c)
            hits += [Scored(label, sim) for label, sim in shard.search(q, k, allowed, self._fetch)]
        hits.sort(key=lambda h: -h.score)
        return hits[:k]

    def _allowed_documents(self, scope: Scope, c: Collection) -> set[str] | None:
        """The readable documents of `c` under `scope`, or None when that is all of them."""
        with reading(self.store) as conn:
            if not scope.filters:
                restricted = conn.execute(sa.select(documents.c.id).where(
                    documents.c.collection_id == c.id, documents.c.restricted == sa.true()).limit(1)).first()
                if restricted is None:
                    return None
            return set(conn.execute(sa.select(documents.c.id).where(
                documents.c.collection_id == c.id, scope.documents_where())).scalars())
