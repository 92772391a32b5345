"""Documents: prepare (hash, parse, chunk), commit atomically (new / changed / unchanged), list, delete, sync.

A document is identified by (collection, source). Its content hash decides what a new upload
means: no document yet → new; another hash → changed, and its chunks are replaced in the same
transaction that records the new hash; the same hash → unchanged, nothing re-embedded.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import sqlalchemy as sa

from keel.core.clock import utcnow
from keel.core.db import Store
from keel.core.errors import BadRequest, KeelError, NotFound
from keel.core.ids import new_id
from keel.identity.principal import ROLES, Principal
from keel.knowledge import catalog
from keel.knowledge.acl import Collection, acl_names, can_read, document_readable
from keel.knowledge.chunking import Chunk, Measure, chunk
from keel.knowledge.errors import FileRejected
from keel.knowledge.index import ChunkIn, ChunkIndex, reading, transaction
from keel.knowledge.parsers import Parsed, parse
from keel.knowledge.tables import chunks, collections, document_acl, documents, iso, job_items

log = logging.getLogger("keel.knowledge.documents")


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Prepared:
    """One job item after parsing: its chunks to embed, or why it was rejected, or that it is unchanged."""

    item_id: int
    source: str
    origin: str
    data_hash: str
    size: int
    options: dict[str, Any]
    parsed: Parsed | None = None
    chunks: list[Chunk] = field(default_factory=list)
    error: KeelError | None = None
    unchanged: bool = False
    vectors: np.ndarray | None = None
    measure: Measure = field(default_factory=Measure.words)

    def embed_inputs(self) -> list[str]:
        """What the embedding model sees per chunk: the title and section path give it context."""
        title = self.parsed.title if self.parsed else ""
        return [self.measure.prefix(title, c.section) + c.text for c in self.chunks]


def prepare(item_id: int, source: str, origin: str, data: bytes, options: dict[str, Any],
            known_hash: str | None, max_unzipped: int, measure: Measure | None = None) -> Prepared:
    """Hash, and unless unchanged, parse and chunk (sized by `measure`, default words). Never raises
    for a bad file: `error` says why. `known_hash` is that of a document cut by the same measure."""
    p = Prepared(item_id, source, origin, content_hash(data), len(data), options, measure=measure or Measure.words())
    if known_hash == p.data_hash:
        p.unchanged = True
        return p
    try:
        p.parsed = parse(source, data, max_unzipped_bytes=max_unzipped)
        p.chunks = chunk(p.parsed, p.measure)
    except FileRejected as exc:
        p.error = exc
    except RecursionError:
        p.error = FileRejected(f"{source}: the file nests too deeply to parse", fix="flatten or split it",
                               source=source)
    return p


def resolve_document_acl(store: Store, acl: dict[str, Any] | None) -> list[tuple[str, str]] | None:
    """A document ACL `{"teams": [...], "roles": [...]}` as (kind, value) rows.

    None (no `acl` sent) keeps an existing document's ACL, so re-uploading a changed file never
    widens who reads it; `{}` (or empty lists) clears it so the document inherits the collection's."""
    if acl is None:
        return None
    names = acl_names(acl, "acl")
    rows = []
    for team in names["teams"]:
        rows.append(("team", catalog.resolve_team(store, team)))
    for role in names["roles"]:
        if role not in ROLES and role != "*":
            raise BadRequest(f"unknown role {role!r} in the document ACL", fix=f"use one of: {', '.join(ROLES)}, *")
        rows.append(("role", role))
    return sorted(set(rows))


def _set_acl(conn: sa.Connection, document_id: str, rows: list[tuple[str, str]] | None) -> None:
    """Replace the document's ACL with `rows`; None leaves it as it is."""
    if rows is None:
        return
    conn.execute(document_acl.delete().where(document_acl.c.document_id == document_id))
    if rows:
        conn.execute(document_acl.insert(), [{"document_id": document_id, "kind": k, "value": v} for k, v in rows])


