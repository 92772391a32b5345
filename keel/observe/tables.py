"""The usage ledger: one row per metered request — success, error, or a stream cut short.

`request_id` is always Keel's own id (a client cannot make two requests share a row); the id a client
sent for its own correlation is kept in `client_request_id`.
"""

import sqlalchemy as sa

from keel.core.db import metadata

usage_ledger = sa.Table(
    "usage_ledger", metadata,
    sa.Column("request_id", sa.String(100), primary_key=True),
    sa.Column("ts", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("key_id", sa.String(40), nullable=True, index=True),
    sa.Column("team_id", sa.String(40), nullable=True, index=True),
    sa.Column("user_id", sa.String(40), nullable=True),
    sa.Column("kind", sa.String(20), nullable=False),
    sa.Column("alias", sa.String(200), nullable=True, index=True),
    sa.Column("deployment", sa.String(300), nullable=True),
    sa.Column("provider", sa.String(50), nullable=True),
    sa.Column("tokens_in", sa.Integer, nullable=False, server_default="0"),
    sa.Column("tokens_out", sa.Integer, nullable=False, server_default="0"),
    sa.Column("cost", sa.Float, nullable=False, server_default="0"),
    sa.Column("latency_ms", sa.Float, nullable=False, server_default="0"),
    sa.Column("ttft_ms", sa.Float, nullable=True),
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("http_status", sa.Integer, nullable=False, server_default="200"),
    sa.Column("error_code", sa.String(60), nullable=True),
    sa.Column("stream", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("cache_hit", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("saved_cost", sa.Float, nullable=False, server_default="0"),
    sa.Column("use_case", sa.String(200), nullable=True, index=True),
    sa.Column("task_id", sa.String(200), nullable=True, index=True),
    sa.Column("meta", sa.JSON, nullable=True),
    sa.Column("client_request_id", sa.String(128), nullable=True, index=True),
    sa.Column("prompt_version", sa.String(100), nullable=True, index=True),  # `name@version` of a registry prompt
)

# Feedback on a metered call: each row is anchored to the ledger row it judges (`request_id`), whether it
# was given by request id, workflow run id (the run's first metered call) or answer id; append-only.
feedback = sa.Table(
    "feedback", metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("ts", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("request_id", sa.String(100), nullable=False, index=True),
    sa.Column("subject_kind", sa.String(20), nullable=False),
    sa.Column("subject_id", sa.String(200), nullable=False),
    sa.Column("score", sa.Float, nullable=True),
    sa.Column("label", sa.String(100), nullable=True),
    sa.Column("comment", sa.Text, nullable=True),
    sa.Column("correction", sa.Text, nullable=True),
    sa.Column("key_id", sa.String(40), nullable=False),
    sa.Column("team_id", sa.String(40), nullable=True),
    sa.Column("user_id", sa.String(40), nullable=True),
)
