"""Build the knowledge service the app factory wires in: the index for the store's dialect, the
ingest worker, and the one embedding path (through the gateway, so it is metered).

    kn = build(settings, store, gateway)
    lifecycle.startup.append(kn.start); lifecycle.shutdown.append(kn.stop)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import numpy as np

from keel.core.db import Store
from keel.core.roles import executes_runs
from keel.core.settings import Settings
from keel.gateway.pipeline import Gateway
from keel.identity.principal import Principal
from keel.knowledge import jobs
from keel.knowledge.index import ChunkIndex, open_index
from keel.knowledge.parsers import FORMATS
from keel.knowledge.parts import Embedder, KnowledgeConfig

__all__ = ["Knowledge", "KnowledgeConfig", "build"]

log = logging.getLogger("keel.knowledge")


class Knowledge:
    """The knowledge capability's services, shared by routes and the worker (a `parts.Library`)."""

    def __init__(self, config: KnowledgeConfig, store: Store, gateway: Gateway, index: ChunkIndex,
                 on_retrieval: Callable[[np.ndarray | None, float | None, int], None] | None = None, *,
                 ingests: bool = True) -> None:
        self.config = config
        self.ingests = ingests  # whether this process runs the ingest worker
        self.on_retrieval = on_retrieval
        self.store = store
        self.gateway = gateway
        self.index = index
        self.embedder = Embedder(gateway)
        self.worker = jobs.Worker(store, index, config, self.embedder, self.progress)
        self.files_done = 0
        self.chunks_done = 0
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        await asyncio.to_thread(self.index.open)
        if self.store.dialect == "sqlite":
            await asyncio.to_thread(self.worker.reclaim_all)
        self._tasks = [asyncio.create_task(self._checkpoints(), name="knowledge-checkpoints")]
        if self.ingests:  # role api: `keel worker`s take the jobs (a dead one's after its lease runs out)
            self._tasks.append(asyncio.create_task(self.worker.run(), name="knowledge-worker"))

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
        """Unit-length float32 vectors for `texts` (see `parts.Embedder`)."""
        return await self.embedder.embed(p, alias, texts, task_id=task_id, use_case=use_case, request_id=request_id)

    def limits(self) -> dict:
        return {"max_file_bytes": self.config.max_file_bytes, "formats": sorted(set(FORMATS))}


def build(settings: Settings, store: Store, gateway: Gateway,
          on_retrieval: Callable[[np.ndarray | None, float | None, int], None] | None = None) -> Knowledge:
    config = KnowledgeConfig.from_settings(settings)
    return Knowledge(config, store, gateway, open_index(store, config.data_dir), on_retrieval,
                     ingests=executes_runs(settings.role))
