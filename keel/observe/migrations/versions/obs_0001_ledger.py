"""observe: usage ledger

Revision ID: obs_0001
Revises:
"""
import sqlalchemy as sa
from alembic import op

revision = "obs_0001"
down_revision = None
branch_labels = ("observe",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "usage_ledger",
        sa.Column("request_id", sa.String(100), primary_key=True),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("key_id", sa.String(40), nullable=True),
        sa.Column("team_id", sa.String(40), nullable=True),
        sa.Column("user_id", sa.String(40), nullable=True),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("alias", sa.String(200), nullable=True),
        sa.Column("deployment", sa.String(300), nullable=True),
        sa.Column("provider", sa.String(50), nullable=True),
        sa.Column("tokens_in", sa.Integer, nullable=False, server_default="0"),
        sa.Column("tokens_out", sa.Integer, nullable=False, server_default="0"),
        sa.Column("cost", sa.Float, nullable=False, server_default="0"),
        sa.Column("latency_ms", sa.Float, nullable=False, server_default="0"),
        sa.Column("ttft_ms", sa.Float, nullable=True),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("http_status", sa.Integer, nullable=False, server_default="200"),
        sa.Column("error_code", sa.String(60), nullable=True),
        sa.Column("stream", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("cache_hit", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("saved_cost", sa.Float, nullable=False, server_default="0"),
        sa.Column("use_case", sa.String(200), nullable=True),
        sa.Column("task_id", sa.String(200), nullable=True),
        sa.Column("meta", sa.JSON, nullable=True),
    )
    for col in ("ts", "key_id", "team_id", "alias", "use_case", "task_id"):
        op.create_index(f"ix_usage_ledger_{col}", "usage_ledger", [col])


def downgrade() -> None:
    op.drop_table("usage_ledger")
