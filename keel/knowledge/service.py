"""Build the knowledge service the app factory wires in: the index for the store's dialect, the
ingest worker, and the one embedding path (through the gateway, so it is metered).

    kn = build(settings, store, gateway)
    lifecycle.startup.append(kn.start); lifecycle.shutdown.append(kn.stop)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from keel.core.db import Store
from keel.core.errors import UpstreamError
from keel.core.ids import new_id
from keel.core.settings import Settings
from keel.gateway.pipeline import Call, Gateway
from keel.identity.principal import Principal
from keel.knowledge import jobs
from keel.knowledge.index import ChunkIndex, open_index
from keel.knowledge.parsers import FORMATS

log = logging.getLogger("keel.knowledge")
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


class Knowledge:
    """The knowledge capability's services, shared by routes and the worker."""

    def __init__(self, config: KnowledgeConfig, store: Store, gateway: Gateway, index: ChunkIndex) -> None:
        self.config = config
        self.store = store
        self.gateway = gateway
        self.index = index
        self.worker = jobs.Worker(self)
        self.files_done = 0
        self.chunks_done = 0
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        await asyncio.to_thread(self.index.open)
        if self.store.dialect == "sqlite":
            await asyncio.to_thread(self.worker.reclaim_all)
        self._tasks = [asyncio.create_task(self.worker.run(), name="knowledge-worker"),
                       asyncio.create_task(self._checkpoints(), name="knowledge-checkpoints")]

    async def stop(self) -> None:
        self.worker.stop()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []
        await asyncio.to_thread(self.index.close)

    async def _checkpoints(self) -> None:
        while True:
            await asyncio.sleep(self.config.checkpoint_every_s)
            await asyncio.to_thread(self.index.checkpoint)

    def wake(self) -> None:
        self.worker.wake.set()

    def progress(self, files: int, chunks: int) -> None:
        self.files_done += files
        self.chunks_done += chunks

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

    def limits(self) -> dict:
        return {"max_file_bytes": self.config.max_file_bytes, "formats": sorted(set(FORMATS))}


def build(settings: Settings, store: Store, gateway: Gateway) -> Knowledge:
    config = KnowledgeConfig.from_settings(settings)
    return Knowledge(config, store, gateway, open_index(store, config.data_dir))
