"""observe: the prompt registry (versions, labels), evaluation datasets and runs, and the prompt version on
each ledger row

Revision ID: obs_0004
Revises: obs_0003
"""
import sqlalchemy as sa
from alembic import op

revision = "obs_0004"
down_revision = "obs_0003"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "prompt_versions",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("messages", sa.JSON, nullable=False),
        sa.Column("variables", sa.JSON, nullable=False),
        sa.Column("description", sa.Text, nullable=False, server_default=""),
        sa.Column("team_id", sa.String(40), nullable=True),
        sa.Column("created_by", sa.String(40), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("name", "version", name="uq_prompt_versions_name_version"),
    )
    op.create_table(
        "prompt_labels",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("label", sa.String(40), primary_key=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("updated_by", sa.String(40), nullable=False),
        sa.Column("updated_at", TS, nullable=False),
    )
    op.create_table(
        "eval_datasets",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("items", sa.JSON, nullable=False),
        sa.Column("n_items", sa.Integer, nullable=False),
        sa.Column("team_id", sa.String(40), nullable=True),
        sa.Column("created_by", sa.String(40), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("name", "version", name="uq_eval_datasets_name_version"),
    )
    op.create_table(
        "eval_runs",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("dataset", sa.String(64), nullable=False),
        sa.Column("dataset_version", sa.Integer, nullable=False),
        sa.Column("config", sa.JSON, nullable=False),
        sa.Column("metrics", sa.JSON, nullable=False),
        sa.Column("items", sa.JSON, nullable=False),
        sa.Column("team_id", sa.String(40), nullable=True),
        sa.Column("created_by", sa.String(40), nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_index("ix_eval_runs_dataset", "eval_runs", ["dataset"])
    op.add_column("usage_ledger", sa.Column("prompt_version", sa.String(100), nullable=True))
    op.create_index("ix_usage_ledger_prompt_version", "usage_ledger", ["prompt_version"])


def downgrade() -> None:
    op.drop_index("ix_usage_ledger_prompt_version", "usage_ledger")
    with op.batch_alter_table("usage_ledger") as batch:
        batch.drop_column("prompt_version")
    op.drop_index("ix_eval_runs_dataset", "eval_runs")
    for table in ("eval_runs", "eval_datasets", "prompt_labels", "prompt_versions"):
        op.drop_table(table)
