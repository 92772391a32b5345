"""workflows: runs waiting for an unavailable provider (what they wait for, and the wait)

Revision ID: wf_0002
Revises: wf_0001
"""
import sqlalchemy as sa
from alembic import op

revision = "wf_0002"
down_revision = "wf_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("workflow_runs") as batch:
        batch.add_column(sa.Column("waiting_for", sa.String(300), nullable=True))
        batch.add_column(sa.Column("wait", sa.JSON, nullable=True))
    op.create_index("ix_workflow_runs_waiting_for", "workflow_runs", ["waiting_for"])


def downgrade() -> None:
    op.drop_index("ix_workflow_runs_waiting_for", table_name="workflow_runs")
    with op.batch_alter_table("workflow_runs") as batch:
        batch.drop_column("wait")
        batch.drop_column("waiting_for")
