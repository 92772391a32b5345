"""Deployments added through the admin API (those in keel.yaml live in the settings)."""

import sqlalchemy as sa

from keel.core.db import metadata

deployments = sa.Table(
    "deployments", metadata,
    sa.Column("id", sa.String(300), primary_key=True),
    sa.Column("alias", sa.String(200), nullable=False, index=True),
    sa.Column("config", sa.JSON, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)