def commit(store: Store, index: ChunkIndex, c: Collection, job_id: str, batch: list[Prepared]) -> None:
    """Write a group of prepared items in one transaction: documents, chunks, ACLs and item statuses."""
    now = utcnow()
    with transaction(store) as tx:
        conn = tx.conn
        for p in batch:
            done: dict[str, Any] = {"content": None}
            if p.error is not None:
                done.update(status="failed", error_code=p.error.code, error_detail=p.error.detail)
                conn.execute(job_items.update().where(job_items.c.id == p.item_id).values(**done))
                continue
            q = sa.select(documents.c.id, documents.c.content_hash, documents.c.chunk_count,
                          documents.c.chunker).where(
                documents.c.collection_id == c.id, documents.c.source == p.source)
            if store.dialect == "postgresql":
                q = q.with_for_update()
            existing = conn.execute(q).first()
            acl_rows = p.options.get("acl_rows")
            meta = p.options.get("metadata") or {}
            keep = {} if acl_rows is None else {"restricted": bool(acl_rows)}
            same = existing is not None and existing.content_hash == p.data_hash and \
                existing.chunker == p.measure.version
            if existing is not None and (p.unchanged or same):
                conn.execute(documents.update().where(documents.c.id == existing.id).values(
                    meta=meta, origin=p.origin, updated_at=now, **keep))
                _set_acl(conn, existing.id, acl_rows)
                done.update(status="unchanged", document_id=existing.id, chunks=existing.chunk_count)
            elif p.unchanged:  # deleted since it was found unchanged: nothing to restore from
                done.update(status="failed", error_code="changed_during_ingest",
                            error_detail=f"{p.source}: the document was deleted while this upload ran; upload it again")
            else:
                assert p.parsed is not None and p.vectors is not None
                items = [ChunkIn(ch.ordinal, ch.text, ch.section, ch.page, ch.start, ch.end, ch.tokens, p.vectors[i])
                         for i, ch in enumerate(p.chunks)]
                values = dict(title=p.parsed.title[:500], format=p.parsed.format, content_hash=p.data_hash,
                              size_bytes=p.size, chunk_count=len(items), pages=p.parsed.pages, meta=meta,
                              origin=p.origin, job_id=job_id, chunker=p.measure.version, updated_at=now, **keep)
                if existing is None:
                    doc_id = new_id("doc")
                    conn.execute(documents.insert().values(id=doc_id, collection_id=c.id, source=p.source,
                                                           created_at=now, **{"restricted": False, **values}))
                else:
                    doc_id = existing.id
                    conn.execute(documents.update().where(documents.c.id == doc_id).values(**values))
                _set_acl(conn, doc_id, acl_rows)
                index.write_document(tx, c, doc_id, items)
                done.update(status="changed" if existing is not None else "new", document_id=doc_id,
                            chunks=len(items))
            conn.execute(job_items.update().where(job_items.c.id == p.item_id).values(**done))
        cut = {p.measure.version for p in batch if p.parsed is not None and p.error is None}
        if cut:
            conn.execute(collections.update().where(collections.c.id == c.id).values(chunker=max(cut)))


def known_hashes(store: Store, c: Collection, sources: list[str], chunker: str | None = None) -> dict[str, str]:
    """source → content hash of the documents that exist (for writers deciding what to upload); with
    `chunker`, only of those cut by that version (the others must be sent again, to be re-chunked)."""
    out: dict[str, str] = {}
    with reading(store) as conn:
        for i in range(0, len(sources), 500):
            part = sources[i:i + 500]
            q = sa.select(documents.c.source, documents.c.content_hash).where(
                documents.c.collection_id == c.id, documents.c.source.in_(part))
            if chunker is not None:
                q = q.where(documents.c.chunker == chunker)
            out.update(conn.execute(q).all())
    return out


