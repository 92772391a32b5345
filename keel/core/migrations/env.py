"""Alembic environment: runs on the connection Keel hands it (never reads alembic.ini)."""

from alembic import context

from keel.core.db import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
