"""Agent tables: mandate versions, the kill switch, runs, the action log, and the effects of the built-in
`record` and `notify` tools. Loop checkpoints live in DBOS' system database; these hold what people query."""

from __future__ import annotations

import sqlalchemy as sa

from keel.core.db import metadata

TS = sa.DateTime(timezone=True)

agent_versions = sa.Table(
    "agent_versions", metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("description", sa.Text, nullable=False, server_default=""),
    sa.Column("team_id", sa.String(40), nullable=True),
    sa.Column("owner", sa.JSON, nullable=False),
    sa.Column("created_at", TS, nullable=False),
    sa.UniqueConstraint("name", "version", name="uq_agent_versions_name_version"),
)

agent_switches = sa.Table(  # the kill switch: one row per agent that was ever paused
    "agent_switches", metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("paused", sa.Boolean, nullable=False),
    sa.Column("changed_by", sa.String(100), nullable=False),
    sa.Column("reason", sa.Text, nullable=True),
    sa.Column("changed_at", TS, nullable=False),
)

agent_runs = sa.Table(
    "agent_runs", metadata,
    sa.Column("id", sa.String(120), primary_key=True),
    sa.Column("agent", sa.String(64), nullable=False, index=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("version_id", sa.String(40), nullable=False),
    sa.Column("status", sa.String(20), nullable=False, index=True),
    sa.Column("task", sa.Text, nullable=False),
    sa.Column("answer", sa.Text, nullable=True),
    sa.Column("error", sa.JSON, nullable=True),
    sa.Column("principal", sa.JSON, nullable=False),
    sa.Column("team_id", sa.String(40), nullable=True, index=True),
    sa.Column("created_at", TS, nullable=False, index=True),
    sa.Column("updated_at", TS, nullable=False),
    sa.Column("finished_at", TS, nullable=True),
    sa.Column("user_id", sa.String(200), nullable=True),  # the end user the run is for: their thread (memory)
    sa.Index("ix_agent_runs_thread", "agent", "team_id", "user_id", "created_at"),
)

agent_actions = sa.Table(
    "agent_actions", metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("run_id", sa.String(120), nullable=False),
    sa.Column("seq", sa.Integer, nullable=False),  # position in the run: a replayed step writes the same row once
    sa.Column("agent", sa.String(64), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("principal", sa.String(100), nullable=False),
    sa.Column("team_id", sa.String(40), nullable=True),
    sa.Column("kind", sa.String(20), nullable=False),  # model | tool
    sa.Column("tool", sa.String(64), nullable=True),
    sa.Column("arguments", sa.JSON, nullable=True),
    sa.Column("decision", sa.String(20), nullable=False),  # allowed | refused | failed
    sa.Column("rule", sa.String(300), nullable=True),
    sa.Column("detail", sa.Text, nullable=True),
    sa.Column("result", sa.Text, nullable=True),  # a short summary
    sa.Column("tokens", sa.Integer, nullable=False, server_default="0"),
    sa.Column("cost", sa.Float, nullable=False, server_default="0"),
    sa.Column("created_at", TS, nullable=False),
    sa.UniqueConstraint("run_id", "seq", name="uq_agent_actions_run_seq"),
    sa.Index("ix_agent_actions_agent_tool_time", "agent", "tool", "created_at"),
)

agent_effects = sa.Table(  # rows `record` wrote and mail `notify` queued (no SMTP in this slice: the outbox)
    "agent_effects", metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("idempotency_key", sa.String(200), nullable=False, unique=True),
    sa.Column("run_id", sa.String(120), nullable=False, index=True),
    sa.Column("agent", sa.String(64), nullable=False),
    sa.Column("team_id", sa.String(40), nullable=True),
    sa.Column("kind", sa.String(20), nullable=False),  # record | notify
    sa.Column("target", sa.String(320), nullable=False),  # the table, or the recipient
    sa.Column("data", sa.JSON, nullable=False),
    sa.Column("created_at", TS, nullable=False),
)

agent_notes = sa.Table(  # long-term notes the `remember` tool keeps: one agent's, one team's
    "agent_notes", metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("idempotency_key", sa.String(200), nullable=False, unique=True),
    sa.Column("agent", sa.String(64), nullable=False),
    sa.Column("team_id", sa.String(40), nullable=True),
    sa.Column("run_id", sa.String(120), nullable=False),
    sa.Column("user_id", sa.String(200), nullable=True),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("created_at", TS, nullable=False),
    sa.Index("ix_agent_notes_scope", "agent", "team_id", "created_at"),
)
