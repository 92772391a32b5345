"""Evaluation metrics, pure functions shared by `keel eval` and `bench/retrieval.py`.

Retrieval (binary gains over a ranked list): each ranked item is relevant or not; `relevant_total` is how many
items in the whole index count as relevant (e.g. every chunk of a relevant section), for the ideal ranking.

>>> ndcg_at_k([True, False, True], relevant_total=2, k=10)
0.9197...
>>> recall_at_k(["a", "b"], {"a", "c"}, k=10), mrr([False, True])
(0.5, 0.5)

Answers: `exact_match` (normalised text), `semantic_match` (cosine of two embeddings against a threshold),
`groundedness` (the share of the answer's sentences whose content words a cited passage mostly holds).
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Hashable, Iterable, Sequence

WORD = re.compile(r"[a-z0-9]+")
SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")
STOP = frozenset("a an the and or of to in on for is are was were be been it its this that with as at by from "
                 "you your we our they their he she his her i me my not no do does did can will would should "
                 "could may might there here what which who when where how why if then so than".split())
SEMANTIC_THRESHOLD = 0.8
SUPPORT = 0.6  # share of a sentence's content words a passage must hold for the sentence to count as grounded


def dcg(flags: Sequence[bool], k: int) -> float:
    return sum(1 / math.log2(i + 2) for i, r in enumerate(flags[:k]) if r)


def ndcg_at_k(flags: Sequence[bool], relevant_total: int, k: int = 10) -> float:
    """nDCG@k with binary gains: DCG of the ranking over that of `min(relevant_total, k)` relevant items first."""
    ideal = sum(1 / math.log2(i + 2) for i in range(min(relevant_total, k)))
    return dcg(flags, k) / ideal if ideal else 0.0


def recall_at_k(found: Sequence[Hashable], relevant: Iterable[Hashable], k: int = 10) -> float:
    """Share of the relevant items that appear among the first k found (an item found twice counts once)."""
    rel = set(relevant)
    return len({x for x in found[:k] if x in rel}) / len(rel) if rel else 0.0


def mrr(flags: Sequence[bool]) -> float:
    """Reciprocal rank of the first relevant item (0 when none is)."""
    return next((1 / (i + 1) for i, r in enumerate(flags) if r), 0.0)


def normalise(text: str) -> str:
    """Lowercase, no punctuation, no articles, single spaces (SQuAD's answer normalisation)."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def exact_match(answer: str, expected: str) -> float:
    return float(normalise(answer) == normalise(expected))


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(y * y for y in b))
    return dot / (na * nb) if na and nb else 0.0


def semantic_match(a: Sequence[float], b: Sequence[float], threshold: float = SEMANTIC_THRESHOLD) -> float:
    return float(cosine(a, b) >= threshold)


def content_words(text: str) -> set[str]:
    return {w for w in WORD.findall(text.lower()) if w not in STOP and len(w) > 1}


def groundedness(answer: str, passages: Sequence[str], support: float = SUPPORT) -> float:
    """Share of the answer's sentences (with content words) of which one passage holds at least `support` of
    the content words; 0 for an answer with no passages, 1 for one with nothing to check."""
    sentences = [w for s in SENTENCE.split(answer) if (w := content_words(s))]
    if not sentences:
        return 1.0
    bags = [content_words(p) for p in passages]
    if not bags:
        return 0.0
    grounded = sum(1 for words in sentences if any(len(words & bag) >= support * len(words) for bag in bags))
    return grounded / len(sentences)


def mean(values: Iterable[float]) -> float | None:
    vals = list(values)
    return round(sum(vals) / len(vals), 4) if vals else None
