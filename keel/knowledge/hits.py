"""A search hit: one chunk the caller may read, where it comes from and how it ranked. Shared by search,
rerankers and answers, so none of them imports another for it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from keel.knowledge.acl import Collection


@dataclass
class Hit:
    chunk_id: int
    document_id: str
    collection: Collection
    title: str
    source: str
    format: str
    section: str
    page: int | None
    start: int
    end: int
    text: str
    score: float
    bm25_rank: int | None = None
    vector_rank: int | None = None
    similarity: float | None = None

    def public(self) -> dict[str, Any]:
        return {"chunk_id": self.chunk_id, "document_id": self.document_id, "collection": self.collection.name,
                "collection_id": self.collection.id, "classification": self.collection.classification,
                "title": self.title, "source": self.source, "format": self.format, "section": self.section,
                "page": self.page, "span": {"start": self.start, "end": self.end}, "text": self.text,
                "score": round(self.score, 6),
                "ranks": {"bm25": self.bm25_rank, "vector": self.vector_rank},
                "similarity": None if self.similarity is None else round(self.similarity, 6)}
