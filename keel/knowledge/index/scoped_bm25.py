"""BM25 over the chunks one caller may read: the embedded index's keyword ranking when some of a collection's
documents are hidden from the caller.

SQLite FTS5's bm25() takes its statistics (row count, average length, how many rows hold each term) over the
whole FTS table, so a restricted document would still move a reader's ranking — an oracle for what it says.
Here FTS5's own formula (k1 1.2, b 0.75, idf log((N - n + 0.5) / (n + 0.5)) floored at 1e-6, column weights on
term frequencies, a row's length its tokens over all columns) runs in Keel with N, the average length and each
term's n counted over readable chunks only. Term frequencies come from FTS5's own index (an `fts5vocab`
'instance' table) for the query word's stem as FTS5's tokenizer cuts it, so matching stays FTS5's.

>>> round(bm25([2.0], [idf(10, 1)], 8, 8.0), 4)
2.538
"""

from __future__ import annotations

import math
import re
import sqlite3
import threading
from collections.abc import Iterable

import numpy as np
import sqlalchemy as sa

from keel.knowledge.tables import chunks

K1, B, IDF_FLOOR = 1.2, 0.75, 1e-6
TOKENIZE = "porter unicode61"  # the FTS tables' tokenizer
OPEN, CLOSE = "\x01", "\x02"  # highlight() markers; neither is a token character
# unicode61's token characters are letters, numbers and private-use marks; `_` and punctuation separate tokens.
_TOKEN = re.compile(r"[^\W_]+")
_ASCII = bytes(c if chr(c).isalnum() else 32 for c in range(128)) + b" " * 128  # ASCII text: one C pass


def tokens(text: str) -> int:
    """How many tokens FTS5's unicode61 tokenizer cuts `text` into (porter stemming keeps the count)."""
    if text.isascii():
        return len(text.encode().translate(_ASCII).split())
    return len(_TOKEN.findall(text))


def idf(rows: int, hits: int) -> float:
    """FTS5's idf of a term found in `hits` of `rows` rows (never below its 1e-6 floor)."""
    v = math.log((rows - hits + 0.5) / (hits + 0.5))
    return v if v > 0 else IDF_FLOOR


def bm25(freqs: Iterable[float], idfs: Iterable[float], length: int, avg: float) -> float:
    """FTS5's bm25() (positive: higher is better) for a row of `length` tokens with weighted term `freqs`."""
    norm = K1 * (1 - B + B * length / avg)
    return sum(w * f * (K1 + 1) / (f + norm) for f, w in zip(freqs, idfs) if f)


def bm25_rows(freqs: np.ndarray, idfs: np.ndarray, lengths: np.ndarray, avg: float) -> np.ndarray:
    """`bm25` for many rows at once: `freqs` is rows x terms, `lengths` one per row."""
    norm = (K1 * (1 - B + B * lengths / avg))[:, None]
    return (idfs * freqs * (K1 + 1) / (freqs + norm)).sum(axis=1)


