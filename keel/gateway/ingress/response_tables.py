"""The stored Responses API answers: what the caller sent and what it got back, and who owns it."""

import sqlalchemy as sa

from keel.core.db import metadata

responses = sa.Table(
    "gateway_responses", metadata,
    sa.Column("id", sa.String(64), primary_key=True),  # resp_…
    sa.Column("key_id", sa.String(64), nullable=False),  # the key that created it: the owner
    sa.Column("user_id", sa.String(64), nullable=True),
    sa.Column("team_id", sa.String(64), nullable=True),  # its team reads it (as with workflow runs)
    sa.Column("model", sa.String(256), nullable=False),
    sa.Column("previous_response_id", sa.String(64), nullable=True),
    sa.Column("input", sa.JSON, nullable=False),  # this request's input items, as sent
    sa.Column("response", sa.JSON, nullable=False),  # the response object, as returned
    sa.Column("created_at", sa.Float, nullable=False, index=True),  # unix seconds
)
