"""Workflow tables: spec versions, runs, approvals, and the two built-in effect sinks
(records — e.g. the lead-intake CRM table — and the mail outbox used when SMTP is not configured).

Step checkpoints live in DBOS' system database; these tables hold what people query.
"""

from __future__ import annotations

import sqlalchemy as sa

from keel.core.db import metadata

TS = sa.DateTime(timezone=True)

workflow_versions = sa.Table(
    "workflow_versions", metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("description", sa.Text, nullable=False, server_default=""),
    sa.Column("team_id", sa.String(40), nullable=True),
    sa.Column("owner", sa.JSON, nullable=False),  # the defining principal: webhook and schedule runs act as it
    sa.Column("created_at", TS, nullable=False),
    sa.UniqueConstraint("name", "version", name="uq_workflow_versions_name_version"),
)

workflow_runs = sa.Table(
    "workflow_runs", metadata,
    sa.Column("id", sa.String(120), primary_key=True),
    sa.Column("workflow", sa.String(64), nullable=False, index=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("version_id", sa.String(40), nullable=False),
    sa.Column("status", sa.String(20), nullable=False, index=True),
    sa.Column("current_step", sa.String(64), nullable=True),
    sa.Column("inputs", sa.JSON, nullable=False),
    sa.Column("outputs", sa.JSON, nullable=True),
    sa.Column("error", sa.JSON, nullable=True),
    sa.Column("principal", sa.JSON, nullable=False),
    sa.Column("team_id", sa.String(40), nullable=True, index=True),
    sa.Column("trigger", sa.String(20), nullable=False),
    sa.Column("parent_run", sa.String(120), nullable=True),
    sa.Column("retry_of", sa.String(120), nullable=True),
    sa.Column("seed", sa.JSON, nullable=True),  # step results carried over by retry-from-step
    # while `waiting_provider`: the model alias or host waited for, and the wait (reason, next try, deadline)
    sa.Column("waiting_for", sa.String(300), nullable=True, index=True),
    sa.Column("wait", sa.JSON, nullable=True),
    sa.Column("created_at", TS, nullable=False, index=True),
    sa.Column("updated_at", TS, nullable=False),
    sa.Column("finished_at", TS, nullable=True),
)

workflow_approvals = sa.Table(
    "workflow_approvals", metadata,
    sa.Column("id", sa.String(160), primary_key=True),
    sa.Column("run_id", sa.String(120), nullable=False, index=True),
    sa.Column("workflow", sa.String(64), nullable=False),
    sa.Column("step_id", sa.String(64), nullable=False),
    sa.Column("status", sa.String(20), nullable=False, index=True),  # pending | approved | rejected
    sa.Column("approvers", sa.JSON, nullable=False),  # roles that may decide now (escalation widens/changes it)
    sa.Column("escalated", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("team_id", sa.String(40), nullable=True, index=True),
    sa.Column("instructions", sa.Text, nullable=True),
    sa.Column("show", sa.JSON, nullable=False),
    sa.Column("editable", sa.JSON, nullable=False),
    sa.Column("fields", sa.JSON, nullable=True),  # what was approved: `show` with the approver's edits applied
    sa.Column("decided_by", sa.String(100), nullable=True),
    sa.Column("reason", sa.Text, nullable=True),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("deadline", TS, nullable=False),
    sa.Column("decided_at", TS, nullable=True),
)

workflow_records = sa.Table(
    "workflow_records", metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("table_name", sa.String(64), nullable=False),
    sa.Column("key", sa.String(300), nullable=True),
    sa.Column("data", sa.JSON, nullable=False),
    sa.Column("team_id", sa.String(40), nullable=True),
    sa.Column("run_id", sa.String(120), nullable=False),
    sa.Column("step_id", sa.String(64), nullable=False),
    sa.Column("created_at", TS, nullable=False),
    sa.UniqueConstraint("run_id", "step_id", name="uq_workflow_records_run_step"),  # one effect per run and step
    sa.Index("ix_workflow_records_table_key", "table_name", "key"),
)

workflow_outbox = sa.Table(
    "workflow_outbox", metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("idempotency_key", sa.String(200), nullable=False, unique=True),
    sa.Column("run_id", sa.String(120), nullable=False, index=True),
    sa.Column("step_id", sa.String(64), nullable=False),
    sa.Column("team_id", sa.String(40), nullable=True),
    sa.Column("to", sa.String(320), nullable=False),
    sa.Column("subject", sa.Text, nullable=False),
    sa.Column("body", sa.Text, nullable=False),
    sa.Column("created_at", TS, nullable=False),
)
