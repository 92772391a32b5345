"""identity: what processes sharing one store check about each other — a keyed fingerprint of the vault's master
key (every replica must hold the same key) and workers' heartbeats (a silent worker's runs are taken over)

Revision ID: id_0004
Revises: id_0005
"""
import sqlalchemy as sa
from alembic import op

revision = "id_0004"
down_revision = "id_0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "vault_master_key",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("fingerprint", sa.String(100), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "worker_heartbeats",
        sa.Column("executor_id", sa.String(100), primary_key=True),
        sa.Column("role", sa.String(20), nullable=False),
        sa.Column("host", sa.String(200), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("beat_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("worker_heartbeats")
    op.drop_table("vault_master_key")