def public(r: Any, acl: list[tuple[str, str]] | None = None, collection: Collection | None = None) -> dict[str, Any]:
    out = {"id": r.id, "collection_id": r.collection_id, "source": r.source, "title": r.title, "format": r.format,
           "content_hash": r.content_hash, "size_bytes": r.size_bytes, "chunk_count": r.chunk_count,
           "pages": r.pages, "restricted": bool(r.restricted), "metadata": r.meta or {},
           "created_at": iso(r.created_at), "updated_at": iso(r.updated_at)}
    if collection is not None:
        out["collection"] = collection.name
    if acl is not None:
        out["acl"] = {"teams": [v for k, v in acl if k == "team"], "roles": [v for k, v in acl if k == "role"]}
    return out


def list_documents(store: Store, p: Principal, c: Collection, *, limit: int = 100, after: str | None = None,
                   source_prefix: str | None = None) -> list[dict[str, Any]]:
    q = (sa.select(documents).where(documents.c.collection_id == c.id, document_readable(p))
         .order_by(documents.c.source).limit(limit))
    if after:
        q = q.where(documents.c.source > after)
    if source_prefix:
        esc = source_prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        q = q.where(documents.c.source.like(esc + "%", escape="\\"))
    with reading(store) as conn:
        return [public(r) for r in conn.execute(q)]


def get_document(store: Store, p: Principal, document_id: str) -> tuple[Collection, dict[str, Any]]:
    """A document the caller may read, or `NotFound` (the same whether it is missing or hidden)."""
    missing = NotFound(f"document {document_id!r} does not exist", fix="list documents with "
                       "GET /v1/collections/{collection}/documents", document_id=document_id)
    with reading(store) as conn:
        r = conn.execute(sa.select(documents).where(documents.c.id == document_id, document_readable(p))).first()
        if r is None:
            raise missing
        acl = [(a.kind, a.value) for a in conn.execute(
            sa.select(document_acl).where(document_acl.c.document_id == document_id))]
    c = next((c for c in catalog.all_collections(store) if c.id == r.collection_id), None)
    if c is None or not can_read(p, c):
        raise missing
    return c, public(r, acl, c)


def document_chunks(store: Store, p: Principal, document_id: str, *, limit: int = 200, after: int = -1
                    ) -> tuple[Collection, dict[str, Any], list[dict[str, Any]]]:
    """A readable document (`get_document`'s rule) and its chunks in order, `limit` after ordinal `after`."""
    c, doc = get_document(store, p, document_id)
    k = chunks.c
    q = (sa.select(k.ordinal, k.section, k.text, k.page, k.tokens).where(k.document_id == document_id, k.ordinal > after)
         .order_by(k.ordinal).limit(limit))
    with reading(store) as conn:
        return c, doc, [{"ordinal": r.ordinal, "section": r.section, "text": r.text, "page": r.page,
                         "tokens": r.tokens} for r in conn.execute(q)]


def delete_documents(store: Store, index: ChunkIndex, c: Collection, document_ids: list[str]) -> int:
    if not document_ids:
        return 0
    with transaction(store) as tx:
        ids = list(tx.conn.execute(sa.select(documents.c.id).where(
            documents.c.collection_id == c.id, documents.c.id.in_(document_ids))).scalars())
        index.delete_documents(tx, c, ids)
        tx.conn.execute(documents.delete().where(documents.c.id.in_(ids)))
    return len(ids)


def sync(store: Store, index: ChunkIndex, c: Collection, origin: str, keep: list[str]) -> list[str]:
    """Delete the documents that came from `origin` (a synced folder) whose source is not in `keep`."""
    if not origin:
        raise BadRequest("sync needs the origin whose documents it prunes", fix="pass `origin` (the synced folder)")
    keep_set = set(keep)
    with reading(store) as conn:
        rows = conn.execute(sa.select(documents.c.id, documents.c.source).where(
            documents.c.collection_id == c.id, documents.c.origin == origin)).all()
    gone = [(r.id, r.source) for r in rows if r.source not in keep_set]
    for i in range(0, len(gone), 200):
        delete_documents(store, index, c, [d for d, _ in gone[i:i + 200]])
    return sorted(s for _, s in gone)
