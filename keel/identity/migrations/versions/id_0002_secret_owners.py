"""identity: secret owners, uses and grants

Revision ID: id_0002
Revises: id_0001
"""
import sqlalchemy as sa
from alembic import op

revision = "id_0002"
down_revision = "id_0001"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)
# Existing secrets become global and keep the two uses whose value never leaves Keel (a provider
# credential, an inbound webhook's HMAC key), so deployments and webhook triggers keep working; sending
# one in an outbound header is the one channel a builder could steer, so an admin must add it explicitly.
EXISTING_USES = '["provider", "webhook"]'


def upgrade() -> None:
    with op.batch_alter_table("secrets") as batch:
        batch.add_column(sa.Column("team_id", sa.String(40), nullable=True))
        batch.add_column(sa.Column("uses", sa.JSON, nullable=False, server_default=sa.text(f"'{EXISTING_USES}'")))
    op.create_index("ix_secrets_team_id", "secrets", ["team_id"])
    op.create_table(
        "secret_grants",
        sa.Column("secret", sa.String(200), primary_key=True),
        sa.Column("team_id", sa.String(40), primary_key=True),
        sa.Column("use", sa.String(20), primary_key=True),
        sa.Column("granted_by", sa.String(100), nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("secret_grants")
    op.drop_index("ix_secrets_team_id", "secrets")
    with op.batch_alter_table("secrets") as batch:
        batch.drop_column("uses")
        batch.drop_column("team_id")
