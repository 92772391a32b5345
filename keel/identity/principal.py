"""Who is calling: the principal behind an API key, its role, team and scopes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from keel.core.errors import Forbidden, KeelError

ROLES = ("admin", "builder", "member", "reviewer", "auditor")

# Permission names are `area.verb`; a role holds a set of them ("*" = all).
ROLE_PERMISSIONS: dict[str, frozenset[str]] = {
    "admin": frozenset({"*"}),
    "builder": frozenset({"models.use", "collections.read", "collections.write", "workflows.define",
                          "workflows.run", "agents.define", "agents.run", "feedback.write", "evals.run",
                          "reports.read.own", "secrets.manage"}),
    "member": frozenset({"models.use", "collections.read", "workflows.run", "agents.run", "feedback.write",
                         "reports.read.own"}),
    "reviewer": frozenset({"models.use", "collections.read", "reviews.decide", "approvals.decide",
                           "feedback.write", "reports.read.own"}),
    "auditor": frozenset({"audit.read", "reports.read", "reports.read.own", "metrics.read"}),
}


SCOPE_KINDS = ("models", "collections", "agents")
_PRINCIPAL_FIELDS = ("key_id", "role", "team_id", "user_id", "key_name", "scopes")  # Principal.to_dict's keys


class InvalidPrincipal(KeelError):
    """A stored principal (or its scopes) that does not load: the detail names the field and what it holds."""

    code, title = "invalid_principal", "Invalid stored principal"


def _invalid(field: str, wanted: str, got: Any) -> InvalidPrincipal:
    return InvalidPrincipal(f"principal field {field!r} must be {wanted}, not {got!r}"[:300],
                            fix="the row was written by another program or edited by hand: restore it from "
                                "Principal.to_dict()", field=field)


@dataclass(frozen=True)
class Scopes:
    """What a key may touch beyond its role. `None` means no narrowing; a list allows only those."""

    models: tuple[str, ...] | None = None
    collections: tuple[str, ...] | None = None
    agents: tuple[str, ...] | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "Scopes":
        """The inverse of `to_dict` (a missing kind or None: no narrowing); raises InvalidPrincipal."""
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise _invalid("scopes", "an object", d)
        for k in d:
            if k not in SCOPE_KINDS:
                raise _invalid(f"scopes.{k}", f"absent (scopes are {', '.join(SCOPE_KINDS)})", d[k])
        norm: dict[str, tuple[str, ...] | None] = {}
        for k in SCOPE_KINDS:
            v = d.get(k)
            if v is not None and (not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v)):
                raise _invalid(f"scopes.{k}", "a list of names or null", v)
            norm[k] = tuple(v) if v is not None else None
        return cls(**norm)

    def to_dict(self) -> dict[str, list[str] | None]:
        return {k: (list(v) if v is not None else None)
                for k, v in (("models", self.models), ("collections", self.collections), ("agents", self.agents))}

    @staticmethod
    def _allows(allowed: tuple[str, ...] | None, name: str) -> bool:
        return allowed is None or "*" in allowed or name in allowed


@dataclass(frozen=True)
class Principal:
    """The authenticated caller, attached to every request."""

    key_id: str
    role: str
    team_id: str | None = None
    user_id: str | None = None
    key_name: str = ""
    scopes: Scopes = field(default_factory=Scopes)

    def has(self, permission: str) -> bool:
        perms = ROLE_PERMISSIONS.get(self.role, frozenset())
        return "*" in perms or permission in perms

    def require(self, permission: str) -> None:
        """Raise 403 unless the role grants `permission`."""
        if not self.has(permission):
            raise Forbidden(f"role {self.role!r} of key {self.key_id} may not {permission}",
                            fix="use a key whose role grants it, or ask an admin", key_id=self.key_id,
                            permission=permission)

    def may_use_model(self, alias: str) -> bool:
        return self.has("models.use") and Scopes._allows(self.scopes.models, alias)

    def may_use_collection(self, name_or_id: str) -> bool:
        return Scopes._allows(self.scopes.collections, name_or_id)

    def may_use_agent(self, name: str) -> bool:
        return Scopes._allows(self.scopes.agents, name)

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe, as stored with workflow runs and ingest jobs; `from_dict` reads it back equal.

        >>> Principal.from_dict(Principal(key_id="key_1", role="member").to_dict()).role
        'member'
        """
        return {"key_id": self.key_id, "role": self.role, "team_id": self.team_id, "user_id": self.user_id,
                "key_name": self.key_name, "scopes": self.scopes.to_dict()}

    @classmethod
    def from_dict(cls, d: Any) -> "Principal":
        """The inverse of `to_dict`; rows without `key_name` or `scopes` (written before them) load too. A field
        it does not know is refused rather than dropped: it could be a restriction this version would lose."""
        if not isinstance(d, dict):
            raise _invalid("principal", "an object", d)
        for k in d:
            if k not in _PRINCIPAL_FIELDS:
                raise _invalid(k, f"absent (a principal has {', '.join(_PRINCIPAL_FIELDS)})", d[k])
        key_id, role = d.get("key_id"), d.get("role")
        if not isinstance(key_id, str) or not key_id:
            raise _invalid("key_id", "a non-empty string", key_id)
        if role not in ROLES:
            raise _invalid("role", f"one of {', '.join(ROLES)}", role)
        for k in ("team_id", "user_id"):
            if d.get(k) is not None and not isinstance(d[k], str):
                raise _invalid(k, "a string or null", d[k])
        key_name = d.get("key_name", "")
        if not isinstance(key_name, str):
            raise _invalid("key_name", "a string", key_name)
        return cls(key_id=key_id, role=role, team_id=d.get("team_id"), user_id=d.get("user_id"), key_name=key_name,
                   scopes=Scopes.from_dict(d.get("scopes")))
