"""Where cached answers live: the store (shared by every replica, SQLite or PostgreSQL), with an
in-memory LRU of exact entries and, for semantic lookups, one numpy matrix of unit vectors per
(scope, alias, partition) in front of it.

Memory never outlives what the store says for long:
- a write here is added to the partition's matrix at once; a matrix older than `REFRESH_S` is
  reloaded from the store, so another replica's new answers are found within seconds;
- invalidating an alias deletes its rows and bumps its generation in the store; every replica
  reads the generations at most every `SYNC_S` seconds and drops what it holds for that alias;
- expired rows are never returned and are purged from the store every `PURGE_S` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import sqlalchemy as sa

from keel.core.db import Store
from keel.gateway.cache.tables import cache_entries, cache_generations
from keel.gateway.protocol import ChatResult, Usage

log = logging.getLogger("keel.gateway.cache")

PartitionKey = tuple[str, str, str]  # (scope, alias, partition)


@dataclass
class Entry:
    """One stored answer and what it cost when it was made."""

    id: str
    alias: str
    payload: dict[str, Any]
    cost: float
    expires_at: float

    def result(self) -> ChatResult:
        p = self.payload
        usage = p.get("usage") or [0, 0]
        return ChatResult(content=p.get("content"), finish_reason=p.get("finish_reason") or "stop",
                          usage=Usage(int(usage[0]), int(usage[1])), tool_calls=p.get("tool_calls") or None,
                          model=p.get("model") or "")

    @staticmethod
    def payload_of(result: ChatResult) -> dict[str, Any]:
        return {"content": result.content, "tool_calls": result.tool_calls, "finish_reason": result.finish_reason,
                "usage": [result.usage.prompt_tokens, result.usage.completion_tokens], "model": result.model}


@dataclass
class Partition:
    """The unit vectors of one partition's live entries, row i of `matrix` belonging to `entries[i]`."""

    matrix: np.ndarray
    entries: list[Entry]
    loaded_at: float


