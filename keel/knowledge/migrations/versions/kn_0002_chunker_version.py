"""knowledge: the chunker version that cut each document's chunks (and a collection's latest), so a
re-ingest after the chunker changed re-chunks each document once

Revision ID: kn_0002
Revises: kn_0001
"""
import sqlalchemy as sa
from alembic import op

revision = "kn_0002"
down_revision = "kn_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # NULL: cut before versions were recorded (200 words and punctuation runs, prefix not counted)
    op.add_column("knowledge_documents", sa.Column("chunker", sa.String(100), nullable=True))
    op.add_column("knowledge_collections", sa.Column("chunker", sa.String(100), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("knowledge_documents") as batch:
        batch.drop_column("chunker")
    with op.batch_alter_table("knowledge_collections") as batch:
        batch.drop_column("chunker")
