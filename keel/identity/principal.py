"""Who is calling: the principal behind an API key, its role, team and scopes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from keel.core.errors import Forbidden

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
    "auditor": frozenset({"audit.read", "reports.read", "reports.read.own"}),
}


@dataclass(frozen=True)
class Scopes:
    """What a key may touch beyond its role. `None` means no narrowing; a list allows only those."""

    models: tuple[str, ...] | None = None
    collections: tuple[str, ...] | None = None
    agents: tuple[str, ...] | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "Scopes":
        d = d or {}
        norm = {k: (tuple(d[k]) if d.get(k) is not None else None) for k in ("models", "collections", "agents")}
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
