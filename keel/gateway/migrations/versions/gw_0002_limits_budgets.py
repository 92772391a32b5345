"""gateway: rate limits and their window counters; budgets, their per-period usage, holds and events

Revision ID: gw_0002
Revises: gw_0001
"""
import sqlalchemy as sa
from alembic import op

revision = "gw_0002"
down_revision = "gw_0001"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "rate_limits",
        sa.Column("scope", sa.String(20), primary_key=True),
        sa.Column("scope_id", sa.String(300), primary_key=True),
        sa.Column("rpm", sa.BigInteger, nullable=True),
        sa.Column("tpm", sa.BigInteger, nullable=True),
        sa.Column("updated_at", TS, nullable=False),
    )
    op.create_table(
        "rate_counters",
        sa.Column("bucket", sa.String(400), primary_key=True),
        sa.Column("n", sa.BigInteger, nullable=False),
        sa.Column("g", sa.BigInteger, nullable=False),
        sa.Column("window_end", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_rate_counters_window_end", "rate_counters", ["window_end"])
    op.create_table(
        "budgets",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("scope", sa.String(20), nullable=False),
        sa.Column("scope_id", sa.String(300), nullable=False),
        sa.Column("period", sa.String(10), nullable=False),
        sa.Column("limit_nano", sa.BigInteger, nullable=False),
        sa.Column("alert_percent", sa.Float, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.UniqueConstraint("scope", "scope_id", "period", name="uq_budgets_scope"),
    )
    op.create_table(
        "budget_usage",
        sa.Column("id", sa.String(80), primary_key=True),
        sa.Column("budget_id", sa.String(40), sa.ForeignKey("budgets.id", ondelete="CASCADE",
                                                            name="fk_budget_usage_budget_id_budgets"),
                  nullable=False),
        sa.Column("period_key", sa.String(10), nullable=False),
        sa.Column("limit_nano", sa.BigInteger, nullable=False),
        sa.Column("spent_nano", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("reserved_nano", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("granted_nano", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("alerted_at", TS, nullable=True),
    )
    op.create_index("ix_budget_usage_budget_id", "budget_usage", ["budget_id"])
    op.create_table(
        "budget_holds",
        sa.Column("id", sa.String(160), primary_key=True),
        sa.Column("replica", sa.String(40), nullable=False),
        sa.Column("usage_id", sa.String(80), nullable=False),
        sa.Column("amount_nano", sa.BigInteger, nullable=False),
        sa.Column("expires_at", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_budget_holds_replica", "budget_holds", ["replica"])
    op.create_index("ix_budget_holds_expires_at", "budget_holds", ["expires_at"])
    op.create_table(
        "budget_events",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("budget_id", sa.String(40), nullable=False),
        sa.Column("period_key", sa.String(10), nullable=False),
        sa.Column("kind", sa.String(30), nullable=False),
        sa.Column("ts", TS, nullable=False),
        sa.Column("spent_nano", sa.BigInteger, nullable=False),
        sa.Column("limit_nano", sa.BigInteger, nullable=False),
        sa.Column("detail", sa.JSON, nullable=True),
        sa.Column("delivery", sa.String(300), nullable=True),
    )
    op.create_index("ix_budget_events_budget_id", "budget_events", ["budget_id"])


def downgrade() -> None:
    for table in ("budget_events", "budget_holds", "budget_usage", "budgets", "rate_counters", "rate_limits"):
        op.drop_table(table)
