"""One collection's vectors on disk: an hnswlib graph, checkpointed atomically, rebuilt from the store.

The store keeps every chunk's embedding, so this file is a cache: after a crash, `reconcile`
adds what the checkpoint missed and forgets what was deleted since. Why HNSW and not a flat
numpy scan: at 100k chunks a flat float32 scan costs many times an HNSW query, which keeps recall@10
near 1 (`bench/ingest.py`; the figures are in bench/README.md). When document ACLs
or filters leave only a few chunks, those are scored exactly instead (`EXACT_BELOW`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import hnswlib
import numpy as np

EXACT_BELOW = 1024  # allowed chunks up to this: exact dot products (vectors read from the store)
M, EF_CONSTRUCTION, EF_SEARCH = 16, 100, 128


class VectorShard:
    """The HNSW graph of one collection plus label → document bookkeeping; thread-safe."""

    def __init__(self, path: Path, dims: int) -> None:
        self.path = path
        self.dims = dims
        self.lock = threading.RLock()
        self.doc_of: dict[int, str] = {}
        self.labels_of: dict[str, list[int]] = {}
        self.dirty = False
        self.index = self._load() or self._new(1024)

    def _new(self, capacity: int) -> hnswlib.Index:
        idx = hnswlib.Index(space="cosine", dim=self.dims)
        idx.init_index(max_elements=capacity, ef_construction=EF_CONSTRUCTION, M=M, allow_replace_deleted=True)
        idx.set_ef(EF_SEARCH)
        return idx

    def _load(self) -> hnswlib.Index | None:
        if not self.path.is_file():
            return None
        idx = hnswlib.Index(space="cosine", dim=self.dims)
        try:
            idx.load_index(str(self.path), allow_replace_deleted=True)
        except (RuntimeError, OSError, ValueError):
            return None  # a damaged checkpoint is rebuilt from the store
        idx.set_ef(EF_SEARCH)
        return idx

    def reconcile(self, rows: list[tuple[int, str]], fetch) -> None:  # noqa: ANN001
        """Make the graph hold exactly the chunk ids in `rows` ((id, document_id)); `fetch(ids)` → vectors."""
        with self.lock:
            wanted = {cid: doc for cid, doc in rows}
            present = set(self.index.get_ids_list()) if self.index.get_current_count() else set()
            for label in present - set(wanted):
                try:
                    self.index.mark_deleted(label)
                except RuntimeError:
                    pass  # already deleted in the checkpoint
            missing = [cid for cid in wanted if cid not in present]
            for i in range(0, len(missing), 2048):
                part = missing[i:i + 2048]
                self._add(np.asarray(fetch(part), np.float32), part)
            self.doc_of = dict(wanted)
            self.labels_of = {}
            for cid, doc in wanted.items():
                self.labels_of.setdefault(doc, []).append(cid)
            self.dirty = self.dirty or bool(missing) or bool(present - set(wanted))

    def _add(self, vectors: np.ndarray, labels: list[int]) -> None:
        if not labels:
            return
        need = self.index.get_current_count() + len(labels)
        if need > self.index.get_max_elements():
            self.index.resize_index(max(need, self.index.get_max_elements() * 2))
        self.index.add_items(vectors, np.asarray(labels, np.int64), replace_deleted=True, num_threads=1)

    def add(self, document_id: str, labels: list[int], vectors: np.ndarray) -> None:
        with self.lock:
            self._add(vectors, labels)
            for label in labels:
                self.doc_of[label] = document_id
            self.labels_of.setdefault(document_id, []).extend(labels)
            self.dirty = True

    def remove_documents(self, document_ids: list[str]) -> None:
        with self.lock:
            for doc in document_ids:
                for label in self.labels_of.pop(doc, []):
                    self.doc_of.pop(label, None)
                    try:
                        self.index.mark_deleted(label)
                    except RuntimeError:
                        pass
                    self.dirty = True

    def search(self, q: np.ndarray, k: int, allowed_docs: set[str] | None,
               fetch: Callable[[list[int]], np.ndarray] | None = None) -> list[tuple[int, float]]:
        """(label, cosine similarity) best first, only of chunks whose document is in `allowed_docs`
        (None: all). Few allowed chunks are scored exactly with vectors from `fetch(labels)`."""
        with self.lock:
            live = len(self.doc_of)
            if live == 0 or k <= 0:
                return []
            flt = None
            if allowed_docs is not None:
                labels = [lb for d in allowed_docs for lb in self.labels_of.get(d, ())]
                if not labels:
                    return []
                if len(labels) <= EXACT_BELOW and fetch is not None:
                    return self._exact(q, labels, k, fetch)
                doc_of = self.doc_of
                flt = lambda label: doc_of.get(label) in allowed_docs  # noqa: E731
                live = len(labels)
            k = min(k, live)
            self.index.set_ef(max(EF_SEARCH, 2 * k))
            try:
                ids, dist = self.index.knn_query(q.reshape(1, -1), k=k, filter=flt)
            except RuntimeError:  # the walk found fewer than k allowed points: take what a smaller k finds
                ids, dist = self._fewer(q, k, flt)
            return [(int(i), 1.0 - float(d)) for i, d in zip(ids[0], dist[0])]

    def _fewer(self, q: np.ndarray, k: int, flt):  # noqa: ANN001, ANN202
        while k > 1:
            k //= 2
            try:
                return self.index.knn_query(q.reshape(1, -1), k=k, filter=flt)
            except RuntimeError:
                continue
        return np.zeros((1, 0), np.int64), np.zeros((1, 0), np.float32)

    @staticmethod
    def _exact(q: np.ndarray, labels: list[int], k: int, fetch: Callable[[list[int]], np.ndarray]) -> list[tuple[int, float]]:
        vecs = np.asarray(fetch(labels), np.float32)
        sims = vecs @ (q / max(float(np.linalg.norm(q)), 1e-12)) / np.maximum(np.linalg.norm(vecs, axis=1), 1e-12)
        top = np.argsort(-sims)[:k]
        return [(labels[i], float(sims[i])) for i in top]

    def save(self) -> None:
        """Checkpoint atomically: write a temp file, fsync, rename."""
        with self.lock:
            if not self.dirty:
                return
            tmp = self.path.with_suffix(".tmp")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.index.save_index(str(tmp))
            self.dirty = False
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
