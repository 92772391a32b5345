"""The chunk index's shared types and helpers, which every backend imports (see the package for the
protocol's story)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import numpy as np
import sqlalchemy as sa

from keel.core.db import Store
from keel.knowledge.acl import Collection, Scope
from keel.knowledge.tables import chunks


@dataclass(frozen=True)
class Scored:
    """One retrieved chunk: its id and the method's own score (higher is better)."""

    chunk_id: int
    score: float


@dataclass
class ChunkIn:
    """A chunk to store: its text, where it sits in its document, and its embedding."""

    ordinal: int
    text: str
    section: str
    page: int | None
    start: int
    end: int
    tokens: int
    embedding: np.ndarray


@dataclass
class Tx:
    """A write transaction; `after_commit` callbacks run only once it has committed."""

    conn: sa.Connection
    _after: list[Callable[[], None]] = field(default_factory=list)

    def after_commit(self, fn: Callable[[], None]) -> None:
        self._after.append(fn)


@contextmanager
def transaction(store: Store) -> Iterator[Tx]:
    with store.engine.begin() as conn:
        tx = Tx(conn)
        yield tx
    for fn in tx._after:
        fn()


class ChunkIndex(Protocol):
    """Stores the chunks of documents and retrieves them, never outside the given Scope.

    Semantics every implementation keeps (checked by the conformance tests):
    - `write_document` replaces all chunks of one document inside the caller's transaction `tx`:
      readers see either the old chunks or the new ones, never a mix, and nothing if `tx` rolls back.
    - `delete_documents` / `drop_collection` remove chunks the same way; deleted chunks are never
      returned again.
    - `keyword` and `vector` return at most `k` hits, best first, with a score where higher is
      better, only of chunks whose document satisfies `scope.documents_where()` (collections,
      document ACL and filters are applied inside the query, so a caller can never receive, count
      or rank against a chunk it may not read). A query with no usable terms returns `[]`.
    - Results for one collection do not depend on the contents of other collections.
    - `open()` brings any on-disk structures up to date with the store (after a crash too);
      `close()` persists them. Both are blocking and idempotent.
    """

    name: ClassVar[str]

    def open(self) -> None: ...

    def close(self) -> None: ...

    def create_collection(self, tx: Tx, c: Collection) -> None: ...

    def drop_collection(self, tx: Tx, c: Collection) -> None: ...

    def write_document(self, tx: Tx, c: Collection, document_id: str, items: list[ChunkIn]) -> None: ...

    def delete_documents(self, tx: Tx, c: Collection, document_ids: list[str]) -> None: ...

    def keyword(self, query: str, scope: Scope, k: int) -> list[Scored]: ...

    def vector(self, vector: np.ndarray, scope: Scope, k: int) -> list[Scored]: ...


STOPWORDS = frozenset("""a an and are as at be but by can could did do does for from had has have how i if in into
is it its me my no not of on or our so such than that the their them then there these they this to was
we were what when where which who whom why will with would you your""".split())
_WORD = re.compile(r"\w+")
_ALNUM = re.compile(r"[^\W_]")


def query_terms(query: str) -> list[str]:
    """Distinct lower-case words of `query`, without stopwords (all words if only stopwords)."""
    words = list(dict.fromkeys(w.lower() for w in _WORD.findall(query) if _ALNUM.search(w)))
    kept = [w for w in words if w not in STOPWORDS]
    return (kept or words)[:64]


class TermStats:
    """Document frequencies of query terms per collection, counted up to a cap and cached briefly.

    A keyword query costs about as many rows as its terms match, and the most common terms
    ("python" in Python's docs) match most rows while adding least to BM25 (lowest IDF). In a
    large collection `select` keeps the rarest terms whose matches fit a row budget (at least
    one term), so latency stays bounded; small collections use every term. `budget` is that row
    budget as a share of the collection's chunks."""

    MIN_CHUNKS, BUDGET, TTL_S = 20_000, 0.15, 300.0

    def __init__(self, budget: float = BUDGET, min_chunks: int = MIN_CHUNKS) -> None:
        self.budget = budget
        self.min_chunks = min_chunks
        self._cache: dict[tuple[str, str], tuple[float, int]] = {}

    def forget(self, collection_id: str) -> None:
        for key in [k for k in self._cache if k[0] == collection_id]:
            self._cache.pop(key, None)

    def select(self, collection_id: str, terms: list[str], total: int,
               count: Callable[[str, int], int]) -> list[str]:
        """The terms to query; `count(term, cap)` counts the chunks matching `term`, stopping at `cap`.
        When every term matches more than the budget, their counts were all cut at the cap and say
        nothing about which is rarest: they are then counted in full (once per TTL), so the one term
        kept is the rarest rather than the first in the query."""
        if total < self.min_chunks or len(terms) < 2:
            return terms
        budget = int(total * self.budget)
        now = time.monotonic()
        if len(self._cache) > 50_000:
            self._cache.clear()
        df = {}
        for t in terms:
            hit = self._cache.get((collection_id, t))
            if hit is None or hit[0] < now:
                hit = (now + self.TTL_S, count(t, budget + 1))
                self._cache[(collection_id, t)] = hit
            df[t] = hit[1]
        if min(df.values()) > budget:
            for t in terms:
                if df[t] == budget + 1:  # cut at the cap: count it in full
                    df[t] = max(count(t, total + 1), budget + 2)
                    self._cache[(collection_id, t)] = (self._cache[(collection_id, t)][0], df[t])
        kept, used = [], 0
        for t in sorted(terms, key=lambda t: df[t]):
            if kept and used + df[t] > budget:
                break
            kept.append(t)
            used += df[t]
        return [t for t in terms if t in kept]

    def over_budget(self, collection_id: str, terms: list[str], total: int) -> int | None:
        """The row budget when the kept `terms` may match more chunks than it (one common term kept
        alone), else None; counts from the last `select`."""
        if total < self.min_chunks:
            return None
        budget = int(total * self.budget)
        rows = sum(self._cache.get((collection_id, t), (0.0, budget + 1))[1] for t in terms)
        return budget if rows > budget else None


def insert_chunks(conn: sa.Connection, c: Collection, document_id: str, items: list[ChunkIn]) -> list[int]:
    """Insert chunk rows; returns their ids in the order of `items`."""
    if not items:
        return []
    rows = [{"document_id": document_id, "collection_id": c.id, "ordinal": it.ordinal, "section": it.section,
             "text": it.text, "page": it.page, "span_start": it.start, "span_end": it.end, "tokens": it.tokens,
             "embedding": it.embedding} for it in items]
    result = conn.execute(chunks.insert().returning(chunks.c.id, sort_by_parameter_order=True), rows)
    return [r[0] for r in result]


@contextmanager
def reading(store: Store) -> Iterator[sa.Connection]:
    """A read-only connection: on SQLite a plain BEGIN, so searches never wait for the write lock."""
    with store.engine.connect() as conn:
        conn.info["write"] = False
        try:
            yield conn
        finally:
            conn.info["write"] = True
