"""identity: teams, users, api keys, secrets

Revision ID: id_0001
Revises:
"""
import sqlalchemy as sa
from alembic import op

revision = "id_0001"
down_revision = None
branch_labels = ("identity",)
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "teams",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("classification", sa.String(20), nullable=False, server_default="internal"),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("name", name="uq_teams_name"),
    )
    op.create_table(
        "users",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("email", sa.String(320), nullable=False),
        sa.Column("name", sa.String(200), nullable=False, server_default=""),
        sa.Column("team_id", sa.String(40), sa.ForeignKey("teams.id", ondelete="RESTRICT",
                                                          name="fk_users_team_id_teams"), nullable=True),
        sa.Column("role", sa.String(20), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("email", name="uq_users_email"),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("prefix", sa.String(32), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("name", sa.String(200), nullable=False, server_default=""),
        sa.Column("role", sa.String(20), nullable=False),
        sa.Column("team_id", sa.String(40), sa.ForeignKey("teams.id", ondelete="RESTRICT",
                                                          name="fk_api_keys_team_id_teams"), nullable=True),
        sa.Column("user_id", sa.String(40), sa.ForeignKey("users.id", ondelete="RESTRICT",
                                                          name="fk_api_keys_user_id_users"), nullable=True),
        sa.Column("scopes", sa.JSON, nullable=False),
        sa.Column("expires_at", TS, nullable=True),
        sa.Column("revoked_at", TS, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("prefix", name="uq_api_keys_prefix"),
    )
    op.create_table(
        "secrets",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("ciphertext", sa.LargeBinary, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
    )


def downgrade() -> None:
    for name in ("secrets", "api_keys", "users", "teams"):
        op.drop_table(name)
