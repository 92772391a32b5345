"""`POST /v1/rerank`, the Cohere/Jina shape, on a reranker deployment (`kind: rerank`), through the one
governed path (key scopes, policy, limits, budgets, ledger row of kind `rerank`, trace span).

    {"model": "rerank", "query": "…", "documents": ["…", {"text": "…"}], "top_n": 3, "return_documents": true}
    → {"id", "model", "results": [{"index", "relevance_score", "document": {"text"}}],
       "usage": {"total_tokens"}, "meta": {"billed_units": {"search_units": 1}, "tokens": {"input_tokens"}}}

A call takes at most `MAX_DOCUMENTS` documents (a 422 names the bound); the body size limit applies first.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Depends, FastAPI, Request, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from keel.core.errors import BadRequest
from keel.core.http import JSONAnswer
from keel.core.logs import request_id_var
from keel.gateway.pipeline import Call, Gateway
from keel.gateway.reranking import MAX_DOCUMENT_CHARS, MAX_DOCUMENTS, MAX_QUERY_CHARS, RerankRequest
from keel.gateway.routes import answer_headers
from keel.gateway.schemas import check_metadata
from keel.identity.auth import principal
from keel.identity.principal import Principal

router = APIRouter()


class TextDocument(BaseModel):
    model_config = ConfigDict(extra="ignore")
    text: str = Field(max_length=MAX_DOCUMENT_CHARS)


class RerankBody(BaseModel):
    """Cohere/Jina rerank request. Documents are strings or `{"text": …}` objects (other fields are
    ignored; the echoed document is `{"text": …}`, as Cohere's v2 answers)."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=256)
    query: str = Field(min_length=1, max_length=MAX_QUERY_CHARS)
    documents: list[str | TextDocument] = Field(max_length=MAX_DOCUMENTS)
    top_n: int | None = Field(default=None, ge=1)
    return_documents: bool = True
    max_chunks_per_doc: int | None = None  # Cohere v1; accepted, not used: each document is one passage
    rank_fields: list[str] | None = None  # Cohere v1; only `text` is ranked
    metadata: dict[str, Any] | None = None

    @field_validator("metadata", mode="before")
    @classmethod
    def _metadata(cls, v: Any) -> Any:
        check_metadata(v)  # strings only, bounded: it goes into the ledger like a chat call's
        return v


def _texts(body: RerankBody) -> list[str]:
    texts = [d if isinstance(d, str) else d.text for d in body.documents]
    if not texts:
        raise BadRequest("`documents` is empty", fix="send at least one document")
    too_long = next((i for i, t in enumerate(texts) if len(t) > MAX_DOCUMENT_CHARS), None)
    if too_long is not None:
        raise BadRequest(f"document {too_long} is longer than {MAX_DOCUMENT_CHARS} characters",
                         fix="split long documents into passages before reranking")
    if body.rank_fields and body.rank_fields != ["text"]:
        raise BadRequest("only the `text` field of a document can be ranked", fix='omit rank_fields or send ["text"]')
    return texts


@router.post("/v1/rerank", tags=["gateway"])
async def rerank(body: RerankBody, request: Request, p: Principal = Depends(principal)) -> Response:
    """Score `documents` by relevance to `query` with a reranker deployment; best first, at most `top_n`."""
    texts = _texts(body)
    gw: Gateway = request.app.state.gateway
    call = Call(request_id=request_id_var.get() or "", principal=p, kind="rerank", alias=body.model,
                rerank=RerankRequest(model=body.model, query=body.query, documents=texts, top_n=body.top_n),
                metadata=dict(body.metadata or {}))
    result = await gw.rerank(call)
    results = []
    for i, score in result.ranked(body.top_n):
        item: dict[str, Any] = {"index": i, "relevance_score": score}
        if body.return_documents:
            doc = body.documents[i]
            item["document"] = {"text": doc if isinstance(doc, str) else doc.text}
        results.append(item)
    out = {"id": f"rerank-{call.request_id}", "object": "rerank", "model": body.model, "results": results,
           "usage": {"prompt_tokens": result.tokens, "total_tokens": result.tokens},
           "meta": {"billed_units": {"search_units": 1}, "tokens": {"input_tokens": result.tokens,
                                                                  "output_tokens": 0}}}
    return JSONAnswer(orjson.dumps(out), answer_headers(call, call.usage))


def mount(app: FastAPI) -> None:
    """Serve `/v1/rerank` on `app`."""
    app.include_router(router)
