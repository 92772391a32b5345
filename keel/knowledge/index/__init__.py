"""The chunk index: keyword (BM25-style) and vector retrieval over stored chunks, always inside a Scope.

Two implementations, picked by the store's dialect (`open_index`): `embedded` (SQLite FTS5 per
collection + one HNSW file per collection in the data dir) and `postgres` (a generated tsvector
with GIN + pgvector HNSW). `tests/knowledge/test_index_conformance.py` holds the shared
conformance class both pass.
"""

from __future__ import annotations

from pathlib import Path

from keel.core.db import Store
from keel.knowledge.index.base import (
    STOPWORDS, ChunkIn, ChunkIndex, Scored, TermStats, Tx, insert_chunks, query_terms, reading, transaction,
)
from keel.knowledge.index.embedded import EmbeddedIndex
from keel.knowledge.index.postgres import PostgresIndex

__all__ = ["STOPWORDS", "ChunkIn", "ChunkIndex", "EmbeddedIndex", "PostgresIndex", "Scored", "TermStats", "Tx",
           "insert_chunks", "open_index", "query_terms", "reading", "transaction"]


def open_index(store: Store, data_dir: Path) -> ChunkIndex:
    """The index for this store: `PostgresIndex` on PostgreSQL, `EmbeddedIndex` on SQLite."""
    if store.dialect == "postgresql":
        return PostgresIndex(store)
    return EmbeddedIndex(store, Path(data_dir) / "knowledge")
