"""gateway: response cache entries and per-alias invalidation generations

Revision ID: gw_0003
Revises:
"""
import sqlalchemy as sa
from alembic import op

revision = "gw_0003"
down_revision = None
branch_labels = ("gateway_cache",)
# No `depends_on = "gw_0001"`: these tables reference nothing of it, and a dependency makes Alembic
# leave gw_0001 out of alembic_version, which `Store.is_current()` (and so /readyz) reads as behind.
depends_on = None


def upgrade() -> None:
    op.create_table(
        "gateway_cache_entries",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(10), nullable=False),
        sa.Column("scope", sa.String(100), nullable=False),
        sa.Column("alias", sa.String(200), nullable=False),
        sa.Column("partition", sa.String(64), nullable=True),
        sa.Column("dims", sa.Integer, nullable=True),
        sa.Column("vector", sa.LargeBinary, nullable=True),
        sa.Column("payload", sa.JSON, nullable=False),
        sa.Column("cost", sa.Float, nullable=False, server_default="0"),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
    )
    op.create_index("ix_gateway_cache_entries_alias", "gateway_cache_entries", ["alias"])
    op.create_index("ix_gateway_cache_entries_expires_at", "gateway_cache_entries", ["expires_at"])
    op.create_index("ix_gateway_cache_entries_partition", "gateway_cache_entries", ["scope", "alias", "partition"])
    op.create_table(
        "gateway_cache_generations",
        sa.Column("alias", sa.String(200), primary_key=True),
        sa.Column("generation", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("gateway_cache_generations")
    op.drop_table("gateway_cache_entries")
