"""BM25 over the chunks one caller may read: the embedded index's keyword ranking when some of a collection's
documents are hidden from the caller.

SQLite FTS5's bm25() takes its statistics (row count, average length, how many rows hold each term) over the
whole FTS table, so a restricted document would still move a reader's ranking — an oracle for what it says.
Here FTS5's own formula (k1 1.2, b 0.75, idf log((N - n + 0.5) / (n + 0.5)) floored at 1e-6, column weights on
term frequencies, a row's length its tokens over all columns) runs in Keel with N, the average length and each
term's n counted over readable chunks only. FTS5 still finds the rows and marks the matching tokens
(`highlight()`), so stemming and matching stay FTS5's.

>>> round(bm25([2.0], [idf(10, 1)], 8, 8.0), 4)
2.538
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Iterable

import sqlalchemy as sa

from keel.knowledge.tables import chunks

K1, B, IDF_FLOOR = 1.2, 0.75, 1e-6
OPEN, CLOSE = "\x01", "\x02"  # highlight() markers; neither is a token character
# unicode61's token characters are letters, numbers and private-use marks; `_` and punctuation separate tokens.
_TOKEN = re.compile(r"[^\W_]+")


def tokens(text: str) -> int:
    """How many tokens FTS5's unicode61 tokenizer cuts `text` into (porter stemming keeps the count)."""
    return len(_TOKEN.findall(text))


def idf(rows: int, hits: int) -> float:
    """FTS5's idf of a term found in `hits` of `rows` rows (never below its 1e-6 floor)."""
    v = math.log((rows - hits + 0.5) / (hits + 0.5))
    return v if v > 0 else IDF_FLOOR


def bm25(freqs: Iterable[float], idfs: Iterable[float], length: int, avg: float) -> float:
    """FTS5's bm25() (positive: higher is better) for a row of `length` tokens with weighted term `freqs`."""
    norm = K1 * (1 - B + B * length / avg)
    return sum(w * f * (K1 + 1) / (f + norm) for f, w in zip(freqs, idfs) if f)


class DocLengths:
    """Chunks and tokens per document, so N and the average length over the documents a caller reads cost a
    dictionary lookup each. A document is counted from its chunks' text once and forgotten when it changes
    (`changed`, called after the write commits); one process owns the embedded index, so nothing else writes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._known: dict[str, dict[str, tuple[int, int]]] = {}
        self._gen: dict[str, int] = {}

    def generation(self, collection_id: str) -> int:
        """Read before the query's snapshot: counts are kept only if no write committed since."""
        return self._gen.get(collection_id, 0)

    def changed(self, collection_id: str, document_ids: Iterable[str] | None = None) -> None:
        with self._lock:
            self._gen[collection_id] = self._gen.get(collection_id, 0) + 1
            if document_ids is None:
                self._known.pop(collection_id, None)
            else:
                known = self._known.get(collection_id, {})
                for d in document_ids:
                    known.pop(d, None)

    def totals(self, conn: sa.Connection, collection_id: str, document_ids: list[str], gen: int) -> tuple[int, int]:
        """(chunks, tokens) summed over `document_ids`, counting the documents not yet known from `conn`."""
        with self._lock:
            known = dict(self._known.get(collection_id, {}))
        missing = [d for d in document_ids if d not in known]
        got = dict.fromkeys(missing, (0, 0))
        for i in range(0, len(missing), 500):
            q = sa.select(chunks.c.document_id, chunks.c.section, chunks.c.text).where(
                chunks.c.document_id.in_(missing[i:i + 500]))
            for doc, section, text in conn.execute(q):
                n, t = got[doc]
                got[doc] = (n + 1, t + tokens(section) + tokens(text))
        if got:
            with self._lock:
                if self._gen.get(collection_id, 0) == gen:
                    self._known.setdefault(collection_id, {}).update(got)
        known.update(got)
        n = t = 0
        for d in document_ids:
            dn, dt = known[d]
            n += dn
            t += dt
        return n, t
