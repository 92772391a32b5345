"""agents: mandate versions, kill switch, runs, action log, tool effects

Revision ID: ag_0001
Revises:
"""
import sqlalchemy as sa
from alembic import op

revision = "ag_0001"
down_revision = None
branch_labels = ("agents",)
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "agent_versions",
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
    op.create_table(
        "agent_switches",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("paused", sa.Boolean, nullable=False),
        sa.Column("changed_by", sa.String(100), nullable=False),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("changed_at", TS, nullable=False),
    )
    op.create_table(
        "agent_runs",
        sa.Column("id", sa.String(120), primary_key=True),
        sa.Column("agent", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("version_id", sa.String(40), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("task", sa.Text, nullable=False),
        sa.Column("answer", sa.Text, nullable=True),
        sa.Column("error", sa.JSON, nullable=True),
        sa.Column("principal", sa.JSON, nullable=False),
        sa.Column("team_id", sa.String(40), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("finished_at", TS, nullable=True),
    )
    op.create_table(
        "agent_actions",
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
    )
    op.create_table(
        "agent_effects",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("idempotency_key", sa.String(200), nullable=False, unique=True),
        sa.Column("run_id", sa.String(120), nullable=False),
        sa.Column("agent", sa.String(64), nullable=False),
        sa.Column("team_id", sa.String(40), nullable=True),
        sa.Column("kind", sa.String(20), nullable=False),  # record | notify
        sa.Column("target", sa.String(320), nullable=False),  # the table, or the recipient
        sa.Column("data", sa.JSON, nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )

    for col in ("agent", "status", "team_id", "created_at"):
        op.create_index(f"ix_agent_runs_{col}", "agent_runs", [col])
    op.create_index("ix_agent_actions_agent_tool_time", "agent_actions", ["agent", "tool", "created_at"])
    op.create_index("ix_agent_effects_run_id", "agent_effects", ["run_id"])


def downgrade() -> None:
    for table in ("agent_effects", "agent_actions", "agent_runs", "agent_switches", "agent_versions"):
        op.drop_table(table)
