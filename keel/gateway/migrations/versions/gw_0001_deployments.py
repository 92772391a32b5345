"""gateway: deployments added at run time

Revision ID: gw_0001
Revises:
"""
import sqlalchemy as sa
from alembic import op

revision = "gw_0001"
down_revision = None
branch_labels = ("gateway",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "deployments",
        sa.Column("id", sa.String(300), primary_key=True),
        sa.Column("alias", sa.String(200), nullable=False),
        sa.Column("config", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_deployments_alias", "deployments", ["alias"])


def downgrade() -> None:
    op.drop_table("deployments")
