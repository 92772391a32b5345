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


def vocab_table(collection_id: str) -> str:
    """The collection's FTS5 index read as (term, doc, col, offset) rows: term frequencies for `scoped_bm25`."""
    fts_table(collection_id)  # the same check
    return f"kn_vocab_{collection_id}"


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
        self.stems = scoped_bm25.Stems()

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
            f"content='knowledge_chunks', content_rowid='id', tokenize='{scoped_bm25.TOKENIZE}')")
        conn.exec_driver_sql(f'CREATE VIRTUAL TABLE IF NOT EXISTS "{vocab_table(cid)}" '
                             f"USING fts5vocab(\"{fts_table(cid)}\", 'instance')")

    def create_collection(self, tx: Tx, c: Collection) -> None:
        self._create_fts(tx.conn, c.id)

    def drop_collection(self, tx: Tx, c: Collection) -> None:
        tx.conn.exec_driver_sql(f'DROP TABLE IF EXISTS "{vocab_table(c.id)}"')
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
                readable = sa.select(chunks.c.id).where(chunks.c.document_id.in_(hidden))
        seen = [fts.c.rowid.not_in(readable)] if readable is not None else []

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
        # The predicates on chunk ids run inside the query; when they cannot exclude anything (no filters, no
        # restricted documents this caller may not read) they are skipped, and FTS5 ranks on its own.
        narrow: list = []  # (predicate on a chunk id column) builders
        if readable is not None:
            narrow.append(lambda col: col.not_in(readable))
        if scope.filters:
            filtered = sa.select(chunks.c.id).where(chunks.c.document_id.in_(doc_ok.where(scope.documents_where())))
            narrow.append(lambda col: col.in_(filtered))
        most = stats.over_budget(key, terms, total) if scope.bounded_keyword else None
        if most:  # hybrid's leg, one common term left: rank only its first `most` readable matches (rowid order)
            last = conn.execute(sa.select(fts.c.rowid).where(matches(match), *(f(fts.c.rowid) for f in narrow))
                                .order_by(fts.c.rowid).limit(1).offset(most - 1)).scalar()
            if last is not None:
                narrow.append(lambda col: col <= last)
        if readable is not None:
            exact_df = len(narrow) == 1  # candidates are all readable matches: their count is the term's df
            return self._readable_bm25(conn, c, terms, narrow, None if exact_df else count, total, length, k)
        score = sa.func.bm25(sa.literal_column(f'"{t}"'), *BM25_WEIGHTS).label("s")
        q = sa.select(fts.c.rowid, score).where(matches(match), *(f(fts.c.rowid) for f in narrow))
        q = q.order_by(sa.literal_column("s")).limit(k)
        return [Scored(int(r[0]), -float(r[1])) for r in conn.execute(q)]

    def _readable_bm25(self, conn: sa.Connection, c: Collection, terms: list[str], narrow: list,
                       count: Callable[[str, int], int] | None, rows: int, length: int, k: int) -> list[Scored]:
        """FTS5's bm25() with the statistics of the readable chunks (see `scoped_bm25`): `rows` of them,
        `length` tokens in all; a term's df is its readable rows, `count`ed when `narrow` holds more than
        readability (filters, the hybrid bound), else the candidates found. Term frequencies per chunk and
        column come from FTS5's index (the vocab table) for the word's stem; a word FTS5 cuts into several
        tokens (`gift_card`) is a phrase, and its instances are read from `highlight()` instead."""
        t = fts_table(c.id)
        table = sa.literal_column(f'"{t}"')
        fts = sa.table(t, sa.column("rowid"))
        vocab = sa.table(vocab_table(c.id), sa.column("term"), sa.column("doc"), sa.column("col"))
        weighted = sa.case(*((vocab.c.col == name, w) for name, w in zip(("section", "text"), BM25_WEIGHTS)))
        marks = [sa.func.highlight(table, i, scoped_bm25.OPEN, scoped_bm25.CLOSE) for i in range(len(BM25_WEIGHTS))]
        idfs: list[float] = []
        found: list[tuple[np.ndarray, np.ndarray]] = []  # per term: chunk ids, weighted frequencies
        for term in terms:
            stems = self.stems(term)
            if len(stems) == 1:  # one text value, "chunk freq chunk freq …": no result row per chunk to build
                per = sa.select(vocab.c.doc.label("d"), sa.func.sum(weighted).label("f")).where(
                    vocab.c.term == stems[0], *(f(vocab.c.doc) for f in narrow)).group_by(vocab.c.doc).subquery()
                pairs = conn.execute(sa.select(sa.func.group_concat(
                    sa.cast(per.c.d, sa.Text) + " " + sa.cast(per.c.f, sa.Text), " "))).scalar()
                got = np.array((pairs or "").split(), np.float64).reshape(-1, 2)
            else:
                got = np.array([(rowid, sum(w * col.count(scoped_bm25.OPEN) for w, col in zip(BM25_WEIGHTS, cols)))
                                for rowid, *cols in conn.execute(sa.select(fts.c.rowid, *marks).where(
                                    table.op("MATCH")(f'"{term}"'), *(f(fts.c.rowid) for f in narrow)))],
                               np.float64).reshape(-1, 2)
            ids = got[:, 0].astype(np.int64)  # chunk ids are far below 2**53: exact as floats
            found.append((ids, got[:, 1]))
            idfs.append(scoped_bm25.idf(rows, len(ids) if count is None else count(term, rows + 1)))
        if not any(len(ids) for ids, _ in found):
            return []
        chunk_ids = np.unique(np.concatenate([ids for ids, _ in found]))
        freqs = np.zeros((len(chunk_ids), len(terms)))
        for i, (ids, f) in enumerate(found):
            freqs[np.searchsorted(chunk_ids, ids), i] = f
        sizes = self.lengths.lengths(conn, c.id, chunk_ids.tolist())
        scores = scoped_bm25.bm25_rows(freqs, np.array(idfs), sizes, length / rows if length else 1.0)
        best = np.lexsort((chunk_ids, -scores))[:k]
        return [Scored(int(chunk_ids[j]), float(scores[j])) for j in best]

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
