"""The collection catalog: create, resolve (by name or id, as the caller may see them), change ACL, delete.

A collection the caller may not read is reported exactly like one that does not exist.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa

from keel.core.clock import utcnow
from keel.core.db import Store
from keel.core.errors import BadRequest, Conflict, Forbidden, NotFound, ValidationFailed
from keel.core.ids import new_id
from keel.identity import service as identity
from keel.identity.principal import ROLES, Principal
from keel.knowledge.acl import Collection, acl_names, can_read, can_write, document_readable
from keel.knowledge.index import ChunkIndex, reading, transaction
from keel.knowledge.tables import collection_acl, collections, documents, iso

CLASSIFICATIONS = identity.CLASSIFICATIONS
DEFAULT_EMBEDDING = "local-embed"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def not_found(ref: str) -> NotFound:
    """The one error for a collection that does not exist *or* that the caller may not read."""
    return NotFound(f"collection {ref!r} does not exist",
                    fix="list the collections you can read with GET /v1/collections (`keel collections list`)",
                    collection=ref)


def load(conn: sa.Connection, where: sa.ColumnElement[bool] | None = None) -> list[Collection]:
    q = sa.select(collections).order_by(collections.c.name)
    if where is not None:
        q = q.where(where)
    rows = conn.execute(q).all()
    if not rows:
        return []
    acl: dict[str, list[tuple[str, str, str]]] = {}
    for r in conn.execute(sa.select(collection_acl).where(collection_acl.c.collection_id.in_([r.id for r in rows]))):
        acl.setdefault(r.collection_id, []).append((r.access, r.kind, r.value))
    return [Collection(id=r.id, name=r.name, classification=r.classification, owner_team_id=r.owner_team_id,
                       embedding_model=r.embedding_model, dims=r.dims, description=r.description, meta=r.meta or {},
                       acl=tuple(acl.get(r.id, ())), created_at=r.created_at) for r in rows]


def all_collections(store: Store) -> list[Collection]:
    with reading(store) as conn:
        return load(conn)


def readable(store: Store, p: Principal, refs: Iterable[str] | None = None) -> list[Collection]:
    """The collections named by `refs` (names or ids), or all the caller may read when `refs` is None.
    Any named one that is missing or unreadable raises the same `NotFound`."""
    with reading(store) as conn:
        if refs is None:
            return [c for c in load(conn) if can_read(p, c)]
        refs = list(dict.fromkeys(refs))
        found = load(conn, sa.or_(collections.c.id.in_(refs), collections.c.name.in_(refs)))
    out = []
    for ref in refs:
        c = next((c for c in found if ref in (c.id, c.name)), None)
        if c is None or not can_read(p, c):
            raise not_found(ref)
        if c not in out:
            out.append(c)
    return out


def get_readable(store: Store, p: Principal, ref: str) -> Collection:
    return readable(store, p, [ref])[0]


def get_writable(store: Store, p: Principal, ref: str) -> Collection:
    c = get_readable(store, p, ref)
    if not can_write(p, c):
        raise Forbidden(f"key {p.key_id} may read but not write collection {c.name!r}",
                        fix="ask its owner team to add your team or role to the collection's write ACL",
                        collection=c.name, key_id=p.key_id)
    return c


METADATA_DEPTH = 16  # nesting well past any real use, well under what an answer can carry


def check_metadata(meta: Any, where: str = "metadata") -> dict[str, Any]:
    """Metadata is a JSON object of at most METADATA_DEPTH levels; anything else names its field."""
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise ValidationFailed(f"{where} must be a JSON object", fix='e.g. "metadata": {"owner": "ops"}')
    level, stack = 0, [meta]
    while stack:
        level += 1
        if level > METADATA_DEPTH:
            raise ValidationFailed(f"{where} is nested more than {METADATA_DEPTH} levels deep",
                                   fix="flatten it: filters compare top-level values")
        stack = [v for item in stack for v in (item.values() if isinstance(item, dict) else item)
                 if isinstance(v, (dict, list))]
    return meta


def resolve_team(store: Store, ref: str) -> str:
    try:
        return identity.get_team(store, ref)["id"]
    except NotFound:
        raise BadRequest(f"team {ref!r} does not exist", fix="name an existing team (`keel teams list`)",
                         team=ref) from None


def _acl_rows(store: Store, acl: dict[str, Any] | None) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    acl = acl or {}
    if not isinstance(acl, dict) or not set(acl) <= {"read", "write"}:
        raise ValidationFailed("acl must be an object with `read` and/or `write` parts",
                               fix='e.g. {"read": {"teams": ["red"]}, "write": {"roles": ["builder"]}}')
    for access in ("read", "write"):
        part = acl_names(acl.get(access), f"acl.{access}")
        for team in part["teams"]:
            rows.append((access, "team", resolve_team(store, team)))
        for role in part["roles"]:
            if role not in ROLES and role != "*":
                raise BadRequest(f"unknown role {role!r} in the {access} ACL", fix=f"use one of: {', '.join(ROLES)}, *")
            rows.append((access, "role", role))
    return sorted(set(rows))


def create(store: Store, index: ChunkIndex, p: Principal, *, name: str, classification: str,
           description: str = "", owner_team: str | None = None, acl: dict[str, Any] | None = None,
           embedding_model: str = DEFAULT_EMBEDDING, meta: dict[str, Any] | None = None) -> Collection:
    p.require("collections.write")
    if not _NAME.match(name):
        raise BadRequest(f"collection name {name!r} is not allowed",
                         fix="use letters, digits, '.', '_' or '-', starting with a letter or digit")
    if classification not in CLASSIFICATIONS:
        raise BadRequest(f"unknown classification {classification!r}", fix=f"use one of: {', '.join(CLASSIFICATIONS)}")
    if owner_team is not None:
        owner_id = resolve_team(store, owner_team)
        if not p.is_admin and owner_id != p.team_id:
            raise Forbidden("only admins may create a collection for another team",
                            fix="leave owner_team out to use your key's team", key_id=p.key_id)
    else:
        owner_id = p.team_id
        if owner_id is None and not p.is_admin:
            raise BadRequest("this key has no team, so the collection would have no owner",
                             fix="use a key that belongs to a team")
    meta = check_metadata(meta)
    rows = _acl_rows(store, acl)
    now = utcnow()
    c = Collection(id=new_id("col"), name=name, classification=classification, owner_team_id=owner_id,
                   embedding_model=embedding_model, dims=None, description=description, meta=meta or {},
                   acl=tuple(rows), created_at=now)
    with transaction(store) as tx:
        if tx.conn.execute(sa.select(collections.c.id).where(collections.c.name == name)).first():
            raise Conflict(f"a collection named {name!r} already exists", fix="pick another name", collection=name)
        tx.conn.execute(collections.insert().values(
            id=c.id, name=name, description=description, classification=classification, owner_team_id=owner_id,
            embedding_model=embedding_model, dims=None, meta=meta or {}, created_by=p.key_id, created_at=now,
            updated_at=now))
        if rows:
            tx.conn.execute(collection_acl.insert(), [{"collection_id": c.id, "access": a, "kind": k, "value": v}
                                                      for a, k, v in rows])
        index.create_collection(tx, c)
    return c


def update(store: Store, p: Principal, ref: str, *, acl: dict[str, Any] | None = None,
           classification: str | None = None, description: str | None = None) -> Collection:
    c = get_writable(store, p, ref)
    if not (p.is_admin or (p.team_id is not None and p.team_id == c.owner_team_id)):
        raise Forbidden(f"only the owner team or an admin may change collection {c.name!r}",
                        fix="ask the owner team or an admin", collection=c.name)
    values: dict[str, Any] = {"updated_at": utcnow()}
    if classification is not None:
        if classification not in CLASSIFICATIONS:
            raise BadRequest(f"unknown classification {classification!r}",
                             fix=f"use one of: {', '.join(CLASSIFICATIONS)}")
        values["classification"] = classification
    if description is not None:
        values["description"] = description
    rows = _acl_rows(store, acl) if acl is not None else None
    with transaction(store) as tx:
        tx.conn.execute(collections.update().where(collections.c.id == c.id).values(**values))
        if rows is not None:
            tx.conn.execute(collection_acl.delete().where(collection_acl.c.collection_id == c.id))
            if rows:
                tx.conn.execute(collection_acl.insert(), [{"collection_id": c.id, "access": a, "kind": k, "value": v}
                                                          for a, k, v in rows])
    with reading(store) as conn:
        return load(conn, collections.c.id == c.id)[0]


def delete(store: Store, index: ChunkIndex, p: Principal, ref: str) -> None:
    c = get_writable(store, p, ref)
    if not (p.is_admin or (p.team_id is not None and p.team_id == c.owner_team_id)):
        raise Forbidden(f"only the owner team or an admin may delete collection {c.name!r}",
                        fix="ask the owner team or an admin", collection=c.name)
    with transaction(store) as tx:
        index.drop_collection(tx, c)
        tx.conn.execute(documents.delete().where(documents.c.collection_id == c.id))
        tx.conn.execute(collections.delete().where(collections.c.id == c.id))


def set_dims(store: Store, c: Collection, dims: int) -> Collection:
    """Record the embedding width on first ingest; a later mismatch is the caller's config error."""
    if c.dims == dims:
        return c
    if c.dims is not None:
        raise BadRequest(f"collection {c.name!r} holds {c.dims}-dimensional vectors but model "
                         f"{c.embedding_model!r} returned {dims}", fix="re-create the collection for the new model",
                         collection=c.name)
    with store.engine.begin() as conn:
        conn.execute(collections.update().where(collections.c.id == c.id, collections.c.dims.is_(None))
                     .values(dims=dims))
    return Collection(**{**c.__dict__, "dims": dims})


def visible_counts(store: Store, p: Principal, c: Collection) -> tuple[int, int]:
    """(documents, chunks) of `c` the caller may read — never counting what it may not."""
    with reading(store) as conn:
        docs = conn.execute(sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(documents.c.chunk_count), 0))
                            .where(documents.c.collection_id == c.id, document_readable(p))).first()
    return int(docs[0]), int(docs[1])


def public(c: Collection, counts: tuple[int, int] | None = None, *, writable: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": c.id, "name": c.name, "description": c.description, "classification": c.classification,
        "owner_team_id": c.owner_team_id, "embedding_model": c.embedding_model, "dims": c.dims,
        "acl": c.acl_dict(), "metadata": c.meta, "created_at": iso(c.created_at),
        "writable": writable,
    }
    if counts is not None:
        out["document_count"], out["chunk_count"] = counts
    return out

