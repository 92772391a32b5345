"""One master key for all replicas: the store keeps a keyed fingerprint of the vault's key (an HMAC made with
the key, never the key itself), written by the first process that starts; a process holding another key
refuses to start, before its port is bound, instead of failing later on every secret it cannot open."""

from __future__ import annotations

import hmac

import sqlalchemy as sa

from keel.core.clock import utcnow
from keel.core.db import Store, metadata
from keel.core.errors import ConfigError

# One row (id 1), made on the first start after this table exists.
vault_master_key = sa.Table(
    "vault_master_key", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("fingerprint", sa.String(100), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)


class MasterKeyMismatch(ConfigError):
    """This process's master key is not the one the store's other replicas use."""

    code = "master_key_mismatch"


def verify(store: Store, fingerprint: str) -> bool:
    """Record `fingerprint` if the store has none yet (True), else check it is the recorded one (False);
    raises MasterKeyMismatch when it is not."""
    with store.engine.begin() as conn:
        row = conn.execute(sa.select(vault_master_key.c.fingerprint).where(vault_master_key.c.id == 1)).first()
        if row is None:
            try:
                with conn.begin_nested():
                    conn.execute(vault_master_key.insert().values(id=1, fingerprint=fingerprint, created_at=utcnow()))
                return True
            except sa.exc.IntegrityError:  # another replica recorded its key first: compare with theirs
                row = conn.execute(sa.select(vault_master_key.c.fingerprint)
                                   .where(vault_master_key.c.id == 1)).one()
    if not hmac.compare_digest(row.fingerprint, fingerprint):
        raise MasterKeyMismatch(
            "this process's master key differs from the one this database's other Keel processes use "
            "(the store holds a fingerprint of that key)",
            fix="start every replica and worker with the same KEEL_MASTER_KEY (or the same master.key file "
                "from the first one's data dir)")
    return False
