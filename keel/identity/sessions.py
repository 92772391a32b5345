"""Console sign-in: users' passwords (scrypt, memory-hard) and browser sessions with idle and absolute expiry.

A session is created by signing in with an API key or with a user's email and password. The cookie holds a
random token; the store keeps only its SHA-256, who signed in (the key's id, or the user's id) and a
session-bound CSRF token. Every use re-checks the key (revoked or expired ends the session) or the user
(deleted ends it), so a session never outlives what opened it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets as pysecrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from keel.core.clock import utcnow
from keel.core.db import Store
from keel.core.errors import BadRequest, NotFound, Unauthorized
from keel.identity.principal import Principal, Scopes
from keel.identity.service import verify_key
from keel.identity.tables import api_keys, console_sessions, user_passwords, users

# scrypt with N=2^15, r=8: 32 MiB and ~0.1 s per check (OWASP's floor is N=2^17 for r=8, p=1 at 128 MiB;
# this is the cost a small server can take for each sign-in; raise SCRYPT_N and old hashes still verify).
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
MIN_PASSWORD, MAX_PASSWORD = 12, 1024
_DUMMY = None  # a hash checked for unknown emails, so their answer takes as long as a wrong password's


def _aware(dt: datetime) -> datetime:
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """`scrypt$N$r$p$salt$hash` (base64): the parameters travel with the hash."""
    salt = pysecrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=256 * 1024 * 1024, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${n}${r}${p}${b64(salt).decode()}${b64(digest).decode()}"


def check_password(password: str, stored: str) -> bool:
    """Whether `password` matches `stored` (constant-time compare); a malformed hash never matches."""
    try:
        algo, n, r, p, salt, digest = stored.split("$")
        if algo != "scrypt":
            return False
        want = base64.b64decode(digest)
        got = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                             maxmem=256 * 1024 * 1024, dklen=len(want))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, want)


def set_password(store: Store, user_ref: str, password: str) -> dict[str, Any]:
    """Set (or replace) the console password of a user given by id or email; ends the user's open sessions."""
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise BadRequest(f"a password must be {MIN_PASSWORD} to {MAX_PASSWORD} characters",
                         fix=f"choose a passphrase of at least {MIN_PASSWORD} characters")
    with store.engine.connect() as conn:
        user = conn.execute(sa.select(users).where(sa.or_(users.c.id == user_ref, users.c.email == user_ref))).first()
    if user is None:
        raise NotFound(f"user {user_ref!r} does not exist", fix="list users with `keel users list`", user=user_ref)
    hashed, now = hash_password(password), utcnow()
    with store.engine.begin() as conn:
        conn.execute(user_passwords.delete().where(user_passwords.c.user_id == user.id))
        conn.execute(user_passwords.insert().values(user_id=user.id, hash=hashed, updated_at=now))
        conn.execute(console_sessions.delete().where(console_sessions.c.user_id == user.id))
    return {"user_id": user.id, "email": user.email, "password_set_at": now.isoformat()}


def user_principal(r: Any) -> Principal:
    """A signed-in user acts under its own id (as `key_id` too: the ledger and audit name who acted)."""
    return Principal(key_id=r.id, role=r.role, team_id=r.team_id, user_id=r.id, key_name=r.email)


def check_user(store: Store, email: str, password: str) -> Principal:
    """The user behind `email` and `password`, or Unauthorized (the same answer for an unknown email)."""
    global _DUMMY
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(users, user_passwords.c.hash)
                           .select_from(users.join(user_passwords, user_passwords.c.user_id == users.c.id))
                           .where(users.c.email == email)).first()
    if row is None:
        _DUMMY = _DUMMY or hash_password("not a password of anyone's")
        check_password(password, _DUMMY)
        raise Unauthorized("email or password is not valid", fix="check both, or ask an admin to set a password")
    if not check_password(password, row.hash):
        raise Unauthorized("email or password is not valid", fix="check both, or ask an admin to set a password")
    return user_principal(row)


