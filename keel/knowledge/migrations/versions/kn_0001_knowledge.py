"""knowledge: collections, ACLs, documents, chunks, ingest jobs (+ pgvector and full-text on PostgreSQL)

Revision ID: kn_0001
Revises:
"""
import sqlalchemy as sa
from alembic import op

revision = "kn_0001"
down_revision = None
branch_labels = ("knowledge",)
depends_on = None

TS = sa.DateTime(timezone=True)
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    pg = op.get_bind().dialect.name == "postgresql"
    if pg:
        op.execute("CREATE EXTENSION IF NOT EXISTS vector")
    op.create_table(
        "knowledge_collections",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("description", sa.Text, nullable=False, server_default=""),
        sa.Column("classification", sa.String(20), nullable=False),
        sa.Column("owner_team_id", sa.String(40), nullable=True),
        sa.Column("embedding_model", sa.String(200), nullable=False),
        sa.Column("dims", sa.Integer, nullable=True),
        sa.Column("meta", sa.JSON, nullable=False),
        sa.Column("created_by", sa.String(40), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.UniqueConstraint("name", name="uq_knowledge_collections_name"),
    )
    op.create_table(
        "knowledge_collection_acl",
        sa.Column("collection_id", sa.String(40), sa.ForeignKey(
            "knowledge_collections.id", ondelete="CASCADE",
            name="fk_knowledge_collection_acl_collection_id_knowledge_collections"), primary_key=True),
        sa.Column("access", sa.String(10), primary_key=True),
        sa.Column("kind", sa.String(10), primary_key=True),
        sa.Column("value", sa.String(200), primary_key=True),
    )
    op.create_table(
        "knowledge_documents",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("collection_id", sa.String(40), sa.ForeignKey(
            "knowledge_collections.id", ondelete="CASCADE",
            name="fk_knowledge_documents_collection_id_knowledge_collections"), nullable=False),
        sa.Column("source", sa.String(1000), nullable=False),
        sa.Column("origin", sa.String(1000), nullable=False, server_default=""),
        sa.Column("title", sa.String(500), nullable=False, server_default=""),
        sa.Column("format", sa.String(20), nullable=False),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("chunk_count", sa.Integer, nullable=False),
        sa.Column("pages", sa.Integer, nullable=True),
        sa.Column("restricted", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("meta", sa.JSON, nullable=False),
        sa.Column("job_id", sa.String(40), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.UniqueConstraint("collection_id", "source", name="uq_knowledge_documents_collection_source"),
    )
    op.create_index("ix_knowledge_documents_restricted", "knowledge_documents", ["collection_id", "restricted"])
    op.create_table(
        "knowledge_document_acl",
        sa.Column("document_id", sa.String(40), sa.ForeignKey(
            "knowledge_documents.id", ondelete="CASCADE",
            name="fk_knowledge_document_acl_document_id_knowledge_documents"), primary_key=True),
        sa.Column("kind", sa.String(10), primary_key=True),
        sa.Column("value", sa.String(200), primary_key=True),
    )
    op.create_table(
        "knowledge_chunks",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("document_id", sa.String(40), sa.ForeignKey(
            "knowledge_documents.id", ondelete="CASCADE",
            name="fk_knowledge_chunks_document_id_knowledge_documents"), nullable=False),
        sa.Column("collection_id", sa.String(40), nullable=False),
        sa.Column("ordinal", sa.Integer, nullable=False),
        sa.Column("section", sa.Text, nullable=False, server_default=""),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("page", sa.Integer, nullable=True),
        sa.Column("span_start", sa.Integer, nullable=False),
        sa.Column("span_end", sa.Integer, nullable=False),
        sa.Column("tokens", sa.Integer, nullable=False),
        sa.Column("embedding", sa.LargeBinary, nullable=True),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_knowledge_chunks_document_id", "knowledge_chunks", ["document_id"])
    op.create_index("ix_knowledge_chunks_collection_id", "knowledge_chunks", ["collection_id"])
    if pg:
        op.execute("ALTER TABLE knowledge_chunks ALTER COLUMN embedding TYPE vector USING NULL")
        op.execute("ALTER TABLE knowledge_chunks ADD COLUMN tsv tsvector GENERATED ALWAYS AS ("
                   "setweight(to_tsvector('english', section), 'A') || "
                   "setweight(to_tsvector('english', text), 'B')) STORED")
        op.execute("CREATE INDEX ix_knowledge_chunks_tsv ON knowledge_chunks USING gin (tsv)")
        # One partial HNSW index per embedding width; other widths get theirs when a collection needs it.
        op.execute("CREATE INDEX ix_knowledge_chunks_hnsw_384 ON knowledge_chunks USING hnsw "
                   "((embedding::vector(384)) vector_cosine_ops) WHERE vector_dims(embedding) = 384")
    op.create_table(
        "knowledge_jobs",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("collection_id", sa.String(40), sa.ForeignKey(
            "knowledge_collections.id", ondelete="CASCADE",
            name="fk_knowledge_jobs_collection_id_knowledge_collections"), nullable=False),
        sa.Column("status", sa.String(30), nullable=False),
        sa.Column("principal", sa.JSON, nullable=False),
        sa.Column("created_by", sa.String(40), nullable=False),
        sa.Column("total", sa.Integer, nullable=False),
        sa.Column("lease_owner", sa.String(80), nullable=True),
        sa.Column("lease_until", TS, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("started_at", TS, nullable=True),
        sa.Column("finished_at", TS, nullable=True),
    )
    op.create_index("ix_knowledge_jobs_collection_id", "knowledge_jobs", ["collection_id"])
    op.create_index("ix_knowledge_jobs_status", "knowledge_jobs", ["status"])
    op.create_table(
        "knowledge_job_items",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(40), sa.ForeignKey(
            "knowledge_jobs.id", ondelete="CASCADE", name="fk_knowledge_job_items_job_id_knowledge_jobs"),
            nullable=False),
        sa.Column("ordinal", sa.Integer, nullable=False),
        sa.Column("source", sa.String(1000), nullable=False),
        sa.Column("origin", sa.String(1000), nullable=False, server_default=""),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("content", sa.LargeBinary, nullable=True),
        sa.Column("options", sa.JSON, nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("document_id", sa.String(40), nullable=True),
        sa.Column("chunks", sa.Integer, nullable=False, server_default="0"),
        sa.Column("error_code", sa.String(60), nullable=True),
        sa.Column("error_detail", sa.Text, nullable=True),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_knowledge_job_items_job_id", "knowledge_job_items", ["job_id"])


def downgrade() -> None:
    for name in ("knowledge_job_items", "knowledge_jobs", "knowledge_chunks", "knowledge_document_acl",
                 "knowledge_documents", "knowledge_collection_acl", "knowledge_collections"):
        op.drop_table(name)
