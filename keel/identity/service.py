"""Teams, users and API keys: create, list, revoke, verify.

A key is shown once (`sk-keel-<prefix>_<secret>`); the store keeps its prefix for lookup and a
SHA-256 of the whole key (keys are 256-bit random, so a slow hash buys nothing).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets as pysecrets
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import sqlalchemy as sa

from keel.core.clock import utcnow
from keel.core.db import Store
from keel.core.errors import BadRequest, Conflict, NotFound, Unauthorized
from keel.core.ids import new_id
from keel.core.notify import publish
from keel.identity.principal import ROLES, Principal, Scopes
from keel.identity.tables import api_keys, secret_grants, secrets, teams, users

KEY_PREFIX = "sk-keel-"
CLASSIFICATIONS = ("public", "internal", "confidential", "restricted")


def _aware(dt: datetime | None) -> datetime | None:
    if dt is None:
        return None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def _iso(dt: datetime | None) -> str | None:
    dt = _aware(dt)
    return dt.isoformat() if dt else None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def split_key(key: str) -> str | None:
    """The lookup prefix of a well-formed key, else None."""
    if not key.startswith(KEY_PREFIX):
        return None
    body = key[len(KEY_PREFIX):]
    prefix, sep, secret = body.partition("_")
    if not sep or not 8 <= len(prefix) <= 24 or len(secret) < 20:
        return None
    return prefix


def check_role(role: str) -> None:
    if role not in ROLES:
        raise BadRequest(f"unknown role {role!r}", fix=f"use one of: {', '.join(ROLES)}", role=role)


# -- teams --------------------------------------------------------------------------------

def team_row(r: Any) -> dict[str, Any]:
    return {"id": r.id, "name": r.name, "classification": r.classification, "created_at": _iso(r.created_at)}


def create_team(store: Store, name: str, classification: str = "internal") -> dict[str, Any]:
    if classification not in CLASSIFICATIONS:
        raise BadRequest(f"unknown classification {classification!r}", fix=f"use one of: {', '.join(CLASSIFICATIONS)}")
    row = {"id": new_id("team"), "name": name, "classification": classification, "created_at": utcnow()}
    with store.engine.begin() as conn:
        if conn.execute(sa.select(teams.c.id).where(teams.c.name == name)).first():
            raise Conflict(f"team {name!r} already exists", fix="pick another name or use the existing team",
                           team=name)
        conn.execute(teams.insert().values(**row))
    return team_row(SimpleNamespace(**row))


def list_teams(store: Store) -> list[dict[str, Any]]:
    with store.engine.connect() as conn:
        return [team_row(r) for r in conn.execute(sa.select(teams).order_by(teams.c.name))]


def get_team(store: Store, ref: str) -> dict[str, Any]:
    """A team by id or by name."""
    with store.engine.connect() as conn:
        r = conn.execute(sa.select(teams).where(sa.or_(teams.c.id == ref, teams.c.name == ref))).first()
    if r is None:
        raise NotFound(f"team {ref!r} does not exist", fix="list teams with `keel teams list`", team=ref)
    return team_row(r)


def delete_team(store: Store, ref: str) -> None:
    team = get_team(store, ref)
    with store.engine.begin() as conn:
        in_use = conn.execute(sa.select(sa.func.count()).select_from(api_keys)
                              .where(api_keys.c.team_id == team["id"], api_keys.c.revoked_at.is_(None))).scalar()
        if in_use:
            raise Conflict(f"team {team['name']!r} still has {in_use} active keys",
                           fix="revoke its keys first", team_id=team["id"])
        owned = conn.execute(sa.select(sa.func.count()).select_from(secrets)
                             .where(secrets.c.team_id == team["id"])).scalar()
        if owned:
            raise Conflict(f"team {team['name']!r} still owns {owned} secrets",
                           fix="delete them first (keel secrets list shows them)", team_id=team["id"])
        conn.execute(secret_grants.delete().where(secret_grants.c.team_id == team["id"]))
        conn.execute(api_keys.delete().where(api_keys.c.team_id == team["id"]))
        conn.execute(users.delete().where(users.c.team_id == team["id"]))
        conn.execute(teams.delete().where(teams.c.id == team["id"]))


# -- users --------------------------------------------------------------------------------

def create_user(store: Store, email: str, role: str, team: str | None = None, name: str = "") -> dict[str, Any]:
    check_role(role)
    team_id = get_team(store, team)["id"] if team else None
    row = {"id": new_id("user"), "email": email, "name": name, "team_id": team_id, "role": role,
           "created_at": utcnow()}
    with store.engine.begin() as conn:
        if conn.execute(sa.select(users.c.id).where(users.c.email == email)).first():
            raise Conflict(f"user {email!r} already exists", user=email)
        conn.execute(users.insert().values(**row))
    return {**row, "created_at": _iso(row["created_at"])}


def user_exists(store: Store, user_id: str) -> bool:
    """Whether `user_id` is the id of a Keel user (a person with credentials of their own)."""
    with store.engine.connect() as conn:
        return conn.execute(sa.select(users.c.id).where(users.c.id == user_id)).first() is not None


def list_users(store: Store) -> list[dict[str, Any]]:
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(users).order_by(users.c.email)).all()
    return [{"id": r.id, "email": r.email, "name": r.name, "team_id": r.team_id, "role": r.role,
             "created_at": _iso(r.created_at)} for r in rows]


# -- keys ---------------------------------------------------------------------------------

def key_row(r: Any) -> dict[str, Any]:
    return {"id": r.id, "prefix": KEY_PREFIX + r.prefix, "name": r.name, "role": r.role, "team_id": r.team_id,
            "user_id": r.user_id, "scopes": r.scopes, "expires_at": _iso(r.expires_at),
            "revoked_at": _iso(r.revoked_at), "created_at": _iso(r.created_at)}


def create_key(store: Store, *, role: str, name: str = "", team: str | None = None, user: str | None = None,
               scopes: dict[str, Any] | None = None, expires_at: datetime | None = None,
               raw_key: str | None = None) -> tuple[str, dict[str, Any]]:
    """Create a key; returns `(the key itself, its public record)`. The key is never stored."""
    check_role(role)
    team_id = get_team(store, team)["id"] if team else None
    if expires_at is not None and _aware(expires_at) <= utcnow():
        raise BadRequest("expires_at is in the past", fix="give a future time, or omit it for no expiry")
    if raw_key is not None:
        if split_key(raw_key) is None:
            raise BadRequest("bootstrap key is malformed",
                             fix=f"use the form {KEY_PREFIX}<8-24 chars>_<20+ chars>, or omit it")
        key = raw_key
    else:
        key = f"{KEY_PREFIX}{pysecrets.token_hex(6)}_{pysecrets.token_urlsafe(32)}"
    prefix = split_key(key)
    row = {"id": new_id("key"), "prefix": prefix, "key_hash": hash_key(key), "name": name, "role": role,
           "team_id": team_id, "user_id": user, "scopes": Scopes.from_dict(scopes).to_dict(),
           "expires_at": expires_at, "revoked_at": None, "created_at": utcnow()}
    with store.engine.begin() as conn:
        conn.execute(api_keys.insert().values(**row))
    return key, key_row(SimpleNamespace(**row))


def list_keys(store: Store, team_id: str | None = None) -> list[dict[str, Any]]:
    q = sa.select(api_keys).order_by(api_keys.c.created_at)
    if team_id:
        q = q.where(api_keys.c.team_id == team_id)
    with store.engine.connect() as conn:
        return [key_row(r) for r in conn.execute(q)]


def revoke_key(store: Store, key_id: str) -> dict[str, Any]:
    """Revoke by id or by visible prefix; idempotent."""
    ref = key_id[len(KEY_PREFIX):] if key_id.startswith(KEY_PREFIX) else key_id
    with store.engine.begin() as conn:
        r = conn.execute(sa.select(api_keys).where(sa.or_(api_keys.c.id == ref, api_keys.c.prefix == ref))).first()
        if r is None:
            raise NotFound(f"API key {key_id!r} does not exist", fix="list keys with `keel keys list`", key_id=key_id)
        if r.revoked_at is None:
            conn.execute(api_keys.update().where(api_keys.c.id == r.id).values(revoked_at=utcnow()))
        r = conn.execute(sa.select(api_keys).where(api_keys.c.id == r.id)).first()
    publish(store, "keys")  # every replica drops the keys it trusted, this one refused from now on
    return key_row(r)


def count_keys(store: Store) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(api_keys)).scalar() or 0)


def verify_key(store: Store, key: str) -> Principal:
    """The principal behind `key`, or `Unauthorized` (unknown, malformed, expired, revoked)."""
    result = verify_keys(store, [key])[key]
    if isinstance(result, Unauthorized):
        raise result
    return result


def verify_keys(store: Store, keys: list[str]) -> dict[str, Principal | Unauthorized]:
    """`verify_key` for many keys in one query a few hundred at a time: each key's principal, or the
    `Unauthorized` it would raise."""
    out: dict[str, Principal | Unauthorized] = {}
    by_prefix: dict[str, list[str]] = {}
    for key in keys:
        prefix = split_key(key)
        if prefix is None:
            out[key] = Unauthorized("API key is malformed", fix=f"send `Authorization: Bearer {KEY_PREFIX}…`")
        else:
            by_prefix.setdefault(prefix, []).append(key)
    if not by_prefix:
        return out  # malformed keys only: no store round trip
    prefixes = list(by_prefix)
    rows: dict[str, Any] = {}
    with store.read() as conn:
        for i in range(0, len(prefixes), 500):
            q = sa.select(api_keys).where(api_keys.c.prefix.in_(prefixes[i:i + 500]))
            rows.update((r.prefix, r) for r in conn.execute(q))
    for prefix, same in by_prefix.items():
        for key in same:
            try:
                out[key] = _principal(rows.get(prefix), key)
            except Unauthorized as exc:
                out[key] = exc
    return out


def _principal(r: Any, key: str) -> Principal:
    if r is None or not hmac.compare_digest(r.key_hash, hash_key(key)):
        raise Unauthorized("API key is not valid", fix="check the key, or ask an admin for a new one")
    if r.revoked_at is not None:
        raise Unauthorized(f"API key {r.id} was revoked", fix="ask an admin for a new key", key_id=r.id)
    if r.expires_at is not None and _aware(r.expires_at) <= utcnow():
        raise Unauthorized(f"API key {r.id} expired at {_iso(r.expires_at)}", fix="ask an admin for a new key",
                           key_id=r.id)
    return Principal(key_id=r.id, role=r.role, team_id=r.team_id, user_id=r.user_id, key_name=r.name,
                     scopes=Scopes.from_dict(r.scopes))


def bootstrap(store: Store, raw_key: str | None = None) -> str | None:
    """On first start (no keys at all) create the admin key and return it; otherwise None."""
    if count_keys(store):
        return None
    key, _ = create_key(store, role="admin", name="bootstrap admin", raw_key=raw_key)
    return key
