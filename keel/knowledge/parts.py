"""The parts the knowledge capability is built from, shared by its modules without importing the service:
its settings (`KnowledgeConfig`), the one embedding path (`Embedder`), and what search and answers read
(`Library`, which the service satisfies)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from keel.core.db import Store
from keel.core.errors import UpstreamError
from keel.core.ids import new_id
from keel.core.settings import Settings
from keel.gateway.pipeline import Call, Gateway
from keel.identity.principal import Principal
from keel.knowledge.index import ChunkIndex

MULTIPART_SLACK = 64 * 1024


@dataclass(frozen=True)
class KnowledgeConfig:
    data_dir: Path
    max_file_bytes: int
    max_unzipped_bytes: int = 256 * 1024 * 1024
    embed_batch: int = 64
    answer_model: str = "local-chat"
    checkpoint_every_s: float = 30.0

    @classmethod
    def from_settings(cls, settings: Settings) -> "KnowledgeConfig":
        """Every upload is one request, so a file can be as large as the body limit allows."""
        return cls(data_dir=Path(settings.data_dir),
                   max_file_bytes=max(settings.max_body_bytes - MULTIPART_SLACK, 1))


class Embedder:
    """The one embedding path: through the governed gateway, so every vector is metered and policed.

    >>> vectors = await Embedder(gateway).embed(p, "local-embed", ["hello"], task_id="job_1", use_case="x")
    """

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def embed(self, p: Principal, alias: str, texts: list[str], *, task_id: str, use_case: str,
                    request_id: str | None = None) -> np.ndarray:
        """Unit-length float32 vectors for `texts`, from `alias` through the governed gateway.

        Every gateway call needs its own request id (the ledger keeps one row per id); `task_id`
        ties the calls of one job or one search/answer together in cost reports."""
        result = await self.gateway.embed(Call(request_id=request_id or new_id("req"), principal=p, kind="embedding",
                                               alias=alias, texts=texts,
                                               metadata={"use_case": use_case, "task_id": task_id}))
        vectors = np.asarray(result.vectors, dtype=np.float32)
        if vectors.shape[0] != len(texts):
            raise UpstreamError(f"embedding model {alias!r} returned {vectors.shape[0]} vectors for {len(texts)} texts",
                                fix="check the embedding deployment", model=alias)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.maximum(norms, 1e-12)


class Library(Protocol):
    """What a search or an answer reads: the store, the chunk index, the embedding path and the gateway
    (reranking and answers call models through it). `keel.knowledge.service.Knowledge` is one."""

    store: Store
    index: ChunkIndex
    gateway: Gateway
    # told of each search: its query vector and best similarity (None without), its hit count (drift signals)
    on_retrieval: Callable[[np.ndarray | None, float | None, int], None] | None

    async def embed(self, p: Principal, alias: str, texts: list[str], *, task_id: str, use_case: str,
                    request_id: str | None = None) -> np.ndarray: ...
