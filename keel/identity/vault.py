"""Secrets vault: values encrypted at rest with the master key; only names ever leave it.

Every secret has an owner (a team, or global) and the uses it may serve (`provider`: a deployment's
credential; `http_header`: a workflow's outbound header; `webhook`: an inbound webhook's HMAC key). A
workflow reads a secret only through `resolve(name, team, use)`: its team owns it, or an admin granted it
to that team for that use, and the use is among the secret's own. No route returns a value.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from keel.core.clock import utcnow
from keel.core.db import Store
from keel.core.errors import BadRequest, ConfigError, Conflict, Forbidden, NotFound
from keel.core.logs import redactor
from keel.identity.tables import secret_grants, secrets, vault_kdf

NAME_MAX = 200
USES = ("provider", "http_header", "webhook")
TEAM_USES = ("http_header", "webhook")  # a team's own secret is never a (global) deployment's credential
GLOBAL_DEFAULT_USES = ("provider",)  # what an admin's secret serves unless the admin says otherwise


class SecretNotAllowed(Forbidden):
    """A workflow (or deployment) named a secret its owner may not use for this purpose."""

    code, title = "secret_not_allowed", "Secret not allowed"


class SecretUseNotAllowed(Conflict):
    """A grant asks for a use the secret itself does not serve (e.g. a provider key in a header)."""

    code, title = "secret_use_not_allowed", "Secret use not allowed"


def denied(name: str, team_id: str | None, use: str, **ids: str) -> SecretNotAllowed:
    """The one answer for a secret that is missing, not the team's, or not for this use (no name oracle)."""
    if team_id is None:
        return SecretNotAllowed(f"secret {name!r} is not a global secret that serves {use}",
                                fix=f"an admin stores it without a team for this use: keel secrets set {name} "
                                    f"--use {use}", secret=name, use=use, **ids)
    return SecretNotAllowed(f"secret {name!r} is not available to team {team_id} for {use}",
                            fix=f"store it as your team's secret (keel secrets set {name} --use {use}), or ask an "
                                f"admin to grant it: keel secrets grant {name} --team {team_id} --use {use}",
                            secret=name, use=use, team_id=team_id, **ids)


def check_uses(uses: list[str] | tuple[str, ...], team_id: str | None) -> tuple[str, ...]:
    """Validated uses, in canonical order; a team's secret may not be a provider credential."""
    bad = [u for u in uses if u not in USES]
    if bad or not uses:
        raise BadRequest(f"unknown or no secret uses {bad or list(uses)}", fix=f"use one or more of: {', '.join(USES)}")
    if team_id is not None and "provider" in uses:
        raise BadRequest("a team's secret cannot be a provider credential (deployments are global)",
                         fix="store provider credentials without a team, or drop the provider use")
    return tuple(u for u in USES if u in uses)


# scrypt at OWASP's first recommended cost (128 MiB, a fraction of a second, once per process start).
# Stored with the salt, so a later version may raise it for new installations without locking out old ones.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**17, 8, 1
FINGERPRINT_CONTEXT = b"keel master key fingerprint v1"


@dataclass(frozen=True)
class MasterKey:
    """Where the vault's key comes from: a Fernet key (the 0600 key file), or a `KEEL_MASTER_KEY` passphrase,
    stretched by scrypt with this installation's salt once the store is known."""

    key: bytes | None = field(default=None, repr=False)
    passphrase: str | None = field(default=None, repr=False)

    def fernet_keys(self, store: Store) -> list[bytes]:
        """The keys to open values with, the one to seal with first. A passphrase also yields its legacy key (one
        SHA-256, as earlier versions made it), so values they sealed still open until they are resealed."""
        if self.passphrase is None:
            assert self.key is not None
            return [self.key]
        row = kdf_params(store)
        stretched = hashlib.scrypt(self.passphrase.encode(), salt=bytes(row.salt), n=row.n, r=row.r, p=row.p,
                                   maxmem=256 * row.r * row.n + 2**20, dklen=32)
        legacy = hashlib.sha256(self.passphrase.encode()).digest()
        return [base64.urlsafe_b64encode(stretched), base64.urlsafe_b64encode(legacy)]


