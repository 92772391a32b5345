"""workflows: spec versions, runs, approvals, records, outbox

Revision ID: wf_0001
Revises:
"""
import sqlalchemy as sa
from alembic import op

revision = "wf_0001"
down_revision = None
branch_labels = ("workflows",)
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "workflow_versions",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("description", sa.Text, nullable=False, server_default=""),
        sa.Column("team_id", sa.String(40), nullable=True),
        sa.Column("owner", sa.JSON, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("name", "version", name="uq_workflow_versions_name_version"),
    )
    op.create_table(
        "workflow_runs",
        sa.Column("id", sa.String(120), primary_key=True),
        sa.Column("workflow", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("version_id", sa.String(40), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("current_step", sa.String(64), nullable=True),
        sa.Column("inputs", sa.JSON, nullable=False),
        sa.Column("outputs", sa.JSON, nullable=True),
        sa.Column("error", sa.JSON, nullable=True),
        sa.Column("principal", sa.JSON, nullable=False),
        sa.Column("team_id", sa.String(40), nullable=True),
        sa.Column("trigger", sa.String(20), nullable=False),
        sa.Column("parent_run", sa.String(120), nullable=True),
        sa.Column("retry_of", sa.String(120), nullable=True),
        sa.Column("seed", sa.JSON, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("finished_at", TS, nullable=True),
    )
    for col in ("workflow", "status", "team_id", "created_at"):
        op.create_index(f"ix_workflow_runs_{col}", "workflow_runs", [col])
    op.create_table(
        "workflow_approvals",
        sa.Column("id", sa.String(160), primary_key=True),
        sa.Column("run_id", sa.String(120), nullable=False),
        sa.Column("workflow", sa.String(64), nullable=False),
        sa.Column("step_id", sa.String(64), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("approvers", sa.JSON, nullable=False),
        sa.Column("escalated", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("team_id", sa.String(40), nullable=True),
        sa.Column("instructions", sa.Text, nullable=True),
        sa.Column("show", sa.JSON, nullable=False),
        sa.Column("editable", sa.JSON, nullable=False),
        sa.Column("fields", sa.JSON, nullable=True),
        sa.Column("decided_by", sa.String(100), nullable=True),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("deadline", TS, nullable=False),
        sa.Column("decided_at", TS, nullable=True),
    )
    for col in ("run_id", "status", "team_id"):
        op.create_index(f"ix_workflow_approvals_{col}", "workflow_approvals", [col])
    op.create_table(
        "workflow_records",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("table_name", sa.String(64), nullable=False),
        sa.Column("key", sa.String(300), nullable=True),
        sa.Column("data", sa.JSON, nullable=False),
        sa.Column("team_id", sa.String(40), nullable=True),
        sa.Column("run_id", sa.String(120), nullable=False),
        sa.Column("step_id", sa.String(64), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("run_id", "step_id", name="uq_workflow_records_run_step"),
    )
    op.create_index("ix_workflow_records_table_key", "workflow_records", ["table_name", "key"])
    op.create_table(
        "workflow_outbox",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("idempotency_key", sa.String(200), nullable=False, unique=True),
        sa.Column("run_id", sa.String(120), nullable=False),
        sa.Column("step_id", sa.String(64), nullable=False),
        sa.Column("team_id", sa.String(40), nullable=True),
        sa.Column("to", sa.String(320), nullable=False),
        sa.Column("subject", sa.Text, nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_index("ix_workflow_outbox_run_id", "workflow_outbox", ["run_id"])


def downgrade() -> None:
    for t in ("workflow_outbox", "workflow_records", "workflow_approvals", "workflow_runs", "workflow_versions"):
        op.drop_table(t)
