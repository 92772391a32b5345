"""Cache tables: one row per stored answer, and a generation per alias that bumps on invalidation."""

import sqlalchemy as sa

from keel.core.db import metadata

cache_entries = sa.Table(
    "gateway_cache_entries", metadata,
    sa.Column("id", sa.String(64), primary_key=True),  # exact: hash of scope + request; semantic: random
    sa.Column("kind", sa.String(10), nullable=False),  # "exact" | "semantic"
    sa.Column("scope", sa.String(100), nullable=False),  # "team:<id>" or "key:<id>": entries never cross it
    sa.Column("alias", sa.String(200), nullable=False, index=True),
    sa.Column("partition", sa.String(64), nullable=True),  # semantic: hash of system prompt, history, format
    sa.Column("dims", sa.Integer, nullable=True),
    sa.Column("vector", sa.LargeBinary, nullable=True),  # semantic: little-endian float32, unit length
    sa.Column("payload", sa.JSON, nullable=False),  # content, tool_calls, finish_reason, usage, model
    sa.Column("cost", sa.Float, nullable=False, server_default="0"),  # what the original call cost
    sa.Column("created_at", sa.Float, nullable=False),  # unix seconds
    sa.Column("expires_at", sa.Float, nullable=False, index=True),
    sa.Index("ix_gateway_cache_entries_partition", "scope", "alias", "partition"),
)

cache_generations = sa.Table(
    "gateway_cache_generations", metadata,
    sa.Column("alias", sa.String(200), primary_key=True),
    sa.Column("generation", sa.Integer, nullable=False),
)
