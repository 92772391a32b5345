"""observe: the client's own request id on each ledger row, for correlation (the key stays Keel's)

Revision ID: obs_0002
Revises: obs_0001
"""
import sqlalchemy as sa
from alembic import op

revision = "obs_0002"
down_revision = "obs_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("usage_ledger", sa.Column("client_request_id", sa.String(128), nullable=True))
    op.create_index("ix_usage_ledger_client_request_id", "usage_ledger", ["client_request_id"])


def downgrade() -> None:
    op.drop_index("ix_usage_ledger_client_request_id", "usage_ledger")
    with op.batch_alter_table("usage_ledger") as batch:
        batch.drop_column("client_request_id")