class Stems:
    """A query word's tokens as the FTS tables index them (`running` -> `run`), from FTS5's own tokenizer
    on a private in-memory table; remembered per word."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(":memory:", check_same_thread=False)
        self._db.execute(f"CREATE VIRTUAL TABLE w USING fts5(x, tokenize='{TOKENIZE}')")
        self._db.execute("CREATE VIRTUAL TABLE wv USING fts5vocab(w, 'instance')")
        self._known: dict[str, tuple[str, ...]] = {}

    def __call__(self, word: str) -> tuple[str, ...]:
        got = self._known.get(word)
        if got is None:
            with self._lock:
                self._db.execute("DELETE FROM w")
                self._db.execute("INSERT INTO w(x) VALUES (?)", (word,))
                got = tuple(r[0] for r in self._db.execute("SELECT term FROM wv ORDER BY offset"))
                if len(self._known) > 50_000:
                    self._known.clear()
                self._known[word] = got
        return got


class DocLengths:
    """Each chunk's length in tokens, and per document its chunks and their total, so N and the average
    length over the documents a caller reads cost a lookup per document. A document is counted from its
    chunks' text once and forgotten when it changes (`changed`, after the write commits); one process owns
    the embedded index, so nothing else writes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._docs: dict[str, dict[str, tuple[tuple[int, ...], int]]] = {}  # collection -> doc -> (chunk ids, tokens)
        self._chunks: dict[str, dict[int, int]] = {}  # collection -> chunk id -> tokens
        self._gen: dict[str, int] = {}
        self._touched: dict[str, dict[str | None, int]] = {}  # collection -> doc (None: all) -> generation changed

    def generation(self, collection_id: str) -> int:
        """Read before the query's snapshot: a document's counts are kept only if it did not change since."""
        return self._gen.get(collection_id, 0)

    def changed(self, collection_id: str, document_ids: Iterable[str] | None = None) -> None:
        with self._lock:
            gen = self._gen[collection_id] = self._gen.get(collection_id, 0) + 1
            if document_ids is None:
                self._docs.pop(collection_id, None)
                self._chunks.pop(collection_id, None)
                self._touched[collection_id] = {None: gen}
                return
            docs, lengths = self._docs.get(collection_id, {}), self._chunks.get(collection_id, {})
            touched = self._touched.setdefault(collection_id, {})
            for d in document_ids:
                touched[d] = gen
                for cid in docs.pop(d, ((), 0))[0]:
                    lengths.pop(cid, None)

    def totals(self, conn: sa.Connection, collection_id: str, document_ids: list[str], gen: int) -> tuple[int, int]:
        """(chunks, tokens) summed over `document_ids`, counting the documents not yet known from `conn`."""
        with self._lock:
            docs = self._docs.get(collection_id, {})
            have = {d: docs[d] for d in document_ids if d in docs}
        missing = [d for d in document_ids if d not in have]
        got: dict[str, tuple[list[int], int]] = {d: ([], 0) for d in missing}
        lengths: dict[int, int] = {}
        for i in range(0, len(missing), 500):
            q = sa.select(chunks.c.document_id, chunks.c.id, chunks.c.section, chunks.c.text).where(
                chunks.c.document_id.in_(missing[i:i + 500]))
            for doc, cid, section, text in conn.execute(q):
                n = lengths[cid] = tokens(section) + tokens(text)
                ids, total = got[doc]
                ids.append(cid)
                got[doc] = (ids, total + n)
        have.update((d, (tuple(ids), total)) for d, (ids, total) in got.items())
        if got:
            with self._lock:
                touched = self._touched.get(collection_id, {})
                if touched.get(None, 0) <= gen:
                    keep = [d for d in got if touched.get(d, 0) <= gen]
                    self._docs.setdefault(collection_id, {}).update((d, have[d]) for d in keep)
                    self._chunks.setdefault(collection_id, {}).update(
                        (cid, lengths[cid]) for d in keep for cid in have[d][0])
        return sum(len(ids) for ids, _ in have.values()), sum(total for _, total in have.values())

    def lengths(self, conn: sa.Connection, collection_id: str, chunk_ids: list[int]) -> np.ndarray:
        """Tokens of each chunk, in order; a chunk not known (its document rewritten meanwhile) is counted
        from `conn`."""
        known = self._chunks.get(collection_id, {})
        try:
            return np.fromiter(map(known.__getitem__, chunk_ids), np.float64, len(chunk_ids))
        except KeyError:
            pass
        missing = [cid for cid in chunk_ids if cid not in known]
        counted: dict[int, int] = {}
        for i in range(0, len(missing), 500):
            q = sa.select(chunks.c.id, chunks.c.section, chunks.c.text).where(chunks.c.id.in_(missing[i:i + 500]))
            counted.update((cid, tokens(s) + tokens(t)) for cid, s, t in conn.execute(q))
        return np.array([counted[cid] if cid in counted else known[cid] for cid in chunk_ids], np.float64)
