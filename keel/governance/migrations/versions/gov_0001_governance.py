"""governance: policy versions, audit chain (append-only), guard events, reviews

Revision ID: gov_0001
Revises:
"""
import sqlalchemy as sa
from alembic import op

revision = "gov_0001"
down_revision = None
branch_labels = ("governance",)
depends_on = None

TS = sa.DateTime(timezone=True)
SEQ = sa.BigInteger().with_variant(sa.Integer, "sqlite")

_PG_FUNCTION = """
CREATE OR REPLACE FUNCTION keel_audit_append_only() RETURNS trigger AS $$
BEGIN
  RAISE EXCEPTION 'audit events are append-only';
END;
$$ LANGUAGE plpgsql;
"""


def upgrade() -> None:
    op.create_table(
        "policy_versions",
        sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("name", sa.String(200), nullable=False, server_default=""),
        sa.Column("source", sa.String(1000), nullable=False, server_default=""),
        sa.Column("content", sa.Text, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("sha256", name="uq_policy_versions_sha256"),
    )
    op.create_table(
        "audit_events",
        sa.Column("seq", SEQ, primary_key=True, autoincrement=False),
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("ts", sa.String(40), nullable=False),
        sa.Column("actor", sa.String(100), nullable=False),
        sa.Column("action", sa.String(100), nullable=False),
        sa.Column("team_id", sa.String(40), nullable=True),
        sa.Column("details", sa.Text, nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.UniqueConstraint("id", name="uq_audit_events_id"),
    )
    op.create_index("ix_audit_events_action", "audit_events", ["action"])
    op.create_index("ix_audit_events_team_id", "audit_events", ["team_id"])
    op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("seq", SEQ, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    op.create_table(
        "guard_events",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("request_id", sa.String(100), nullable=False),
        sa.Column("ts", TS, nullable=False),
        sa.Column("key_id", sa.String(40), nullable=True),
        sa.Column("team_id", sa.String(40), nullable=True),
        sa.Column("guard", sa.String(40), nullable=False),
        sa.Column("side", sa.String(20), nullable=False),
        sa.Column("type", sa.String(60), nullable=False),
        sa.Column("location", sa.String(100), nullable=False, server_default=""),
        sa.Column("start", sa.Integer, nullable=False),
        sa.Column("end", sa.Integer, nullable=False),
        sa.Column("score", sa.Float, nullable=True),
        sa.Column("action", sa.String(20), nullable=False),
        sa.Column("policy_version", sa.Integer, nullable=True),
    )
    op.create_index("ix_guard_events_request_id", "guard_events", ["request_id"])
    op.create_index("ix_guard_events_key_id", "guard_events", ["key_id"])
    op.create_index("ix_guard_events_team_id", "guard_events", ["team_id"])
    op.create_table(
        "reviews",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("request_id", sa.String(100), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("key_id", sa.String(40), nullable=True),
        sa.Column("team_id", sa.String(40), nullable=True),
        sa.Column("alias", sa.String(200), nullable=False),
        sa.Column("deployment", sa.String(300), nullable=True),
        sa.Column("use_case", sa.String(200), nullable=True),
        sa.Column("classification", sa.String(40), nullable=False),
        sa.Column("reasons", sa.JSON, nullable=False),
        sa.Column("messages", sa.JSON, nullable=True),
        sa.Column("output", sa.JSON, nullable=True),
        sa.Column("final_output", sa.JSON, nullable=True),
        sa.Column("decided_by", sa.String(40), nullable=True),
        sa.Column("decision_reason", sa.Text, nullable=True),
        sa.Column("webhook_url", sa.String(2000), nullable=True),
        sa.Column("webhook_status", sa.String(40), nullable=True),
        sa.Column("policy_version", sa.Integer, nullable=True),
        sa.Column("retain_until", TS, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("decided_at", TS, nullable=True),
    )
    op.create_index("ix_reviews_status", "reviews", ["status"])
    op.create_index("ix_reviews_key_id", "reviews", ["key_id"])
    op.create_index("ix_reviews_team_id", "reviews", ["team_id"])
    # Append-only at the database too: an UPDATE or DELETE of an audit event fails.
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_PG_FUNCTION)
        op.execute("CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON audit_events "
                   "FOR EACH ROW EXECUTE FUNCTION keel_audit_append_only()")
    else:
        for verb in ("UPDATE", "DELETE"):
            op.execute(f"CREATE TRIGGER audit_events_no_{verb.lower()} BEFORE {verb} ON audit_events "
                       "BEGIN SELECT RAISE(ABORT, 'audit events are append-only'); END")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS audit_events_append_only ON audit_events")
        op.execute("DROP FUNCTION IF EXISTS keel_audit_append_only()")
    for name in ("reviews", "guard_events", "audit_head", "audit_events", "policy_versions"):
        op.drop_table(name)
