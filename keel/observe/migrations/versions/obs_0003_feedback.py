"""observe: feedback on a metered request, a workflow run or an answer (score, label, comment, correction)

Revision ID: obs_0003
Revises: obs_0002
"""
import sqlalchemy as sa
from alembic import op

revision = "obs_0003"
down_revision = "obs_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "feedback",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("request_id", sa.String(100), nullable=False),
        sa.Column("subject_kind", sa.String(20), nullable=False),
        sa.Column("subject_id", sa.String(200), nullable=False),
        sa.Column("score", sa.Float, nullable=True),
        sa.Column("label", sa.String(100), nullable=True),
        sa.Column("comment", sa.Text, nullable=True),
        sa.Column("correction", sa.Text, nullable=True),
        sa.Column("key_id", sa.String(40), nullable=False),
        sa.Column("team_id", sa.String(40), nullable=True),
        sa.Column("user_id", sa.String(40), nullable=True),
    )
    op.create_index("ix_feedback_request_id", "feedback", ["request_id"])
    op.create_index("ix_feedback_ts", "feedback", ["ts"])


def downgrade() -> None:
    op.drop_table("feedback")