def kdf_params(store: Store) -> Any:
    """This installation's scrypt salt and cost, made on first use. The salt is kept in the database the
    replicas share, so each derives the same key from one passphrase; it is random per installation, so no
    table precomputed over passphrases serves two installations (it need not be secret)."""
    with store.engine.begin() as conn:
        row = conn.execute(sa.select(vault_kdf).where(vault_kdf.c.id == 1)).first()
        if row is None:
            try:
                with conn.begin_nested():
                    conn.execute(vault_kdf.insert().values(id=1, algorithm="scrypt", salt=os.urandom(16), n=SCRYPT_N,
                                                           r=SCRYPT_R, p=SCRYPT_P, created_at=utcnow()))
            except sa.exc.IntegrityError:  # another replica made it first: use theirs
                pass
            row = conn.execute(sa.select(vault_kdf).where(vault_kdf.c.id == 1)).one()
    if row.algorithm != "scrypt":
        raise ConfigError(f"the vault's key derivation {row.algorithm!r} is not known to this version",
                          fix="run the Keel version that set up this database, or a newer one")
    return row


def load_master_key(explicit: str | None, data_dir: Path) -> MasterKey:
    """`KEEL_MASTER_KEY` (any passphrase, stretched by scrypt) or a 0600 key file made on first start."""
    if explicit:
        return MasterKey(passphrase=explicit)
    path = data_dir / "master.key"
    if path.exists():
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise ConfigError(f"master key file {path} is readable by others (mode {mode:o})",
                              fix=f"chmod 600 {path}")
        return MasterKey(key=path.read_bytes().strip())
    data_dir.mkdir(parents=True, exist_ok=True)
    key = Fernet.generate_key()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key)
    return MasterKey(key=key)


