"""gateway: stored Responses API answers (`POST /v1/responses` with `store`), each scoped to its owner

Revision ID: gw_0004
Revises:
"""
import sqlalchemy as sa
from alembic import op

revision = "gw_0004"
down_revision = None
branch_labels = ("gateway_responses",)
# Like gw_0003, no dependency on gw_0001: the table references nothing of it (see gw_0003's note).
depends_on = None


def upgrade() -> None:
    op.create_table(
        "gateway_responses",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("user_id", sa.String(64), nullable=True),
        sa.Column("team_id", sa.String(64), nullable=True),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("previous_response_id", sa.String(64), nullable=True),
        sa.Column("input", sa.JSON, nullable=False),
        sa.Column("response", sa.JSON, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_index("ix_gateway_responses_created_at", "gateway_responses", ["created_at"])


def downgrade() -> None:
    op.drop_table("gateway_responses")
