"""Who may read or write a collection and its documents, and the SQL predicate that enforces it
inside every retrieval query.

A collection is readable by its owner team, by the teams and roles on its ACL (read or write),
and by admins; writable by its owner team's and write-ACL members whose role grants
`collections.write`. A key's `collections` scope narrows both. A restricted document narrows
reading further to its own teams/roles. Anything a caller may not read behaves exactly as if it
did not exist: same 404, no counts, no scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from keel.core.errors import BadRequest, ValidationFailed
from keel.identity.principal import Principal
from keel.knowledge.tables import document_acl, documents

FILTER_FIELDS = {"document_id": documents.c.id, "source": documents.c.source, "format": documents.c.format,
                 "title": documents.c.title, "origin": documents.c.origin}


@dataclass(frozen=True)
class Collection:
    id: str
    name: str
    classification: str
    owner_team_id: str | None
    embedding_model: str
    dims: int | None
    description: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    acl: tuple[tuple[str, str, str], ...] = ()  # (access, kind, value)
    created_at: datetime | None = None

    def acl_dict(self) -> dict[str, dict[str, list[str]]]:
        out: dict[str, dict[str, list[str]]] = {"read": {"teams": [], "roles": []}, "write": {"teams": [], "roles": []}}
        for access, kind, value in sorted(self.acl):
            out[access]["teams" if kind == "team" else "roles"].append(value)
        return out


ACL_FIX = 'e.g. {"teams": ["red"], "roles": ["member"]}: team names or ids and role names, as strings'


def acl_names(part: Any, where: str) -> dict[str, list[str]]:
    """An ACL part `{"teams": [...], "roles": [...]}` checked to hold only names; a mistake names its field
    (`where`, e.g. `acl.read`). None means no entries."""
    if part is None:
        return {"teams": [], "roles": []}
    if not isinstance(part, dict):
        raise ValidationFailed(f"{where} must be an object with `teams` and/or `roles`", fix=ACL_FIX)
    for key in part:
        if key not in ("teams", "roles"):
            raise ValidationFailed(f"{where}.{str(key)[:100]}: unknown ACL key", fix=ACL_FIX)
    out: dict[str, list[str]] = {}
    for key in ("teams", "roles"):
        values = part.get(key)
        if values is None:
            values = []
        if not isinstance(values, list):
            raise ValidationFailed(f"{where}.{key} must be a list of names, not {type(values).__name__}", fix=ACL_FIX)
        for i, value in enumerate(values):
            if not isinstance(value, str) or not value:
                raise ValidationFailed(f"{where}.{key}.{i} must be a non-empty name, not {type(value).__name__}",
                                       fix=ACL_FIX)
        out[key] = values
    return out


def _matches(p: Principal, kind: str, value: str) -> bool:
    if kind == "team":
        return p.team_id is not None and value == p.team_id
    return value in (p.role, "*")


def in_key_scope(p: Principal, c: Collection) -> bool:
    return p.may_use_collection(c.name) or p.may_use_collection(c.id)


def can_read(p: Principal, c: Collection) -> bool:
    if not in_key_scope(p, c):
        return False
    if p.is_admin:
        return True
    if not p.has("collections.read") and not p.has("collections.write"):
        return False
    if p.team_id is not None and p.team_id == c.owner_team_id:
        return True
    return any(_matches(p, kind, value) for _access, kind, value in c.acl)


def can_write(p: Principal, c: Collection) -> bool:
    if not can_read(p, c):
        return False
    if p.is_admin:
        return True
    if not p.has("collections.write"):
        return False
    if p.team_id is not None and p.team_id == c.owner_team_id:
        return True
    return any(access == "write" and _matches(p, kind, value) for access, kind, value in c.acl)


def document_readable(p: Principal) -> sa.ColumnElement[bool]:
    """True for rows of `documents` the principal may read, given it may read their collection."""
    if p.is_admin:
        return sa.true()
    who = [sa.and_(document_acl.c.kind == "role", document_acl.c.value.in_([p.role, "*"]))]
    if p.team_id is not None:
        who.append(sa.and_(document_acl.c.kind == "team", document_acl.c.value == p.team_id))
    allowed = sa.exists(sa.select(sa.literal(1)).select_from(document_acl)
                        .where(document_acl.c.document_id == documents.c.id, sa.or_(*who)))
    return sa.or_(documents.c.restricted == sa.false(), allowed)


def filter_conditions(filters: dict[str, Any] | None) -> list[sa.ColumnElement[bool]]:
    """Metadata filters: `document_id`, `source` (`*` globs), `format`, `title`, `origin`, or any
    other key compared with the document's `metadata` value (as text). A list value means any of."""
    out: list[sa.ColumnElement[bool]] = []
    for key, value in (filters or {}).items():
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, (str, int, float, bool)) for v in values):
            raise BadRequest(f"filter {key!r} must be a string, number, or a non-empty list of them",
                             fix='e.g. "filters": {"format": ["pdf", "md"], "source": "faq/*"}', filter=key)
        if key in FILTER_FIELDS:
            col = FILTER_FIELDS[key]
            ors = []
            for v in values:
                v = str(v)
                if key == "source" and any(ch in v for ch in "*?"):
                    esc = v.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
                    ors.append(col.like(esc.replace("*", "%").replace("?", "_"), escape="\\"))
                else:
                    ors.append(col == v)
            out.append(sa.or_(*ors))
        else:
            name = key[5:] if key.startswith("meta.") else key
            field_ = sa.cast(documents.c.meta[name].as_string(), sa.String)
            out.append(field_.in_([str(v).lower() if isinstance(v, bool) else str(v) for v in values]))
    return out


@dataclass(frozen=True)
class Scope:
    """Where one query may look: these (readable) collections, documents the principal may read,
    narrowed by the request's filters. Every index applies `documents_where()` inside its query."""

    principal: Principal
    collections: tuple[Collection, ...]
    filters: dict[str, Any] | None = None
    # hybrid search: the keyword leg may trade exhaustiveness for latency, the vector leg backs it up
    bounded_keyword: bool = False

    @property
    def collection_ids(self) -> list[str]:
        return [c.id for c in self.collections]

    @property
    def narrowed(self) -> bool:
        """True when some documents of these collections may be excluded (document ACLs or filters)."""
        return bool(self.filters) or not self.principal.is_admin

    def documents_where(self) -> sa.ColumnElement[bool]:
        return sa.and_(documents.c.collection_id.in_(self.collection_ids), document_readable(self.principal),
                       *filter_conditions(self.filters))
