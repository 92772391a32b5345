"""Ingestion jobs: an upload is acknowledged once its bytes are committed as job items; a worker
turns items into documents in groups, one transaction per group, so a crash (even kill -9) loses
nothing acknowledged and a restart carries on from the first unfinished item without duplicates.

Workers hold a job under a lease they renew; on PostgreSQL any replica takes over a job whose
lease ran out. The embedded store has one process (the index lock file sees to it), so at start
it takes back its running jobs at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import sqlalchemy as sa

from keel.core.clock import utcnow
from keel.core.db import Store
from keel.core.errors import KeelError, NotFound
from keel.core.ids import new_id
from keel.identity.principal import Principal
from keel.knowledge import catalog, documents as docs
from keel.knowledge.acl import Collection, can_write
from keel.knowledge.chunking import measure_for
from keel.knowledge.errors import EmptyFile, FileRejected, FileTooLarge
from keel.knowledge.index import ChunkIndex, reading
from keel.knowledge.parsers import format_of
from keel.knowledge.parts import Embedder, KnowledgeConfig
from keel.knowledge.tables import collections, iso, job_items, jobs


log = logging.getLogger("keel.knowledge.jobs")
LEASE_S, HEARTBEAT_S = 15.0, 5.0
GROUP_BYTES, GROUP_FILES = 48 * 1024, 32
FINAL = ("new", "changed", "unchanged", "failed")


@dataclass
class Upload:
    """One file handed in for ingestion."""

    source: str
    data: bytes
    origin: str = ""


def _rejection(u: Upload, max_file_bytes: int) -> FileRejected | None:
    """Errors visible without parsing: unsupported extension, 0 bytes, over the size limit."""
    try:
        format_of(u.source)
    except FileRejected as exc:
        return exc
    if not u.data:
        return EmptyFile(f"{u.source}: the upload is 0 bytes", fix="upload the file's content", source=u.source)
    if len(u.data) > max_file_bytes:
        return FileTooLarge(f"{u.source}: {len(u.data)} bytes is over the {max_file_bytes}-byte limit per file",
                            fix="split the file, or raise KEEL_MAX_BODY_BYTES", source=u.source)
    return None


def create_job(store: Store, p: Principal, c: Collection, uploads: list[Upload], *, max_file_bytes: int,
               acl_rows: list[tuple[str, str]] | None = None, metadata: dict[str, Any] | None = None) -> str:
    """Commit the job and its items (the bytes included): from here on the upload is acknowledged."""
    metadata = catalog.check_metadata(metadata)
    now = utcnow()
    job_id = new_id("job")
    options = {"acl_rows": acl_rows, "metadata": metadata}
    rows, pending = [], 0
    for n, u in enumerate(uploads):
        err = _rejection(u, max_file_bytes)
        pending += err is None
        rows.append({"job_id": job_id, "ordinal": n, "source": u.source, "origin": u.origin, "size_bytes": len(u.data),
                     "content": None if err else u.data, "options": options,
                     "status": "failed" if err else "pending", "error_code": err.code if err else None,
                     "error_detail": err.detail if err else None, "chunks": 0})
    status = "queued" if pending else ("failed" if rows else "succeeded")
    with store.engine.begin() as conn:
        conn.execute(jobs.insert().values(id=job_id, collection_id=c.id, status=status, principal=p.to_dict(),
                                          created_by=p.key_id, total=len(rows), created_at=now,
                                          finished_at=None if pending else now))
        if rows:
            conn.execute(job_items.insert(), rows)
    return job_id


def view(store: Store, p: Principal, job_id: str, items: str = "all") -> dict[str, Any]:
    """A job as its creator, an admin or a writer of its collection sees it; anyone else gets 404."""
    with reading(store) as conn:
        j = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).first()
        c = None
        if j is not None:
            c = next((c for c in catalog.load(conn, collections.c.id == j.collection_id)), None)
        if j is None or c is None or not (p.is_admin or j.created_by == p.key_id or can_write(p, c)):
            raise NotFound(f"job {job_id!r} does not exist", fix="use the job id the upload returned", job_id=job_id)
        counts = dict(conn.execute(sa.select(job_items.c.status, sa.func.count()).where(
            job_items.c.job_id == job_id).group_by(job_items.c.status)).all())
        total_chunks = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(job_items.c.chunks), 0)).where(
            job_items.c.job_id == job_id, job_items.c.status.in_(["new", "changed"]))).scalar()
        listed = []
        if items != "none":
            q = sa.select(job_items.c.source, job_items.c.status, job_items.c.document_id, job_items.c.chunks,
                          job_items.c.error_code, job_items.c.error_detail).where(
                job_items.c.job_id == job_id).order_by(job_items.c.ordinal)
            if items == "failed":
                q = q.where(job_items.c.status == "failed")
            for r in conn.execute(q):
                it = {"source": r.source, "status": r.status, "document_id": r.document_id, "chunks": r.chunks}
                if r.error_code:
                    it["error"] = {"code": r.error_code, "detail": r.error_detail}
                listed.append(it)
    out = {"id": j.id, "object": "ingest_job", "collection": c.name, "collection_id": c.id, "status": j.status,
           "total": j.total, "counts": {s: int(counts.get(s, 0)) for s in ("pending",) + FINAL},
           "chunks": int(total_chunks or 0), "error": j.error,
           "created_at": iso(j.created_at), "started_at": iso(j.started_at), "finished_at": iso(j.finished_at)}
    if items != "none":
        out["items"] = listed
    return out


def recent(store: Store, p: Principal, c: Collection, limit: int = 20, failures: int = 5) -> list[dict[str, Any]]:
    """A collection's latest ingest jobs as `view`'s rule shows them (an admin or a writer of the collection: every
    job; anyone else: its own), newest first, with their item counts and first `failures` failed items."""
    q = sa.select(jobs).where(jobs.c.collection_id == c.id).order_by(jobs.c.created_at.desc()).limit(limit)
    if not (p.is_admin or can_write(p, c)):
        q = q.where(jobs.c.created_by == p.key_id)
    out = []
    with reading(store) as conn:
        for j in conn.execute(q).all():
            counts = dict(conn.execute(sa.select(job_items.c.status, sa.func.count()).where(
                job_items.c.job_id == j.id).group_by(job_items.c.status)).all())
            q_failed = (sa.select(job_items.c.source, job_items.c.error_code, job_items.c.error_detail)
                        .where(job_items.c.job_id == j.id, job_items.c.status == "failed")
                        .order_by(job_items.c.ordinal).limit(failures))
            failed = [{"source": r.source, "error": {"code": r.error_code, "detail": r.error_detail}}
                      for r in conn.execute(q_failed)]
            out.append({"id": j.id, "object": "ingest_job", "status": j.status, "total": j.total,
                        "counts": {s: int(counts.get(s, 0)) for s in ("pending",) + FINAL}, "error": j.error,
                        "failed_items": failed, "created_at": iso(j.created_at), "finished_at": iso(j.finished_at)})
    return out


class Worker:
    """Takes jobs, one at a time per process, and turns their items into documents."""

    def __init__(self, store: Store, index: ChunkIndex, config: KnowledgeConfig, embedder: Embedder,
                 progress: Callable[[int, int], None]) -> None:
        self.store = store
        self.index = index
        self.config = config
        self.embedder = embedder
        self.progress = progress  # (files, chunks) done, for the service's counters
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{new_id('w')[-6:]}"
        self.wake = asyncio.Event()
        self._stopping = False

    # -- claiming -------------------------------------------------------------------------
    def reclaim_all(self) -> None:
        """Embedded store only: this process is the only one, so running jobs are orphans of a crash."""
        with self.store.engine.begin() as conn:
            conn.execute(jobs.update().where(jobs.c.status == "running").values(lease_owner=None, lease_until=None))

    def claim(self) -> str | None:
        now = utcnow()
        with self.store.engine.begin() as conn:
            q = (sa.select(jobs.c.id).where(jobs.c.status.in_(["queued", "running"]),
                                            sa.or_(jobs.c.lease_until.is_(None), jobs.c.lease_until < now,
                                                   jobs.c.lease_owner == self.owner))
                 .order_by(jobs.c.created_at).limit(1))
            if self.store.dialect == "postgresql":
                q = q.with_for_update(skip_locked=True)
            job_id = conn.execute(q).scalar()
            if job_id is None:
                return None
            conn.execute(jobs.update().where(jobs.c.id == job_id).values(
                status="running", lease_owner=self.owner, lease_until=now + timedelta(seconds=LEASE_S),
                started_at=sa.func.coalesce(jobs.c.started_at, now)))
        return job_id

    def _renew(self, job_id: str) -> None:
        with self.store.engine.begin() as conn:
            conn.execute(jobs.update().where(jobs.c.id == job_id, jobs.c.lease_owner == self.owner).values(
                lease_until=utcnow() + timedelta(seconds=LEASE_S)))

    def _release(self, job_id: str) -> None:
        with self.store.engine.begin() as conn:
            conn.execute(jobs.update().where(jobs.c.id == job_id, jobs.c.lease_owner == self.owner).values(
                lease_owner=None, lease_until=None))

    def _finish(self, job_id: str, error: str | None = None) -> None:
        with self.store.engine.begin() as conn:
            statuses = dict(conn.execute(sa.select(job_items.c.status, sa.func.count()).where(
                job_items.c.job_id == job_id).group_by(job_items.c.status)).all())
            if statuses.get("pending"):
                return
            ok = sum(statuses.get(s, 0) for s in ("new", "changed", "unchanged"))
            status = "failed" if error or (statuses.get("failed") and not ok) else (
                "completed_with_errors" if statuses.get("failed") else "succeeded")
            conn.execute(jobs.update().where(jobs.c.id == job_id).values(
                status=status, error=error, finished_at=utcnow(), lease_owner=None, lease_until=None))

    # -- the loop -------------------------------------------------------------------------
    async def run(self) -> None:
        while not self._stopping:
            job_id = await asyncio.to_thread(self.claim)
            if job_id is None:
                self.wake.clear()
                try:
                    await asyncio.wait_for(self.wake.wait(), timeout=1.0)
                except asyncio.TimeoutError:
                    pass
                continue
            try:
                await self.process(job_id)
            except asyncio.CancelledError:
                await asyncio.shield(asyncio.to_thread(self._release, job_id))
                raise
            except Exception:  # a bug must not kill the worker: the job is marked failed and logged
                log.exception("ingest job failed", extra={"job_id": job_id})
                await asyncio.to_thread(self._finish_failed, job_id)

    def _finish_failed(self, job_id: str) -> None:
        with self.store.engine.begin() as conn:
            conn.execute(job_items.update().where(job_items.c.job_id == job_id, job_items.c.status == "pending")
                         .values(status="failed", error_code="internal_error", content=None,
                                 error_detail="Keel hit an internal error on this file; the log has details"))
        self._finish(job_id, error="internal error; see the server log")

    async def _heartbeat(self, job_id: str) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            await asyncio.to_thread(self._renew, job_id)

    def _pending(self, job_id: str) -> tuple[Any, Collection | None, list[Any]]:
        with reading(self.store) as conn:
            j = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).first()
            rows = conn.execute(sa.select(job_items.c.id, job_items.c.size_bytes).where(
                job_items.c.job_id == job_id, job_items.c.status == "pending").order_by(job_items.c.ordinal)).all()
            c = next(iter(catalog.load(conn, collections.c.id == j.collection_id)), None) if j else None
        return j, c, rows

    async def process(self, job_id: str) -> None:
        j, c, rows = await asyncio.to_thread(self._pending, job_id)
        if j is None or c is None:
            return
        p = Principal.from_dict(j.principal)
        groups: list[list[int]] = [[]]
        size = 0
        for r in rows:
            if groups[-1] and (size >= GROUP_BYTES or len(groups[-1]) >= GROUP_FILES):
                groups.append([])
                size = 0
            groups[-1].append(r.id)
            size += r.size_bytes
        groups = [g for g in groups if g]
        beat = asyncio.create_task(self._heartbeat(job_id))
        nxt = None
        try:
            nxt = asyncio.create_task(asyncio.to_thread(self._prepare, c, groups[0])) if groups else None
            for i in range(len(groups)):
                assert nxt is not None
                batch = await nxt
                nxt = asyncio.create_task(asyncio.to_thread(self._prepare, c, groups[i + 1])) \
                    if i + 1 < len(groups) else None
                c = await self._embed(job_id, c, p, batch)
                await asyncio.to_thread(docs.commit, self.store, self.index, c, job_id, batch)
                self.progress(len(batch), sum(len(b.chunks) for b in batch if b.error is None and not b.unchanged))
        finally:
            beat.cancel()
            if nxt is not None and not nxt.done():  # interrupted: the next group's parsing is not needed
                nxt.cancel()
            for task in (beat, nxt):
                if task is None:
                    continue
                try:
                    await task
                except asyncio.CancelledError:
                    pass
                except Exception:  # the job already failed or stopped; keep the helper's own error in the log
                    log.exception("ingest helper task failed", extra={"job_id": job_id})
        await asyncio.to_thread(self._finish, job_id)
        await asyncio.to_thread(self.index.checkpoint)

    def _prepare(self, c: Collection, item_ids: list[int]) -> list[docs.Prepared]:
        with reading(self.store) as conn:
            rows = conn.execute(sa.select(job_items).where(job_items.c.id.in_(item_ids)).order_by(
                job_items.c.ordinal)).all()
        measure = measure_for(self.embedder.gateway, c.embedding_model)
        hashes = docs.known_hashes(self.store, c, [r.source for r in rows], chunker=measure.version)
        out = []
        for r in rows:
            try:
                out.append(docs.prepare(r.id, r.source, r.origin, r.content or b"", r.options or {},
                                        hashes.get(r.source), self.config.max_unzipped_bytes, measure))
            except Exception as exc:  # a parser bug on one file must not sink the batch; it is logged
                log.exception("parser failed", extra={"source": r.source})
                bad = docs.Prepared(r.id, r.source, r.origin, "", r.size_bytes, r.options or {})
                bad.error = FileRejected(f"{r.source}: the parser failed ({type(exc).__name__})",
                                         fix="check the file; the server log has details", source=r.source)
                out.append(bad)
        return out

    async def _embed(self, job_id: str, c: Collection, p: Principal, batch: list[docs.Prepared]) -> Collection:
        todo = [b for b in batch if b.error is None and not b.unchanged]
        texts = [t for b in todo for t in b.embed_inputs()]
        vectors: list[np.ndarray] = []
        step = self.config.embed_batch
        try:
            for i in range(0, len(texts), step):
                vectors.append(await self.embedder.embed(p, c.embedding_model, texts[i:i + step], task_id=job_id,
                                                   use_case="knowledge.ingest"))
        except KeelError as exc:
            for b in todo:
                b.error = exc
            return c
        allv = np.concatenate(vectors) if vectors else np.zeros((0, c.dims or 0), np.float32)
        at = 0
        for b in todo:
            b.vectors = allv[at:at + len(b.chunks)]
            at += len(b.chunks)
            if not b.chunks:
                b.error = EmptyFile(f"{b.source}: no text could be extracted", source=b.source)
        if len(allv):
            try:
                c = await asyncio.to_thread(catalog.set_dims, self.store, c, int(allv.shape[1]))
            except KeelError as exc:
                for b in todo:
                    b.error = exc
        return c

    def stop(self) -> None:
        self._stopping = True
        self.wake.set()
