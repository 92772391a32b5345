"""identity: the vault's key-derivation parameters (scrypt salt and cost), one row per installation

Revision ID: id_0003
Revises: id_0002
"""
import sqlalchemy as sa
from alembic import op

revision = "id_0003"
down_revision = "id_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "vault_kdf",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("algorithm", sa.String(20), nullable=False),
        sa.Column("salt", sa.LargeBinary, nullable=False),
        sa.Column("n", sa.Integer, nullable=False),
        sa.Column("r", sa.Integer, nullable=False),
        sa.Column("p", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("vault_kdf")
