"""HTTP API: `/v1/collections…` (create, list, ACL, upload, documents, sync), `/v1/jobs/{id}`,
`/v1/search` and `/v1/answer` (streaming with `"stream": true`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

import orjson
from fastapi import APIRouter, Depends, Query as Q, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from keel.core.errors import BadRequest, KeelError, MalformedJSON, NotFound
from keel.core.http import json_response
from keel.core.logs import request_id_var
from keel.core.ids import new_id
from keel.identity.auth import principal
from keel.identity.principal import Principal
from keel.knowledge import answer as answers, catalog, documents as docs, jobs
from keel.knowledge.acl import can_write
from keel.knowledge.chunking import measure_for
from keel.knowledge.search import RRF_K, RRF_K_MAX, VECTOR_FEEDBACK, Query, search
from keel.knowledge.service import Knowledge

router = APIRouter(tags=["knowledge"])
MAX_FILES_PER_UPLOAD = 1000


class AclPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    teams: list[str] = Field(default_factory=list)
    roles: list[str] = Field(default_factory=list)


class AclIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    read: AclPart = Field(default_factory=AclPart)
    write: AclPart = Field(default_factory=AclPart)


class CollectionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    classification: Literal["public", "internal", "confidential", "restricted"]
    description: str = ""
    owner_team: str | None = None
    acl: AclIn = Field(default_factory=AclIn)
    embedding_model: str = Field(default=catalog.DEFAULT_EMBEDDING, min_length=1, max_length=200)
    metadata: dict[str, Any] = Field(default_factory=dict)


class CollectionPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    classification: Literal["public", "internal", "confidential", "restricted"] | None = None
    description: str | None = None
    acl: AclIn | None = None


class SourcesIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sources: list[str] = Field(max_length=10000)


class SyncIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    origin: str = Field(min_length=1, max_length=1000)
    keep: list[str]


class SearchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query: str = Field(min_length=1, max_length=4000)
    collections: list[str] | None = None
    top_k: int = Field(default=5, ge=1, le=100)
    filters: dict[str, Any] | None = None
    mode: Literal["hybrid", "bm25", "vector"] = "hybrid"
    weights: dict[str, float] | None = None
    rerank: bool | str | None = None
    long_query: Literal["auto", "on", "off"] = Field(
        default="off", description="long questions: sentence sub-queries fused (RRF) and key terms for BM25; "
        "auto: for questions of several sentences and at least 25 words; off by default (docs/knowledge.md)")
    rrf_k: int = Field(default=RRF_K, ge=1, le=RRF_K_MAX, description="reciprocal rank fusion constant: "
                       "score = sum of weight / (rrf_k + rank); smaller favours each leg's top hits")
    vector_feedback: float = Field(default=VECTOR_FEEDBACK, ge=0, le=1, description="> 0: the vector leg searches "
                                   "again from the query moved toward its best hit by this weight; 0 (default): off")


class AnswerIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: str = Field(min_length=1, max_length=4000)
    collections: list[str] | None = None
    top_k: int = Field(default=5, ge=1, le=20)
    filters: dict[str, Any] | None = None
    model: str | None = None
    max_tokens: int = Field(default=256, ge=1, le=8192)
    temperature: float = Field(default=0.0, ge=0, le=2)
    min_similarity: float = Field(default=answers.MIN_SIMILARITY, ge=-1, le=1)
    weights: dict[str, float] | None = None
    rerank: bool | str | None = None
    long_query: Literal["auto", "on", "off"] = Field(
        default="off", description="long questions: sentence sub-queries fused (RRF) and key terms for BM25; "
        "auto: for questions of several sentences and at least 25 words; off by default (docs/knowledge.md)")
    stream: bool = False


def _kn(request: Request) -> Knowledge:
    return request.app.state.knowledge


def _rid() -> str:
    return request_id_var.get() or new_id("req")


def _rerank_alias(kn: Knowledge, value: bool | str | None) -> str | None:
    if value is True:
        return kn.config.answer_model
    if value is False:
        return "off"  # not even the collections' own reranker
    return value or None


# -- collections ---------------------------------------------------------------------------
@router.post("/v1/collections", status_code=201)
async def create_collection(body: CollectionIn, request: Request, p: Principal = Depends(principal)) -> Response:
    kn = _kn(request)
    c = await run_in_threadpool(lambda: catalog.create(
        kn.store, kn.index, p, name=body.name, classification=body.classification, description=body.description,
        owner_team=body.owner_team, acl=body.acl.model_dump(), embedding_model=body.embedding_model,
        meta=body.metadata))
    return json_response(catalog.public(c, (0, 0), writable=True), 201)


@router.get("/v1/collections")
async def list_collections(request: Request, p: Principal = Depends(principal)) -> Response:
    kn = _kn(request)

    def rows() -> list[dict[str, Any]]:
        return [catalog.public(c, catalog.visible_counts(kn.store, p, c), writable=can_write(p, c))
                for c in catalog.readable(kn.store, p)]

    return json_response({"object": "list", "data": await run_in_threadpool(rows)})


@router.get("/v1/collections/{ref}")
async def get_collection(ref: str, request: Request, p: Principal = Depends(principal)) -> Response:
    kn = _kn(request)

    def one() -> dict[str, Any]:
        c = catalog.get_readable(kn.store, p, ref)
        return {**catalog.public(c, catalog.visible_counts(kn.store, p, c), writable=can_write(p, c)),
                "limits": kn.limits()}

    return json_response(await run_in_threadpool(one))


@router.patch("/v1/collections/{ref}")
async def update_collection(ref: str, body: CollectionPatch, request: Request,
                            p: Principal = Depends(principal)) -> Response:
    kn = _kn(request)
    c = await run_in_threadpool(lambda: catalog.update(
        kn.store, p, ref, acl=body.acl.model_dump() if body.acl else None, classification=body.classification,
        description=body.description))
    return json_response(catalog.public(c, writable=True))


@router.delete("/v1/collections/{ref}", status_code=204)
async def delete_collection(ref: str, request: Request, p: Principal = Depends(principal)) -> Response:
    kn = _kn(request)
    await run_in_threadpool(catalog.delete, kn.store, kn.index, p, ref)
    return json_response(None, 204)


# -- documents -----------------------------------------------------------------------------
def _json_field(form: Any, name: str, kind: type) -> Any:
    raw = form.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise MalformedJSON(f"form field `{name}` is not valid JSON", fix=f"send `{name}` as a JSON {kind.__name__}") \
            from None
    if not isinstance(value, kind):
        raise BadRequest(f"form field `{name}` must be a JSON {kind.__name__}", fix=f"send `{name}` as a JSON "
                         f"{kind.__name__}")
    return value


def _clean_source(name: str) -> str:
    name = name.replace("\\", "/").strip()
    while name.startswith(("./", "/")):
        name = name[2:] if name.startswith("./") else name[1:]
    if not name or len(name) > 1000:
        raise BadRequest("each file needs a name of 1–1000 characters", fix="set the part's filename or `sources`")
    return name


@router.post("/v1/collections/{ref}/documents", status_code=202)
async def upload(ref: str, request: Request, p: Principal = Depends(principal),
                 wait: float = Q(0, ge=0, le=300, description="seconds to wait for the job to finish")) -> Response:
    """Multipart upload: `files` parts, plus optional `sources` (JSON list, one name per file),
    `origin`, `acl` (JSON `{"teams": [...], "roles": [...]}` narrowing who reads these documents;
    left out, a re-uploaded document keeps its ACL; `{}` clears it) and `metadata` (JSON object).
    Answers 202 with the job; `?wait=N` waits up to N seconds for it to finish (then 200)."""
    kn = _kn(request)
    c = await run_in_threadpool(catalog.get_writable, kn.store, p, ref)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise BadRequest("upload documents as multipart/form-data with one or more `files` parts",
                         fix="e.g. curl -F files=@report.pdf …/documents")
    form = await request.form(max_files=MAX_FILES_PER_UPLOAD, max_fields=MAX_FILES_PER_UPLOAD + 10)
    try:
        files = [f for f in form.getlist("files") + form.getlist("file") if isinstance(f, UploadFile)]
        if not files:
            raise BadRequest("no `files` parts in the upload", fix="send one or more files as `files` parts")
        sources = _json_field(form, "sources", list)
        if sources is not None and (len(sources) != len(files) or not all(isinstance(s, str) for s in sources)):
            raise BadRequest("`sources` must list one name per file, in order", fix="match `sources` to the files")
        meta = _json_field(form, "metadata", dict)
        acl = _json_field(form, "acl", dict)
        origin = str(form.get("origin") or "")[:1000]
        acl_rows = await run_in_threadpool(docs.resolve_document_acl, kn.store, acl)
        uploads = []
        for i, f in enumerate(files):
            uploads.append(jobs.Upload(_clean_source(sources[i] if sources else (f.filename or "")),
                                       await f.read(), origin))
    finally:
        await form.close()
    names = [u.source for u in uploads]
    if len(set(names)) != len(names):
        raise BadRequest("two files in one upload have the same name", fix="give each file a distinct source name")
    job_id = await run_in_threadpool(lambda: jobs.create_job(kn.store, p, c, uploads,
                                                             max_file_bytes=kn.config.max_file_bytes,
                                                             acl_rows=acl_rows, metadata=meta))
    kn.wake()
    deadline = time.monotonic() + wait
    view = await run_in_threadpool(jobs.view, kn.store, p, job_id)
    while wait and view["status"] in ("queued", "running") and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        view = await run_in_threadpool(jobs.view, kn.store, p, job_id)
    done = view["status"] not in ("queued", "running")
    return json_response(view, 200 if done and wait else 202, headers={"Location": f"/v1/jobs/{job_id}"})


@router.get("/v1/collections/{ref}/documents")
async def list_documents(ref: str, request: Request, p: Principal = Depends(principal),
                         limit: int = Q(100, ge=1, le=1000), after: str | None = None,
                         source_prefix: str | None = None) -> Response:
    kn = _kn(request)

    def rows() -> list[dict[str, Any]]:
        c = catalog.get_readable(kn.store, p, ref)
        return docs.list_documents(kn.store, p, c, limit=limit, after=after, source_prefix=source_prefix)

    data = await run_in_threadpool(rows)
    return json_response({"object": "list", "data": data, "next_after": data[-1]["source"] if len(data) == limit
                          else None})


@router.get("/v1/documents/{document_id}")
async def get_document(document_id: str, request: Request, p: Principal = Depends(principal)) -> Response:
    _c, doc = await run_in_threadpool(docs.get_document, _kn(request).store, p, document_id)
    return json_response(doc)


@router.get("/v1/documents/{document_id}/chunks")
async def get_document_chunks(document_id: str, request: Request, after: int = Q(-1, ge=-1),
                              limit: int = Q(100, ge=1, le=500), p: Principal = Depends(principal)) -> Response:
    """A readable document's chunks in order (`after` an ordinal, for the next page); another team's: not found."""
    _c, doc, rows = await run_in_threadpool(lambda: docs.document_chunks(_kn(request).store, p, document_id,
                                                                          limit=limit, after=after))
    return json_response({"document": doc, "data": rows})


@router.delete("/v1/collections/{ref}/documents/{document_id}", status_code=204)
async def delete_document(ref: str, document_id: str, request: Request, p: Principal = Depends(principal)) -> Response:
    kn = _kn(request)

    def go() -> None:
        c = catalog.get_writable(kn.store, p, ref)
        if not docs.delete_documents(kn.store, kn.index, c, [document_id]):
            raise NotFound(f"document {document_id!r} does not exist in collection {c.name!r}",
                                fix="list documents with GET /v1/collections/{collection}/documents",
                                document_id=document_id)

    await run_in_threadpool(go)
    return json_response(None, 204)


@router.post("/v1/collections/{ref}/hashes")
async def hashes(ref: str, body: SourcesIn, request: Request, p: Principal = Depends(principal)) -> Response:
    """For writers deciding what to upload: the content hash of each named source that exists."""
    kn = _kn(request)

    def go() -> dict[str, str]:
        c = catalog.get_writable(kn.store, p, ref)
        chunker = measure_for(kn.gateway, c.embedding_model).version
        return docs.known_hashes(kn.store, c, body.sources, chunker=chunker)

    return json_response({"hashes": await run_in_threadpool(go)})


@router.post("/v1/collections/{ref}/sync")
async def sync(ref: str, body: SyncIn, request: Request, p: Principal = Depends(principal)) -> Response:
    """Delete the documents from `origin` whose source is not in `keep` (files removed from a synced folder)."""
    kn = _kn(request)

    def go() -> list[str]:
        c = catalog.get_writable(kn.store, p, ref)
        return docs.sync(kn.store, kn.index, c, body.origin, body.keep)

    return json_response({"deleted": await run_in_threadpool(go)})


@router.get("/v1/collections/{ref}/jobs")
async def list_jobs(ref: str, request: Request, limit: int = Q(20, ge=1, le=100),
                    p: Principal = Depends(principal)) -> Response:
    """A readable collection's latest ingest jobs, newest first, with counts and their first failed items (an admin
    or a writer of the collection sees every job; a reader only its own)."""
    kn = _kn(request)
    return json_response({"data": await run_in_threadpool(
        lambda: jobs.recent(kn.store, p, catalog.get_readable(kn.store, p, ref), limit))})


@router.get("/v1/jobs/{job_id}")
async def get_job(job_id: str, request: Request, p: Principal = Depends(principal),
                  items: Literal["all", "failed", "none"] = "all") -> Response:
    return json_response(await run_in_threadpool(jobs.view, _kn(request).store, p, job_id, items))


# -- retrieval -----------------------------------------------------------------------------
@router.post("/v1/search")
async def search_route(body: SearchIn, request: Request, p: Principal = Depends(principal)) -> Response:
    kn = _kn(request)
    q = Query(text=body.query, collections=body.collections, top_k=body.top_k, filters=body.filters, mode=body.mode,
              rerank=_rerank_alias(kn, body.rerank), long_query=body.long_query, rrf_k=body.rrf_k,
              vector_feedback=body.vector_feedback,
              **({"weights": body.weights} if body.weights else {}))
    hits, timings = await search(kn, p, q, _rid())
    return json_response({"object": "list", "data": [h.public() for h in hits], "timings": timings})


@router.post("/v1/answer")
async def answer_route(body: AnswerIn, request: Request, p: Principal = Depends(principal)) -> Response:
    kn = _kn(request)
    req = answers.AnswerRequest(question=body.question, collections=body.collections, top_k=body.top_k,
                                filters=body.filters, model=body.model or kn.config.answer_model,
                                max_tokens=body.max_tokens, temperature=body.temperature,
                                min_similarity=body.min_similarity, weights=body.weights,
                                rerank=_rerank_alias(kn, body.rerank), long_query=body.long_query)
    if not body.stream:
        return json_response(await answers.answer(kn, p, req, _rid()))
    _hits, events = await answers.answer_stream(kn, p, req, _rid())

    async def sse() -> AsyncIterator[bytes]:
        try:
            async for ev in events:
                yield b"data: " + orjson.dumps(ev) + b"\n\n"
        except KeelError as exc:
            yield b"data: " + orjson.dumps({"type": "error", **exc.to_problem(request_id_var.get())}) + b"\n\n"
        yield b"data: [DONE]\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