class CacheStore:
    """Cache entries in the store with memory in front; every method runs on the event loop."""

    SYNC_S = 1.0
    REFRESH_S = 5.0
    PURGE_S = 60.0
    MAX_EXACT = 4096
    MAX_PARTITIONS = 256
    MAX_ROWS = 20_000  # newest entries of one partition held in memory

    def __init__(self, store: Store, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.clock = clock  # the sync and refresh intervals (entries expire on the wall clock, `time.time`)
        self._exact: OrderedDict[str, Entry] = OrderedDict()
        self._partitions: OrderedDict[PartitionKey, Partition] = OrderedDict()
        self._generations: dict[str, int] | None = None  # as last read from the store
        self._local_gen: dict[str, int] = {}  # bumps when this process drops an alias's memory
        self._synced_at = 0.0
        self._purged_at = time.time()

    # -- lookups --------------------------------------------------------------------------
    async def get_exact(self, entry_id: str, alias: str) -> Entry | None:
        await self._sync()
        now = time.time()
        entry = self._exact.get(entry_id)
        if entry is not None:
            if entry.expires_at > now:
                self._exact.move_to_end(entry_id)
                return entry
            del self._exact[entry_id]
        gen = self._local_gen.get(alias, 0)
        entry = await asyncio.to_thread(self._read_exact, entry_id, now)
        if entry is not None and self._local_gen.get(alias, 0) == gen:
            self._remember(entry)
        return entry

    async def nearest(self, key: PartitionKey, vector: np.ndarray, threshold: float) -> tuple[Entry, float] | None:
        """The live entry of the partition most similar to `vector`, if its similarity ≥ `threshold`."""
        await self._sync()
        part = self._partitions.get(key)
        now = time.time()
        if (part is None or self.clock() - part.loaded_at > self.REFRESH_S
                or part.matrix.shape[1] != vector.shape[0]):
            gen = self._local_gen.get(key[1], 0)
            part = await asyncio.to_thread(self._read_partition, key, vector.shape[0], now)
            if self._local_gen.get(key[1], 0) == gen:
                self._partitions[key] = part
                while len(self._partitions) > self.MAX_PARTITIONS:
                    self._partitions.popitem(last=False)
        elif key in self._partitions:
            self._partitions.move_to_end(key)
        if not part.entries:
            return None
        sims = part.matrix @ vector
        for i in np.argsort(-sims)[:8]:  # the best few; skip any that expired since loading
            if sims[i] < threshold:
                return None
            if part.entries[i].expires_at > now:
                return part.entries[i], float(sims[i])
        return None

    # -- writes ---------------------------------------------------------------------------
    def generation(self, alias: str) -> int:
        """Bumps whenever this process learns the alias was invalidated (here or on another replica)."""
        return self._local_gen.get(alias, 0)

    async def put(self, entry: Entry, *, kind: str, scope: str, partition: str | None = None,
                  vector: np.ndarray | None = None, generation: int | None = None) -> None:
        """Store an answer; skipped when the alias was invalidated since `generation` was read,
        so an answer in flight across an invalidation is not kept."""
        if generation is not None and generation != self.generation(entry.alias):
            return
        now = time.time()
        row = {"id": entry.id, "kind": kind, "scope": scope, "alias": entry.alias, "partition": partition,
               "dims": None if vector is None else int(vector.shape[0]),
               "vector": None if vector is None else vector.astype("<f4").tobytes(),
               "payload": entry.payload, "cost": entry.cost, "created_at": now, "expires_at": entry.expires_at}
        purge = now - self._purged_at > self.PURGE_S
        if purge:
            self._purged_at = now
        try:
            await asyncio.to_thread(self._write, row, purge)
        except sa.exc.IntegrityError:  # a concurrent request stored the same exact key first: keep theirs
            return
        if kind == "exact":
            self._remember(entry)
            return
        key = (scope, entry.alias, partition or "")
        part = self._partitions.get(key)
        if part is not None and vector is not None and part.matrix.shape[1] == vector.shape[0]:
            self._partitions[key] = Partition(matrix=np.vstack([part.matrix, vector[None, :]]),
                                              entries=[*part.entries, entry], loaded_at=part.loaded_at)
        else:
            self._partitions.pop(key, None)

    async def invalidate(self, alias: str) -> int:
        """Delete every entry of `alias` (all teams) here and, within `SYNC_S`, on every replica."""
        deleted, generation = await asyncio.to_thread(self._delete_alias, alias)
        self._forget(alias)
        if self._generations is not None:  # our own invalidation: the next sync need not drop it again
            self._generations[alias] = generation
        return deleted

    # -- memory ---------------------------------------------------------------------------
    def _remember(self, entry: Entry) -> None:
        self._exact[entry.id] = entry
        self._exact.move_to_end(entry.id)
        while len(self._exact) > self.MAX_EXACT:
            self._exact.popitem(last=False)

    def _forget(self, alias: str) -> None:
        self._local_gen[alias] = self._local_gen.get(alias, 0) + 1
        for eid in [k for k, e in self._exact.items() if e.alias == alias]:
            del self._exact[eid]
        for key in [k for k in self._partitions if k[1] == alias]:
            del self._partitions[key]

    async def _sync(self) -> None:
        """Drop memory of aliases another replica invalidated (reads the generations every SYNC_S)."""
        if self.clock() - self._synced_at < self.SYNC_S:
            return
        self._synced_at = self.clock()
        current = await asyncio.to_thread(self._read_generations)
        if self._generations is not None:
            for alias, gen in current.items():
                if self._generations.get(alias) != gen:
                    self._forget(alias)
        self._generations = current

    # -- store (worker threads) -------------------------------------------------------------
    @contextmanager
    def _reading(self) -> Iterator[sa.Connection]:
        """A read-only connection: on SQLite a plain BEGIN, so lookups never wait for the write lock."""
        with self.store.engine.connect() as conn:
            conn.info["write"] = False
            try:
                yield conn
            finally:
                conn.info["write"] = True

    def _read_exact(self, entry_id: str, now: float) -> Entry | None:
        t = cache_entries.c
        with self._reading() as conn:
            r = conn.execute(sa.select(t.id, t.alias, t.payload, t.cost, t.expires_at)
                             .where(t.id == entry_id, t.expires_at > now)).first()
        return None if r is None else Entry(r.id, r.alias, r.payload, r.cost, r.expires_at)

    def _read_partition(self, key: PartitionKey, dims: int, now: float) -> Partition:
        t = cache_entries.c
        scope, alias, partition = key
        with self._reading() as conn:
            rows = conn.execute(
                sa.select(t.id, t.alias, t.payload, t.cost, t.expires_at, t.vector)
                .where(t.scope == scope, t.alias == alias, t.partition == partition, t.kind == "semantic",
                       t.dims == dims, t.expires_at > now)
                .order_by(t.created_at.desc()).limit(self.MAX_ROWS)).all()
        matrix = (np.frombuffer(b"".join(r.vector for r in rows), dtype="<f4").reshape(len(rows), dims)
                  if rows else np.zeros((0, dims), np.float32))
        return Partition(matrix=matrix, entries=[Entry(r.id, r.alias, r.payload, r.cost, r.expires_at) for r in rows],
                         loaded_at=self.clock())

    def _write(self, row: dict[str, Any], purge: bool) -> None:
        t = cache_entries
        with self.store.engine.begin() as conn:
            conn.execute(t.delete().where(t.c.id == row["id"]))  # an exact key answered again: newest wins
            conn.execute(t.insert().values(**row))
            if purge:
                conn.execute(t.delete().where(t.c.expires_at <= row["created_at"]))

    def _delete_alias(self, alias: str) -> tuple[int, int]:
        try:
            return self._delete_alias_once(alias)
        except sa.exc.IntegrityError:  # another replica created the generation row at the same moment
            return self._delete_alias_once(alias)

    def _delete_alias_once(self, alias: str) -> tuple[int, int]:
        g = cache_generations
        with self.store.engine.begin() as conn:
            deleted = conn.execute(cache_entries.delete().where(cache_entries.c.alias == alias)).rowcount
            if not conn.execute(g.update().where(g.c.alias == alias)
                                .values(generation=g.c.generation + 1)).rowcount:
                conn.execute(g.insert().values(alias=alias, generation=1))
            generation = conn.execute(sa.select(g.c.generation).where(g.c.alias == alias)).scalar_one()
        return int(deleted or 0), int(generation)

    def _read_generations(self) -> dict[str, int]:
        with self._reading() as conn:
            return {r.alias: r.generation for r in conn.execute(sa.select(cache_generations))}
