"""Reranking on the governed path: what a rerank call asks, what a reranker deployment answers, and the
small protocol a provider implements to serve `kind: rerank` deployments (`/v1/rerank`, retrieval).

A reranker scores each document's relevance to one query; the scores are comparable within one call
only. Providers that rerank declare `can_rerank = True` and implement `rerank(req)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

MAX_DOCUMENTS = 1000  # one call's documents, at most: a bound every reranker deployment shares
MAX_DOCUMENT_CHARS = 100_000  # one document's text
MAX_QUERY_CHARS = 20_000


@dataclass
class RerankRequest:
    """A query and the documents to score against it; `top_n` None keeps all of them."""

    model: str
    query: str
    documents: list[str]
    top_n: int | None = None


@dataclass
class RerankResult:
    """One relevance score per document, in the order the documents were given (the caller sorts),
    and the tokens the model saw (for the ledger and budgets)."""

    scores: list[float]
    tokens: int = 0
    model: str = ""
    extra: dict[str, object] = field(default_factory=dict)

    def ranked(self, top_n: int | None = None) -> list[tuple[int, float]]:
        """(index, score) pairs, best first; ties keep the given order; at most `top_n`."""
        order = sorted(range(len(self.scores)), key=lambda i: (-self.scores[i], i))
        return [(i, self.scores[i]) for i in (order if top_n is None else order[:top_n])]


@runtime_checkable
class RerankProvider(Protocol):
    """A provider that can serve a `kind: rerank` deployment.

    Semantics (checked by `tests/gateway/test_rerank_api.py` for each built-in one):
    - `rerank(req)` returns exactly one finite score per document, in the documents' order; higher is
      more relevant; it never reorders, drops or alters a document.
    - Upstream failures raise `UpstreamError` or a subclass, like every provider.
    """

    can_rerank: bool

    async def rerank(self, req: RerankRequest) -> RerankResult: ...
