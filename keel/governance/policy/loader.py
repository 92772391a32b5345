"""Where the policy comes from: a file, re-read when it changes, or the API (`PUT /admin/policy`); every version
kept in the store.

A file that fails validation at start stops the server (before the port is bound); one that fails
later is rejected with an error log and an audit event, and the last good version stays active.

Several processes on one store hold one policy: each activation (a new file text, or one set through the API) is
an audit event (`policy.change`, or `policy.activate` for a version already stored) and is published on the change
feed; every process then takes the latest activation from the audit trail. The latest change wins: at start a
process takes its file's text when that text is new, and otherwise the latest activation made through the API.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable

import sqlalchemy as sa

from keel.core.clock import utcnow
from keel.core.db import Store
from keel.core.errors import ConfigError, NotFound
from keel.core.notify import publish
from keel.governance.policy.engine import PolicyEngine
from keel.governance.policy.model import DEFAULT_POLICY, PolicyInvalid, parse_policy
from keel.governance.tables import audit_events, policy_versions

log = logging.getLogger("keel.policy")
TOPIC = "policy"  # published on the change feed after each activation
API_SOURCE = "api"  # the source of a policy set through `PUT /admin/policy`
ACTIVATIONS = ("policy.change", "policy.activate")


def store_version(store: Store, text: str, name: str, source: str) -> tuple[int, bool]:
    """The version number of this exact policy text, inserting it if new; `(version, created)`."""
    digest = hashlib.sha256(text.encode()).hexdigest()
    for _ in range(3):
        with store.engine.begin() as conn:
            found = conn.execute(sa.select(policy_versions.c.version).where(policy_versions.c.sha256 == digest)).first()
            if found:
                return int(found.version), False
            top = conn.execute(sa.select(sa.func.max(policy_versions.c.version))).scalar() or 0
            try:
                with conn.begin_nested():
                    conn.execute(policy_versions.insert().values(version=top + 1, sha256=digest, name=name,
                                                                 source=source[:1000], content=text,
                                                                 created_at=utcnow()))
                return top + 1, True
            except sa.exc.IntegrityError:  # another replica stored it (or took the number) first
                continue
    raise ConfigError("could not record the policy version", fix="retry; check the database")


def list_versions(store: Store) -> list[dict[str, Any]]:
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(policy_versions.c.version, policy_versions.c.sha256, policy_versions.c.name,
                                      policy_versions.c.source, policy_versions.c.created_at)
                            .order_by(policy_versions.c.version.desc())).all()
    return [{"version": r.version, "sha256": r.sha256, "name": r.name, "source": r.source,
             "created_at": r.created_at.isoformat() if r.created_at else None} for r in rows]


def get_version(store: Store, version: int) -> dict[str, Any]:
    with store.engine.connect() as conn:
        r = conn.execute(sa.select(policy_versions).where(policy_versions.c.version == version)).first()
    if r is None:
        raise NotFound(f"policy version {version} does not exist", fix="list versions at /admin/policy/versions",
                       policy_version=version)
    return {"version": r.version, "sha256": r.sha256, "name": r.name, "source": r.source, "content": r.content}


def latest_activation(store: Store) -> tuple[int, str] | None:
    """`(version, source)` of the latest policy activation in the audit trail, if any was recorded."""
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(audit_events.c.details).where(audit_events.c.action.in_(ACTIVATIONS))
                           .order_by(audit_events.c.seq.desc()).limit(1)).first()
    if row is None:
        return None
    details = json.loads(row.details)
    return int(details["policy_version"]), str(details.get("source") or "")


class PolicySource:
    """Holds the active `PolicyEngine`; `poll()` swaps in a new one when the file changed and is valid."""

    def __init__(self, store: Store, path: Path | None, audit: Callable[..., Any] | None = None) -> None:
        self.store = store
        self.path = Path(path) if path else None
        self.audit = audit
        self._stamp: tuple[float, int] | None = None
        self._sha: str | None = None
        self._created = False
        self.engine = self._load_initial()

    @property
    def source(self) -> str:
        return str(self.path.resolve()) if self.path else "built-in default"

    def _read(self) -> str:
        assert self.path is not None
        try:
            return self.path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"policy file {self.path} cannot be read: {exc.strerror}",
                              fix="set KEEL_POLICY_FILE to a readable file") from None

    def _activate(self, text: str, *, initial: bool = False) -> PolicyEngine:
        policy = parse_policy(text, self.path.name if self.path else "default policy")
        version, created = store_version(self.store, text, policy.name, self.source)
        self._sha = hashlib.sha256(text.encode()).hexdigest()
        self._created = created
        if self.audit is not None and (created or not initial):  # a file back to an older text activates it
            self.audit(action="policy.change" if created else "policy.activate", actor="system",
                       policy_version=version, policy_name=policy.name, source=self.source, sha256=self._sha)
        log.info("policy active", extra={"policy_version": version, "policy_name": policy.name,
                                         "source": self.source})
        return PolicyEngine(policy, version)

    def _load_initial(self) -> PolicyEngine:
        if self.path is None:
            return self._adopt_api(self._activate(DEFAULT_POLICY, initial=True))
        if not self.path.is_file():
            raise ConfigError(f"policy file {self.path} does not exist",
                              fix="create it (see `keel policy check`), or unset KEEL_POLICY_FILE")
        self._stamp = self._file_stamp()
        try:
            return self._adopt_api(self._activate(self._read(), initial=True))
        except PolicyInvalid as exc:
            raise ConfigError(exc.detail, fix=exc.fix) from None

    def _adopt_api(self, engine: PolicyEngine) -> PolicyEngine:
        """At start: a file text already stored yields to a later policy set through the API."""
        latest = latest_activation(self.store)
        if self._created or latest is None or latest[1] != API_SOURCE or latest[0] == engine.version:
            return engine
        try:
            return self._stored(latest[0])
        except PolicyInvalid as exc:  # stored by another version of Keel and no longer valid: keep the file's
            log.error("the policy set through the API no longer validates; the file's stays active",
                      extra={"policy_version": latest[0], "errors": exc.ids.get("errors")})
            return engine

    def _stored(self, version: int) -> PolicyEngine:
        text = get_version(self.store, version)["content"]
        engine = PolicyEngine(parse_policy(text, f"policy version {version}"), version)
        self._sha = hashlib.sha256(text.encode()).hexdigest()
        log.info("policy active", extra={"policy_version": version, "policy_name": engine.policy.name,
                                         "source": "store"})
        return engine

    def set(self, text: str, actor: str) -> PolicyEngine:
        """Activate `text` (validated first; 400 `policy_invalid`) here, then on every process of the store."""
        policy = parse_policy(text, "request body")
        version, created = store_version(self.store, text, policy.name, API_SOURCE)
        sha = hashlib.sha256(text.encode()).hexdigest()
        if self.audit is not None:
            self.audit(action="policy.change" if created else "policy.activate", actor=actor,
                       policy_version=version, policy_name=policy.name, source=API_SOURCE, sha256=sha)
        self.engine, self._sha = PolicyEngine(policy, version), sha
        log.info("policy active", extra={"policy_version": version, "policy_name": policy.name,
                                         "source": API_SOURCE})
        publish(self.store, TOPIC)
        return self.engine

    def refresh(self) -> None:
        """The change feed's handler: take the latest activation any process recorded."""
        latest = latest_activation(self.store)
        if latest is not None and latest[0] != self.engine.version:
            self.engine = self._stored(latest[0])

    def _file_stamp(self) -> tuple[float, int] | None:
        try:
            st = self.path.stat() if self.path else None
        except OSError:
            return None
        return (st.st_mtime, st.st_size) if st else None

    def poll(self) -> bool:
        """Re-read the file if its mtime or size changed; True when a new policy became active."""
        if self.path is None:
            return False
        stamp = self._file_stamp()
        if stamp is None or stamp == self._stamp:
            return False
        self._stamp = stamp
        text = self._read()
        if hashlib.sha256(text.encode()).hexdigest() == self._sha:
            return False
        try:
            self.engine = self._activate(text)
            publish(self.store, TOPIC)
        except PolicyInvalid as exc:
            log.error("policy file rejected; the previous version stays active",
                      extra={"source": self.source, "errors": exc.ids.get("errors"),
                             "policy_version": self.engine.version})
            if self.audit is not None:
                self.audit(action="policy.rejected", actor="system", source=self.source,
                           active_version=self.engine.version, errors=exc.ids.get("errors"))
            return False
        return True

    async def watch(self, interval_s: float) -> None:
        """Poll until cancelled; a bad file or a store hiccup is logged, never fatal."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await asyncio.to_thread(self.poll)
            except (ConfigError, sa.exc.SQLAlchemyError):
                log.exception("policy reload failed; the previous version stays active")