@dataclass(frozen=True)
class Session:
    """An open console session: who, its CSRF token, and the id (hash) it is stored under."""

    id: str
    principal: Principal
    csrf: str


def _token_id(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def open_session(store: Store, p: Principal, now: datetime | None = None) -> tuple[str, Session]:
    """A new session for `p` (a key's principal, or a user's); returns `(cookie token, session)`."""
    token, csrf, now = pysecrets.token_urlsafe(32), pysecrets.token_urlsafe(32), now or utcnow()
    by_user = p.user_id is not None and p.key_id == p.user_id
    row = {"id": _token_id(token), "key_id": None if by_user else p.key_id, "user_id": p.user_id if by_user else None,
           "csrf": csrf, "created_at": now, "last_seen_at": now}
    with store.engine.begin() as conn:
        conn.execute(console_sessions.insert().values(**row))
    return token, Session(id=row["id"], principal=p, csrf=csrf)


def resume_session(store: Store, token: str, *, idle_s: float, max_s: float, now: datetime | None = None) -> Session:
    """The session behind a cookie's token, or Unauthorized: unknown, idle or older than allowed, or what
    opened it (key, user) is gone, revoked or expired. A use moves its idle clock (at most once a minute)."""
    now = now or utcnow()
    sid = _token_id(token)
    with store.engine.connect() as conn:
        s = conn.execute(sa.select(console_sessions).where(console_sessions.c.id == sid)).first()
    if s is None:
        raise Unauthorized("console session is not valid", fix="sign in again")
    if now - _aware(s.last_seen_at) > timedelta(seconds=idle_s) or now - _aware(s.created_at) > timedelta(seconds=max_s):
        close_session(store, token)
        raise Unauthorized("console session expired", fix="sign in again")
    try:
        p = _session_principal(store, s)
    except Unauthorized:
        close_session(store, token)
        raise
    if now - _aware(s.last_seen_at) > timedelta(seconds=60):
        with store.engine.begin() as conn:
            conn.execute(console_sessions.update().where(console_sessions.c.id == sid).values(last_seen_at=now))
    return Session(id=sid, principal=p, csrf=s.csrf)


def _session_principal(store: Store, s: Any) -> Principal:
    if s.user_id is not None:
        with store.engine.connect() as conn:
            u = conn.execute(sa.select(users).where(users.c.id == s.user_id)).first()
        if u is None:
            raise Unauthorized("the session's user no longer exists", fix="sign in again")
        return user_principal(u)
    with store.engine.connect() as conn:
        k = conn.execute(sa.select(api_keys).where(api_keys.c.id == s.key_id)).first()
    if k is None:
        raise Unauthorized("the session's API key no longer exists", fix="sign in again")
    if k.revoked_at is not None:
        raise Unauthorized(f"API key {k.id} was revoked", fix="sign in with another key", key_id=k.id)
    if k.expires_at is not None and _aware(k.expires_at) <= utcnow():
        raise Unauthorized(f"API key {k.id} expired", fix="sign in with another key", key_id=k.id)
    return Principal(key_id=k.id, role=k.role, team_id=k.team_id, user_id=k.user_id, key_name=k.name,
                     scopes=Scopes.from_dict(k.scopes))


def purge_sessions(store: Store, *, idle_s: float, max_s: float, now: datetime | None = None) -> int:
    """Delete every session past its idle or absolute expiry (each sign-in does, so abandoned sessions do not
    pile up); returns how many."""
    now = now or utcnow()
    c = console_sessions.c
    with store.engine.begin() as conn:
        return conn.execute(console_sessions.delete().where(sa.or_(
            c.last_seen_at < now - timedelta(seconds=idle_s), c.created_at < now - timedelta(seconds=max_s)))).rowcount


def close_session(store: Store, token: str) -> None:
    """Sign out: the session's row is deleted (idempotent)."""
    with store.engine.begin() as conn:
        conn.execute(console_sessions.delete().where(console_sessions.c.id == _token_id(token)))


def check_key(store: Store, key: str) -> Principal:
    """The principal behind an API key pasted into the sign-in form (Unauthorized when not valid)."""
    return verify_key(store, key)
