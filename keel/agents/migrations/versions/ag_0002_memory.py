"""agents: memory — the end user a run is for (its thread), long-term notes scoped to agent and team

Revision ID: ag_0002
Revises: ag_0001
"""
import sqlalchemy as sa
from alembic import op

revision = "ag_0002"
down_revision = "ag_0001"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("agent_runs") as batch:
        batch.add_column(sa.Column("user_id", sa.String(200), nullable=True))
    op.create_index("ix_agent_runs_thread", "agent_runs", ["agent", "team_id", "user_id", "created_at"])
    op.create_table(
        "agent_notes",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("idempotency_key", sa.String(200), nullable=False, unique=True),
        sa.Column("agent", sa.String(64), nullable=False),
        sa.Column("team_id", sa.String(40), nullable=True),
        sa.Column("run_id", sa.String(120), nullable=False),
        sa.Column("user_id", sa.String(200), nullable=True),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_index("ix_agent_notes_scope", "agent_notes", ["agent", "team_id", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_agent_notes_scope", table_name="agent_notes")
    op.drop_table("agent_notes")
    op.drop_index("ix_agent_runs_thread", table_name="agent_runs")
    with op.batch_alter_table("agent_runs") as batch:
        batch.drop_column("user_id")
