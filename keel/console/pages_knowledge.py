"""Knowledge: collections (create with a classification; the owner team or an admin edits its classification and
who may read and write it), one collection's documents, upload with per-file
progress (one request per file from `console.js`, each an ingest job whose status the page polls), and a
search tester — knowledge's own catalog, jobs and search functions, so a caller sees exactly the collections,
documents and counts `/v1/collections…` would show it."""

from __future__ import annotations

import hmac
from typing import Any

from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.responses import RedirectResponse, Response

from keel.console.web import Page, root
from keel.core.errors import BadRequest, Forbidden, NotFound, ValidationFailed
from keel.core.http import json_response
from keel.core.ids import new_id
from keel.identity.principal import ROLES
from keel.knowledge import catalog, documents as docs, jobs
from keel.knowledge.acl import can_write
from keel.knowledge.routes import CollectionPatch
from keel.knowledge.search import Query, search

CLASSIFICATIONS = ("public", "internal", "confidential", "restricted")
PAGE = 50


def _kn(page: Page) -> Any:
    kn = getattr(page.state, "knowledge", None)
    if kn is None:
        raise NotFound("knowledge is not enabled on this server", fix="start Keel with knowledge")
    page.p.require("collections.read")
    return kn


async def knowledge(page: Page) -> Response:
    kn = _kn(page)
    p = page.p

    def rows() -> list[dict[str, Any]]:
        return [catalog.public(c, catalog.visible_counts(kn.store, p, c), writable=can_write(p, c))
                for c in catalog.readable(kn.store, p)]

    embeddings = [a for a, kind in page.state.gateway.visible_aliases(p).items() if kind == "embedding"]
    return page.render("knowledge.html", title="Knowledge", collections=await run_in_threadpool(rows),
                       classifications=CLASSIFICATIONS, embeddings=embeddings,
                       may_create=p.has("collections.write"))


async def create(page: Page) -> Response:
    kn = _kn(page)
    form = await page.form()
    c = await run_in_threadpool(lambda: catalog.create(
        kn.store, kn.index, page.p, name=form.get("name", "").strip(), classification=form.get("classification", ""),
        description=form.get("description", ""), embedding_model=form.get("embedding_model") or catalog.DEFAULT_EMBEDDING))
    return RedirectResponse(f"{root(page.request)}/knowledge/{c.name}", 303)


async def collection(page: Page) -> Response:
    kn = _kn(page)
    p, ref = page.p, page.request.path_params["ref"]
    after = page.request.query_params.get("after") or None
    query = page.request.query_params.get("q", "")[:4000].strip()

    def load() -> tuple[Any, list[dict[str, Any]], tuple[int, int]]:
        c = catalog.get_readable(kn.store, p, ref)
        return (c, docs.list_documents(kn.store, p, c, limit=PAGE, after=after), catalog.visible_counts(kn.store, p, c),
                jobs.recent(kn.store, p, c, limit=10))

    c, documents, counts, recent_jobs = await run_in_threadpool(load)
    hits: list[dict[str, Any]] = []
    if query:
        found, _timings = await search(kn, p, Query(text=query, collections=[c.id], top_k=5), new_id("req"))
        hits = [h.public() for h in found]
    return page.render("collection.html", title=f"Collection {c.name}", c=catalog.public(c, counts),
                       documents=documents, writable=can_write(p, c), query=query, hits=hits, jobs=recent_jobs,
                       next_after=documents[-1]["source"] if len(documents) == PAGE else None,
                       may_manage=can_write(p, c) and (p.is_admin or (p.team_id is not None
                                                                     and p.team_id == c.owner_team_id)),
                       classifications=CLASSIFICATIONS, acl_roles=(*ROLES, "*"),
                       saved=page.request.query_params.get("saved") == "access")


