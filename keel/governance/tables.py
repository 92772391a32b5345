"""Governance tables: policy versions, the audit chain and its head, guard events, reviews."""

import sqlalchemy as sa

from keel.core.db import metadata

TS = sa.DateTime(timezone=True)

policy_versions = sa.Table(
    "policy_versions", metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("sha256", sa.String(64), nullable=False, unique=True),
    sa.Column("name", sa.String(200), nullable=False, server_default=""),
    sa.Column("source", sa.String(1000), nullable=False, server_default=""),
    sa.Column("content", sa.Text, nullable=False),
    sa.Column("created_at", TS, nullable=False),
)

# `ts` and `details` are stored as the exact strings that were hashed, so a backup verifies offline.
audit_events = sa.Table(
    "audit_events", metadata,
    sa.Column("seq", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=False),
    sa.Column("id", sa.String(40), nullable=False, unique=True),
    sa.Column("ts", sa.String(40), nullable=False),
    sa.Column("actor", sa.String(100), nullable=False),
    sa.Column("action", sa.String(100), nullable=False, index=True),
    sa.Column("team_id", sa.String(40), nullable=True, index=True),
    sa.Column("details", sa.Text, nullable=False),
    sa.Column("prev_hash", sa.String(64), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
)

audit_head = sa.Table(
    "audit_head", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("seq", sa.BigInteger().with_variant(sa.Integer, "sqlite"), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
)

guard_events = sa.Table(
    "guard_events", metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("request_id", sa.String(100), nullable=False, index=True),
    sa.Column("ts", TS, nullable=False),
    sa.Column("key_id", sa.String(40), nullable=True, index=True),
    sa.Column("team_id", sa.String(40), nullable=True, index=True),
    sa.Column("guard", sa.String(40), nullable=False),
    sa.Column("side", sa.String(20), nullable=False),
    sa.Column("type", sa.String(60), nullable=False),
    sa.Column("location", sa.String(100), nullable=False, server_default=""),
    sa.Column("start", sa.Integer, nullable=False),
    sa.Column("end", sa.Integer, nullable=False),
    sa.Column("score", sa.Float, nullable=True),
    sa.Column("action", sa.String(20), nullable=False),
    sa.Column("policy_version", sa.Integer, nullable=True),
)

reviews = sa.Table(
    "reviews", metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("request_id", sa.String(100), nullable=False),
    sa.Column("status", sa.String(20), nullable=False, index=True),
    sa.Column("key_id", sa.String(40), nullable=True, index=True),
    sa.Column("team_id", sa.String(40), nullable=True, index=True),
    sa.Column("alias", sa.String(200), nullable=False),
    sa.Column("deployment", sa.String(300), nullable=True),
    sa.Column("use_case", sa.String(200), nullable=True),
    sa.Column("classification", sa.String(40), nullable=False),
    sa.Column("reasons", sa.JSON, nullable=False),
    sa.Column("messages", sa.JSON, nullable=True),
    sa.Column("output", sa.JSON, nullable=True),
    sa.Column("final_output", sa.JSON, nullable=True),
    sa.Column("decided_by", sa.String(40), nullable=True),
    sa.Column("decision_reason", sa.Text, nullable=True),
    sa.Column("webhook_url", sa.String(2000), nullable=True),
    sa.Column("webhook_status", sa.String(40), nullable=True),
    sa.Column("policy_version", sa.Integer, nullable=True),
    sa.Column("retain_until", TS, nullable=True),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("decided_at", TS, nullable=True),
)