class Vault:
    """Named secrets, Fernet-encrypted (AES-128-CBC + HMAC) in the store, each with an owner and uses."""

    def __init__(self, store: Store, master_key: MasterKey | bytes) -> None:
        """`master_key`: what `load_master_key` found, or a Fernet key itself."""
        self._store = store
        keys = master_key.fernet_keys(store) if isinstance(master_key, MasterKey) else [master_key]
        self._fernet = MultiFernet([Fernet(k) for k in keys])  # seals with the first, opens with any
        self._current = Fernet(keys[0])
        # A keyed hash of the sealing key, never the key: replicas compare it to refuse a different master key.
        self.fingerprint = hmac.new(keys[0], FINGERPRINT_CONTEXT, hashlib.sha256).hexdigest()

    @staticmethod
    def _check_name(name: str) -> None:
        if not name or len(name) > NAME_MAX or not all(c.isalnum() or c in "-_." for c in name):
            raise BadRequest(f"invalid secret name {name[:40]!r}",
                             fix="use 1-200 letters, digits, '-', '_' or '.'")

    def put(self, name: str, value: str, *, team_id: str | None = None,
            uses: list[str] | tuple[str, ...] | None = None) -> dict[str, Any]:
        """Store a value owned by `team_id` (None: global). A new secret serves `uses` (default: provider for a
        global one, http_header and webhook for a team's); an update keeps its uses unless given. A name
        another owner holds is refused: owners never change by overwriting."""
        self._check_name(name)
        if not value:
            raise BadRequest(f"secret {name!r} has an empty value", fix="send a non-empty `value`")
        wanted = check_uses(uses, team_id) if uses is not None else None
        redactor.add(value)
        token = self._fernet.encrypt(value.encode())
        now = utcnow()
        with self._store.engine.begin() as conn:
            row = conn.execute(sa.select(secrets.c.team_id, secrets.c.uses).where(secrets.c.name == name)).first()
            if row is None:
                final = wanted or (GLOBAL_DEFAULT_USES if team_id is None else TEAM_USES)
                conn.execute(secrets.insert().values(name=name, ciphertext=token, team_id=team_id, uses=list(final),
                                                     created_at=now, updated_at=now))
                return {"name": name, "team_id": team_id, "uses": list(final), "created": True}
            if row.team_id != team_id:
                raise Conflict(f"secret name {name!r} is held by another owner",
                               fix="choose another name (an admin may delete the existing secret first)", secret=name)
            final = wanted or tuple(row.uses)
            conn.execute(secrets.update().where(secrets.c.name == name)
                         .values(ciphertext=token, uses=list(final), updated_at=now))
            conn.execute(secret_grants.delete().where(secret_grants.c.secret == name,
                                                      secret_grants.c.use.not_in(final)))
        return {"name": name, "team_id": team_id, "uses": list(final), "created": False}

    def _decrypt(self, name: str, token: bytes) -> str:
        """The value; one still sealed with an older key (the legacy passphrase hash) is resealed on the way."""
        token = bytes(token)
        try:
            value = self._current.decrypt(token).decode()
        except InvalidToken:
            try:
                value = self._fernet.decrypt(token).decode()
            except InvalidToken:
                raise ConfigError(f"secret {name!r} cannot be decrypted with this master key",
                                  fix="start Keel with the master key the secret was stored with") from None
            self._reseal(name, token)
        redactor.add(value)
        return value

    def _reseal(self, name: str, token: bytes) -> None:
        """Seal `name` under the current key, unless its value changed meanwhile (then it already is)."""
        with self._store.engine.begin() as conn:
            conn.execute(secrets.update().where(secrets.c.name == name, secrets.c.ciphertext == token)
                         .values(ciphertext=self._fernet.rotate(token)))

    def get(self, name: str) -> str:
        """A deployment's credential: a global secret that serves `provider` (NotFound if there is none)."""
        with self._store.engine.connect() as conn:
            row = conn.execute(sa.select(secrets).where(secrets.c.name == name)).first()
        if row is None:
            raise NotFound(f"secret {name!r} is not in the vault", fix=f"store it: keel secrets set {name}",
                           secret=name)
        if row.team_id is not None or "provider" not in row.uses:
            raise denied(name, None, "provider")
        return self._decrypt(name, row.ciphertext)

    def allowed(self, conn: sa.Connection, name: str, team_id: str | None, use: str) -> Any:
        """The secret's row if `team_id` (None: a global workflow) may use it for `use`, else None."""
        row = conn.execute(sa.select(secrets).where(secrets.c.name == name)).first()
        if row is None or use not in row.uses:
            return None
        if row.team_id == team_id:
            return row
        if team_id is None:
            return None
        grant = conn.execute(sa.select(secret_grants.c.secret).where(
            secret_grants.c.secret == name, secret_grants.c.team_id == team_id, secret_grants.c.use == use)).first()
        return row if grant is not None else None

    def check(self, name: str, team_id: str | None, use: str, **ids: str) -> None:
        """Raise SecretNotAllowed unless `team_id` may use secret `name` for `use` (the value stays sealed)."""
        with self._store.read() as conn:
            if self.allowed(conn, name, team_id, use) is None:
                raise denied(name, team_id, use, **ids)

    def resolve(self, name: str, team_id: str | None, use: str) -> str:
        """The value, for a workflow owned by `team_id` (None: global) that uses it for `use`."""
        with self._store.read() as conn:
            row = self.allowed(conn, name, team_id, use)
        if row is None:
            raise denied(name, team_id, use)
        return self._decrypt(name, row.ciphertext)

    def names(self, team_id: str | None = None, *, scoped: bool = False) -> list[dict[str, Any]]:
        """Every secret with owner, uses and grants (admins); `scoped`: those `team_id` owns or was granted,
        with the uses it may put them to."""
        with self._store.read() as conn:
            rows = conn.execute(sa.select(secrets.c.name, secrets.c.team_id, secrets.c.uses, secrets.c.created_at,
                                          secrets.c.updated_at).order_by(secrets.c.name)).all()
            grants = conn.execute(sa.select(secret_grants).order_by(secret_grants.c.team_id,
                                                                    secret_grants.c.use)).all()
        by_secret: dict[str, list[dict[str, str]]] = {}
        for g in grants:
            by_secret.setdefault(g.secret, []).append({"team_id": g.team_id, "use": g.use})
        out = []
        for r in rows:
            item = {"name": r.name, "team_id": r.team_id, "uses": list(r.uses),
                    "created_at": r.created_at.isoformat(), "updated_at": r.updated_at.isoformat()}
            mine = [g["use"] for g in by_secret.get(r.name, []) if g["team_id"] == team_id and g["use"] in r.uses]
            if not scoped:
                out.append({**item, "grants": by_secret.get(r.name, [])})
            elif r.team_id == team_id:
                out.append({**item, "owned": True})
            elif mine:
                out.append({**item, "uses": mine, "owned": False})
        return out

    def delete(self, name: str, team_id: str | None = None, *, scoped: bool = False) -> None:
        """Delete a secret and its grants; `scoped`: only if `team_id` owns it (else it is not found)."""
        q = secrets.delete().where(secrets.c.name == name)
        if scoped:
            q = q.where(secrets.c.team_id == team_id if team_id is not None else secrets.c.team_id.is_(None))
        with self._store.engine.begin() as conn:
            if not conn.execute(q).rowcount:
                raise NotFound(f"secret {name!r} is not in the vault", secret=name)
            conn.execute(secret_grants.delete().where(secret_grants.c.secret == name))

    def grant(self, name: str, team_id: str, use: str, by: str) -> bool:
        """Let team `team_id` use secret `name` for `use` (one of the secret's own uses); True if new."""
        if use not in USES:
            raise BadRequest(f"unknown secret use {use!r}", fix=f"use one of: {', '.join(USES)}")
        with self._store.engine.begin() as conn:
            row = conn.execute(sa.select(secrets.c.team_id, secrets.c.uses).where(secrets.c.name == name)).first()
            if row is None:
                raise NotFound(f"secret {name!r} is not in the vault", fix=f"store it: keel secrets set {name}",
                               secret=name)
            if use not in row.uses or use == "provider":
                raise SecretUseNotAllowed(
                    f"secret {name!r} serves {', '.join(row.uses)}, not {use}",
                    fix=(f"an admin adds the use first: keel secrets set {name} --use {use} (a provider credential "
                         "should not be sent in headers: store a separate secret)") if use != "provider" else
                    "deployments use global secrets directly; grants are for workflow uses",
                    secret=name, use=use)
            found = conn.execute(sa.select(secret_grants.c.secret).where(
                secret_grants.c.secret == name, secret_grants.c.team_id == team_id,
                secret_grants.c.use == use)).first()
            if found is None:
                conn.execute(secret_grants.insert().values(secret=name, team_id=team_id, use=use,
                                                           granted_by=by[:100], created_at=utcnow()))
        return found is None

    def revoke(self, name: str, team_id: str, use: str) -> None:
        with self._store.engine.begin() as conn:
            gone = conn.execute(secret_grants.delete().where(
                secret_grants.c.secret == name, secret_grants.c.team_id == team_id,
                secret_grants.c.use == use)).rowcount
        if not gone:
            raise NotFound(f"secret {name!r} is not granted to team {team_id} for {use}",
                           fix="list grants with `keel secrets list`", secret=name)

    def prime_redactor(self) -> None:
        """Teach the log scrubber every stored value, so none can leak even by accident (at start: reading each
        also reseals any value an earlier version sealed with the legacy passphrase key)."""
        with self._store.engine.connect() as conn:
            rows = conn.execute(sa.select(secrets.c.name, secrets.c.ciphertext)).all()
        for r in rows:
            try:
                self._decrypt(r.name, r.ciphertext)
            except ConfigError:
                continue