async def document(page: Page) -> Response:
    """One document the caller may read and its chunks (what a search can cite), a page of 100 at a time."""
    kn = _kn(page)
    try:
        after = int(page.request.query_params.get("after") or -1)
    except ValueError:
        raise BadRequest("after must be a chunk number", fix="follow the page's own link") from None
    c, doc, rows = await run_in_threadpool(lambda: docs.document_chunks(kn.store, page.p, page.request.path_params["doc"],
                                                                        limit=PAGE, after=after))
    if c.name != page.request.path_params["ref"] and c.id != page.request.path_params["ref"]:
        raise NotFound("this document is not in that collection", fix="open it from its collection's page")
    return page.render("document.html", title=f"Document {doc['source']}", c=c, doc=doc, chunks=rows,
                       next_after=rows[-1]["ordinal"] if len(rows) == PAGE else None)


def _names(raw: str) -> list[str]:
    return [n.strip() for n in raw.replace("\n", ",").split(",") if n.strip()]


async def access(page: Page) -> Response:
    """Classification and who may read and write, as `PATCH /v1/collections/{ref}` (the owner team or an admin;
    the ACL is replaced as a whole, checked by the API's own model and knowledge's `catalog.update`)."""
    kn = _kn(page)
    form = await page.form()
    posted = await page.request.form()  # the role checkboxes: one field per checked box
    acl = {part: {"teams": _names(form.get(f"{part}_teams", "")),
                  "roles": [str(r)[:40] for r in posted.getlist(f"{part}_roles")][:10]} for part in ("read", "write")}
    try:
        body = CollectionPatch(classification=form.get("classification") or None, acl=acl)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ValidationFailed(f"the form is not valid: {problems}", fix="correct the named fields") from None
    ref = page.request.path_params["ref"]
    c = await run_in_threadpool(lambda: catalog.update(kn.store, page.p, ref, classification=body.classification,
                                                       acl=body.acl.model_dump() if body.acl else None))
    await page.audit("collection.access", collection=c.id, classification=c.classification, acl=c.acl_dict())
    return RedirectResponse(f"{root(page.request)}/knowledge/{c.name}?saved=access", 303)


async def upload(page: Page) -> Response:
    """One or more files as an ingest job: JSON (the job) for the page's script, else back to the collection."""
    kn = _kn(page)
    p, ref = page.p, page.request.path_params["ref"]
    c = await run_in_threadpool(catalog.get_writable, kn.store, p, ref)
    form = await page.request.form(max_files=100, max_fields=20)
    try:
        sent = str(form.get("csrf") or page.request.headers.get("x-csrf-token") or "")
        if not hmac.compare_digest(sent.encode(), page.session.csrf.encode()):
            raise Forbidden("the form's CSRF token is missing or wrong", fix="reload the page and upload again")
        files = [f for f in form.getlist("files") if isinstance(f, UploadFile) and f.filename]
        if not files:
            raise BadRequest("no file chosen", fix="choose one or more files to upload")
        uploads = [jobs.Upload((f.filename or "").replace("\\", "/").lstrip("/")[:1000], await f.read(), "console")
                   for f in files]
    finally:
        await form.close()
    job_id = await run_in_threadpool(lambda: jobs.create_job(kn.store, p, c, uploads,
                                                             max_file_bytes=kn.config.max_file_bytes))
    kn.wake()
    if "application/json" in page.request.headers.get("accept", ""):
        return json_response(await run_in_threadpool(jobs.view, kn.store, p, job_id), 202)
    return RedirectResponse(f"{root(page.request)}/knowledge/{c.name}?job={job_id}", 303)


async def job(page: Page) -> Response:
    kn = _kn(page)
    return json_response(await run_in_threadpool(jobs.view, kn.store, page.p, page.request.path_params["job_id"]),
                         headers={"Cache-Control": "no-store"})


ROUTES = [
    ("GET", "/knowledge", knowledge),
    ("POST", "/knowledge", create),
    ("GET", "/knowledge/{ref}", collection),
    ("GET", "/knowledge/{ref}/documents/{doc}", document),
    ("POST", "/knowledge/{ref}/upload", upload),
    ("GET", "/knowledge/jobs/{job_id}", job),
    ("POST", "/knowledge/{ref}/access", access),
]
