"""Secrets vault: values encrypted at rest with the master key; only names ever leave it.

`get()` is for in-process use (a provider fetching its credential); no route returns a value.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

import sqlalchemy as sa
from cryptography.fernet import Fernet, InvalidToken

from keel.core.clock import utcnow
from keel.core.db import Store
from keel.core.errors import BadRequest, ConfigError, NotFound
from keel.core.logs import redactor
from keel.identity.tables import secrets

NAME_MAX = 200


def load_master_key(explicit: str | None, data_dir: Path) -> bytes:
    """`KEEL_MASTER_KEY` (any passphrase, stretched by SHA-256) or a 0600 key file made on first start."""
    if explicit:
        return base64.urlsafe_b64encode(hashlib.sha256(explicit.encode()).digest())
    path = data_dir / "master.key"
    if path.exists():
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise ConfigError(f"master key file {path} is readable by others (mode {mode:o})",
                              fix=f"chmod 600 {path}")
        return path.read_bytes().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    key = Fernet.generate_key()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key)
    return key


class Vault:
    """Named secrets, Fernet-encrypted (AES-128-CBC + HMAC) in the store."""

    def __init__(self, store: Store, master_key: bytes) -> None:
        self._store = store
        self._fernet = Fernet(master_key)

    @staticmethod
    def _check_name(name: str) -> None:
        if not name or len(name) > NAME_MAX or not all(c.isalnum() or c in "-_." for c in name):
            raise BadRequest(f"invalid secret name {name[:40]!r}",
                             fix="use 1-200 letters, digits, '-', '_' or '.'")

    def put(self, name: str, value: str) -> None:
        self._check_name(name)
        if not value:
            raise BadRequest(f"secret {name!r} has an empty value", fix="send a non-empty `value`")
        redactor.add(value)
        token = self._fernet.encrypt(value.encode())
        now = utcnow()
        with self._store.engine.begin() as conn:
            updated = conn.execute(secrets.update().where(secrets.c.name == name)
                                   .values(ciphertext=token, updated_at=now)).rowcount
            if not updated:
                conn.execute(secrets.insert().values(name=name, ciphertext=token, created_at=now, updated_at=now))

    def get(self, name: str) -> str:
        with self._store.engine.connect() as conn:
            row = conn.execute(sa.select(secrets.c.ciphertext).where(secrets.c.name == name)).first()
        if row is None:
            raise NotFound(f"secret {name!r} is not in the vault", fix=f"store it: keel secrets set {name}",
                           secret=name)
        try:
            value = self._fernet.decrypt(row[0]).decode()
        except InvalidToken:
            raise ConfigError(f"secret {name!r} cannot be decrypted with this master key",
                              fix="start Keel with the master key the secret was stored with") from None
        redactor.add(value)
        return value

    def names(self) -> list[dict[str, str]]:
        with self._store.engine.connect() as conn:
            rows = conn.execute(sa.select(secrets.c.name, secrets.c.created_at, secrets.c.updated_at)
                                .order_by(secrets.c.name)).all()
        return [{"name": r.name, "created_at": r.created_at.isoformat(), "updated_at": r.updated_at.isoformat()}
                for r in rows]

    def delete(self, name: str) -> None:
        with self._store.engine.begin() as conn:
            if not conn.execute(secrets.delete().where(secrets.c.name == name)).rowcount:
                raise NotFound(f"secret {name!r} is not in the vault", secret=name)

    def prime_redactor(self) -> None:
        """Teach the log scrubber every stored value, so none can leak even by accident."""
        for item in self.names():
            try:
                self.get(item["name"])
            except ConfigError:
                continue
