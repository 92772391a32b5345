"""observe: daily usage rollups (per day, team, key, user, use case, model, deployment, provider, status), with
the existing ledger rows counted in

Revision ID: obs_0005_rollups
Revises: obs_0004
"""
from alembic import op

from keel.observe import rollup

revision = "obs_0005_rollups"
down_revision = "obs_0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("usage_rollup", *rollup.columns())
    op.create_index("ix_usage_rollup_key_bucket", "usage_rollup", ["key_id", "bucket"])
    rollup.rebuild(op.get_bind())


def downgrade() -> None:
    op.drop_table("usage_rollup")
