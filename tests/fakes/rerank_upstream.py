"""A fake Cohere/Jina-shaped reranker: `POST /v1/rerank` scores each document by the share of the query's
words it contains, and answers `{results: [{index, relevance_score}], usage, meta}` best first, cut to
`top_n` — as the real services do, so Keel's provider must map indices back. Faults as in `tests/fakes`.
"""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from tests.fakes import FakeUpstream


def words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


def score(query: str, document: str) -> float:
    q = words(query)
    return round(len(q & words(document)) / max(len(q), 1), 6)


class FakeRerank(FakeUpstream):
    """`boost`: a word that adds 1 to the score of every document holding it (to tell its order from another's)."""

    base_path = "/v1"

    def __init__(self, *, boost: str | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.boost = boost

    def score(self, query: str, document: str) -> float:
        return score(query, document) + (1.0 if self.boost and self.boost in words(document) else 0.0)

    def routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/v1/rerank", self.rerank)

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        return {"message": message}  # Cohere's error shape

    def error_event(self) -> bytes:
        return b""

    def check_auth(self, request: web.Request) -> web.Response | None:
        if self.api_key and request.headers.get("Authorization", "") != f"Bearer {self.api_key}":
            return self.error_response(401, "invalid api token")
        return None

    async def rerank(self, request: web.Request) -> web.StreamResponse:
        body, _fault, early = await self.prelude(request)
        if early is not None:
            return early
        query, docs = body.get("query"), body.get("documents")
        if not isinstance(query, str) or not isinstance(docs, list) or not all(isinstance(d, str) for d in docs):
            return self.error_response(400, "query must be a string and documents a list of strings")
        ranked = sorted(((i, self.score(query, d)) for i, d in enumerate(docs)), key=lambda t: (-t[1], t[0]))
        top_n = body.get("top_n") or len(docs)
        tokens = sum(len(d) // 4 + len(query) // 4 for d in docs)
        return self.json({"id": "fake-rerank", "results": [{"index": i, "relevance_score": s}
                                                            for i, s in ranked[:top_n]],
                          "usage": {"total_tokens": tokens}, "meta": {"billed_units": {"search_units": 1}}})


if __name__ == "__main__":
    FakeRerank.main()
