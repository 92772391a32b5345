"""Knowledge tables: collections and their ACL, documents (+ their narrowing ACL), chunks, ingest jobs.

Chunks carry their embedding in the store (the source of truth); the search structures — SQLite
FTS5 tables and the on-disk HNSW files, or Postgres' tsvector/pgvector indexes — derive from them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.types import TypeDecorator, UserDefinedType

from keel.core.clock import iso  # noqa: F401 - re-exported for knowledge modules
from keel.core.db import metadata

TS = sa.DateTime(timezone=True)


ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite autoincrements only INTEGER PRIMARY KEY


class _PGVector(UserDefinedType):
    """pgvector's `vector` column; values travel as its text form `[1,2,3]`."""

    cache_ok = True

    def get_col_spec(self, **kw: Any) -> str:
        return "vector"


class Embedding(TypeDecorator):
    """A float32 vector: raw little-endian bytes on SQLite, `vector` on PostgreSQL; numpy on the Python side."""

    impl = sa.LargeBinary
    cache_ok = True

    def load_dialect_impl(self, dialect):  # noqa: ANN001, ANN201
        return dialect.type_descriptor(_PGVector() if dialect.name == "postgresql" else sa.LargeBinary())

    def process_bind_param(self, value, dialect):  # noqa: ANN001, ANN201
        if value is None:
            return None
        arr = np.asarray(value, dtype=np.float32)
        if dialect.name == "postgresql":
            return "[" + ",".join(map(repr, arr.tolist())) + "]"
        return arr.tobytes()

    def process_result_value(self, value, dialect):  # noqa: ANN001, ANN201
        if value is None:
            return None
        if isinstance(value, str):
            return np.array(value.strip("[]").split(","), dtype=np.float32)
        return np.frombuffer(value, dtype=np.float32)


collections = sa.Table(
    "knowledge_collections", metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False, unique=True),
    sa.Column("description", sa.Text, nullable=False, server_default=""),
    sa.Column("classification", sa.String(20), nullable=False),
    sa.Column("owner_team_id", sa.String(40), nullable=True),
    sa.Column("embedding_model", sa.String(200), nullable=False),
    sa.Column("dims", sa.Integer, nullable=True),
    sa.Column("meta", sa.JSON, nullable=False),
    sa.Column("chunker", sa.String(100), nullable=True),  # the version its latest ingest chunked with
    sa.Column("created_by", sa.String(40), nullable=True),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("updated_at", TS, nullable=False),
)

# access: read | write; kind: team | role; value: a team id or a role name ("*" = every role).
collection_acl = sa.Table(
    "knowledge_collection_acl", metadata,
    sa.Column("collection_id", sa.String(40), sa.ForeignKey("knowledge_collections.id", ondelete="CASCADE"),
              primary_key=True),
    sa.Column("access", sa.String(10), primary_key=True),
    sa.Column("kind", sa.String(10), primary_key=True),
    sa.Column("value", sa.String(200), primary_key=True),
)

documents = sa.Table(
    "knowledge_documents", metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("collection_id", sa.String(40), sa.ForeignKey("knowledge_collections.id", ondelete="CASCADE"),
              nullable=False),
    sa.Column("source", sa.String(1000), nullable=False),
    sa.Column("origin", sa.String(1000), nullable=False, server_default=""),
    sa.Column("title", sa.String(500), nullable=False, server_default=""),
    sa.Column("format", sa.String(20), nullable=False),
    sa.Column("content_hash", sa.String(64), nullable=False),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("chunk_count", sa.Integer, nullable=False),
    sa.Column("pages", sa.Integer, nullable=True),
    sa.Column("restricted", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("meta", sa.JSON, nullable=False),
    sa.Column("job_id", sa.String(40), nullable=True),
    sa.Column("chunker", sa.String(100), nullable=True),  # `Measure.version` that cut its chunks; NULL: v1
    sa.Column("created_at", TS, nullable=False),
    sa.Column("updated_at", TS, nullable=False),
    sa.UniqueConstraint("collection_id", "source", name="uq_knowledge_documents_collection_source"),
)

# A document's own ACL: when `documents.restricted`, only these teams/roles (of the collection's readers) read it.
document_acl = sa.Table(
    "knowledge_document_acl", metadata,
    sa.Column("document_id", sa.String(40), sa.ForeignKey("knowledge_documents.id", ondelete="CASCADE"),
              primary_key=True),
    sa.Column("kind", sa.String(10), primary_key=True),
    sa.Column("value", sa.String(200), primary_key=True),
)

chunks = sa.Table(
    "knowledge_chunks", metadata,
    sa.Column("id", ID, primary_key=True, autoincrement=True),
    sa.Column("document_id", sa.String(40), sa.ForeignKey("knowledge_documents.id", ondelete="CASCADE"),
              nullable=False, index=True),
    sa.Column("collection_id", sa.String(40), nullable=False, index=True),
    sa.Column("ordinal", sa.Integer, nullable=False),
    sa.Column("section", sa.Text, nullable=False, server_default=""),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("page", sa.Integer, nullable=True),
    sa.Column("span_start", sa.Integer, nullable=False),
    sa.Column("span_end", sa.Integer, nullable=False),
    sa.Column("tokens", sa.Integer, nullable=False),
    sa.Column("embedding", Embedding, nullable=True),
    sqlite_autoincrement=True,
)

jobs = sa.Table(
    "knowledge_jobs", metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("collection_id", sa.String(40), sa.ForeignKey("knowledge_collections.id", ondelete="CASCADE"),
              nullable=False, index=True),
    sa.Column("status", sa.String(30), nullable=False),
    sa.Column("principal", sa.JSON, nullable=False),
    sa.Column("created_by", sa.String(40), nullable=False),
    sa.Column("total", sa.Integer, nullable=False),
    sa.Column("lease_owner", sa.String(80), nullable=True),
    sa.Column("lease_until", TS, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("started_at", TS, nullable=True),
    sa.Column("finished_at", TS, nullable=True),
    sa.Index("ix_knowledge_jobs_status", "status"),
)

# status: pending | new | changed | unchanged | failed  (the last four are final)
job_items = sa.Table(
    "knowledge_job_items", metadata,
    sa.Column("id", ID, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.String(40), sa.ForeignKey("knowledge_jobs.id", ondelete="CASCADE"), nullable=False,
              index=True),
    sa.Column("ordinal", sa.Integer, nullable=False),
    sa.Column("source", sa.String(1000), nullable=False),
    sa.Column("origin", sa.String(1000), nullable=False, server_default=""),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("content", sa.LargeBinary, nullable=True),
    sa.Column("options", sa.JSON, nullable=False),
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("document_id", sa.String(40), nullable=True),
    sa.Column("chunks", sa.Integer, nullable=False, server_default="0"),
    sa.Column("error_code", sa.String(60), nullable=True),
    sa.Column("error_detail", sa.Text, nullable=True),
    sqlite_autoincrement=True,
)
