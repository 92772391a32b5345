"""Identity tables: teams, users, API keys (hashed), vault secrets (encrypted, owned, with their uses),
the grants that let a team use a secret it does not own, and how a passphrase becomes the vault's key."""

import sqlalchemy as sa

from keel.core.db import metadata

TS = sa.DateTime(timezone=True)

teams = sa.Table(
    "teams", metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False, unique=True),
    sa.Column("classification", sa.String(20), nullable=False, server_default="internal"),
    sa.Column("created_at", TS, nullable=False),
)

users = sa.Table(
    "users", metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("email", sa.String(320), nullable=False, unique=True),
    sa.Column("name", sa.String(200), nullable=False, server_default=""),
    sa.Column("team_id", sa.String(40), sa.ForeignKey("teams.id", ondelete="RESTRICT"), nullable=True),
    sa.Column("role", sa.String(20), nullable=False),
    sa.Column("created_at", TS, nullable=False),
)

api_keys = sa.Table(
    "api_keys", metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("prefix", sa.String(32), nullable=False, unique=True),
    sa.Column("key_hash", sa.String(64), nullable=False),
    sa.Column("name", sa.String(200), nullable=False, server_default=""),
    sa.Column("role", sa.String(20), nullable=False),
    sa.Column("team_id", sa.String(40), sa.ForeignKey("teams.id", ondelete="RESTRICT"), nullable=True),
    sa.Column("user_id", sa.String(40), sa.ForeignKey("users.id", ondelete="RESTRICT"), nullable=True),
    sa.Column("scopes", sa.JSON, nullable=False),
    sa.Column("expires_at", TS, nullable=True),
    sa.Column("revoked_at", TS, nullable=True),
    sa.Column("created_at", TS, nullable=False),
)

secrets = sa.Table(
    "secrets", metadata,
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("ciphertext", sa.LargeBinary, nullable=False),
    sa.Column("team_id", sa.String(40), nullable=True, index=True),  # the owner; NULL = global (admins)
    sa.Column("uses", sa.JSON, nullable=False),  # what it may serve: provider, http_header, webhook
    sa.Column("created_at", TS, nullable=False),
    sa.Column("updated_at", TS, nullable=False),
)

secret_grants = sa.Table(
    "secret_grants", metadata,
    sa.Column("secret", sa.String(200), primary_key=True),
    sa.Column("team_id", sa.String(40), primary_key=True),
    sa.Column("use", sa.String(20), primary_key=True),
    sa.Column("granted_by", sa.String(100), nullable=False),
    sa.Column("created_at", TS, nullable=False),
)

# One row (id 1): the scrypt salt and cost that turn a KEEL_MASTER_KEY passphrase into the vault's key.
# It lives in the database every replica shares, so all of them derive the same key.
vault_kdf = sa.Table(
    "vault_kdf", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("algorithm", sa.String(20), nullable=False),
    sa.Column("salt", sa.LargeBinary, nullable=False),
    sa.Column("n", sa.Integer, nullable=False),
    sa.Column("r", sa.Integer, nullable=False),
    sa.Column("p", sa.Integer, nullable=False),
    sa.Column("created_at", TS, nullable=False),
)

# A user's console password (an admin sets it): scrypt, memory-hard, its parameters inside the hash string.
user_passwords = sa.Table(
    "user_passwords", metadata,
    sa.Column("user_id", sa.String(40), sa.ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("hash", sa.String(300), nullable=False),
    sa.Column("updated_at", TS, nullable=False),
)

# Console sessions: the SHA-256 of the cookie's token (never the token), who signed in (a key or a user),
# the session-bound CSRF token, and the times idle and absolute expiry are measured from.
console_sessions = sa.Table(
    "console_sessions", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("key_id", sa.String(40), nullable=True),
    sa.Column("user_id", sa.String(40), nullable=True),
    sa.Column("csrf", sa.String(64), nullable=False),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("last_seen_at", TS, nullable=False),
)
