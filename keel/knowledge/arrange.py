"""The final arrangement of hybrid search's fused list, before any reranker: two cheap, store-independent
steps over the fused top `DEPTH`, both chosen on the dev halves of bench/retrieval.py.

- Query-term coverage: each hit's fused score gains `COVERAGE_WEIGHT` times the share of the question's
  terms (stop words dropped, plural/-ing/-ed endings stripped) that its text holds. Rank fusion sees only
  ranks, so a chunk that holds every word of "Is there a scanf() equivalent?" but ranks low in the vector
  leg sank below thirty dense neighbours; this lifts it by about one top vector rank's worth.
- Section grouping: the chunks of one section (same document and section path) follow that section's
  best chunk, so an answer cut into several chunks is read together rather than split by other documents.

Hits are never added or dropped, so it cannot widen what the caller sees. Below `DEPTH` the fused order
stays. A hit's `score` is its fused score plus the coverage term (grouped chunks keep their own).

Example:
    >>> terms("How do I convert strings to numbers?")
    ['convert', 'str', 'number']
"""

from __future__ import annotations

import re

from keel.knowledge.hits import Hit
from keel.knowledge.index import query_terms

__all__ = ["COVERAGE_WEIGHT", "DEPTH", "arrange", "coverage", "terms"]

# Chosen on the dev halves (83 FAQ, 33 long questions): section grouping and a coverage weight of 0.08 at depth 30;
# heading coverage as a third term, and a logistic regression over both legs' ranks, similarity, coverage and
# section/document support, did no better (the figures: bench/README.md).
COVERAGE_WEIGHT = 0.08
DEPTH = 30
_WORD = re.compile(r"\w+")
_SUFFIXES = ("ing", "es", "ed", "s")


def stem(word: str) -> str:
    """A light stemmer: common English endings off while three letters stay, repeated so that a stem is its
    own stem ("strings" and "string" both give "str")."""
    while True:
        for suffix in _SUFFIXES:
            if len(word) > len(suffix) + 2 and word.endswith(suffix):
                word = word[: -len(suffix)]
                break
        else:
            return word


def terms(query: str) -> list[str]:
    """The question's distinct terms as coverage counts them: no stop words, stemmed, in order."""
    return list(dict.fromkeys(stem(w) for w in query_terms(query)))


def coverage(query_terms_: list[str], text: str) -> float:
    """Share of `query_terms_` (from `terms`) that `text` holds."""
    if not query_terms_:
        return 0.0
    words = {stem(w) for w in _WORD.findall(text.lower())}
    return sum(t in words for t in query_terms_) / len(query_terms_)


def arrange(hits: list[Hit], query: str, *, depth: int | None = None, weight: float | None = None) -> list[Hit]:
    """`hits` (fused order, best first) with their top `depth` (default `DEPTH`) re-scored by coverage (weight
    default `COVERAGE_WEIGHT`) and grouped by section."""
    depth = DEPTH if depth is None else depth
    weight = COVERAGE_WEIGHT if weight is None else weight
    top, rest = hits[:depth], hits[depth:]
    qt = terms(query)
    if weight > 0 and qt:
        for h in top:
            h.score += weight * coverage(qt, h.text)
        top.sort(key=lambda h: -h.score)  # stable: ties keep the fused order
    out: list[Hit] = []
    placed: set[tuple[str, str]] = set()
    for h in top:
        key = (h.document_id, h.section)
        if key not in placed:
            placed.add(key)
            out += [g for g in top if (g.document_id, g.section) == key]
    return out + rest
