"""Answers with citations: retrieve, number the passages, ask the model through the gateway, and
return the answer with a citation for every passage it was given. If nothing relevant is found,
say so without calling the model.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from keel.gateway.pipeline import Call
from keel.gateway.protocol import ChatRequest
from keel.identity.principal import Principal
from keel.knowledge.hits import Hit
from keel.knowledge.parts import Library
from keel.knowledge.search import Query, search

NOTHING_FOUND = ("I could not find anything relevant to this question in the collections you can read, "
                 "so I cannot answer it from them.")
SYSTEM = ("You answer questions using only the numbered context passages. Cite the passages you use like [1] or "
          "[2][3]. If the passages do not contain the answer, say that you do not know. Be concise.")
LEVELS = {"public": 0, "internal": 1, "confidential": 2, "restricted": 3}
MIN_SIMILARITY = 0.25
PASSAGE_CHARS = 1500


@dataclass
class AnswerRequest:
    question: str
    collections: list[str] | None = None
    top_k: int = 5
    filters: dict[str, Any] | None = None
    model: str = "local-chat"
    max_tokens: int = 256
    temperature: float = 0.0
    min_similarity: float = MIN_SIMILARITY
    weights: dict[str, float] | None = None
    rerank: str | None = None
    long_query: str = "off"


def citation(n: int, h: Hit, cited: bool) -> dict[str, Any]:
    return {"n": n, "document_id": h.document_id, "chunk_id": h.chunk_id, "collection": h.collection.name,
            "classification": h.collection.classification, "title": h.title, "source": h.source,
            "section": h.section, "page": h.page, "span": {"start": h.start, "end": h.end}, "score": round(h.score, 6),
            "similarity": None if h.similarity is None else round(h.similarity, 6), "cited": cited,
            "text": h.text}


def _context(hits: list[Hit]) -> str:
    parts = []
    for n, h in enumerate(hits, 1):
        where = " — ".join(x for x in (h.title, h.section.split(" > ")[-1] if h.section else "") if x)
        if h.page:
            where += f", page {h.page}"
        parts.append(f"[{n}] ({where})\n{h.text[:PASSAGE_CHARS]}")
    return "\n\n".join(parts)


async def retrieve(kn: Library, p: Principal, req: AnswerRequest, request_id: str) -> list[Hit]:
    q = Query(text=req.question, collections=req.collections, top_k=req.top_k, filters=req.filters,
              rerank=req.rerank, long_query=req.long_query, **({"weights": req.weights} if req.weights else {}))
    hits, _ = await search(kn, p, q, request_id)
    return [h for h in hits if h.similarity is None or h.similarity >= req.min_similarity]


def _call(p: Principal, req: AnswerRequest, hits: list[Hit], request_id: str, stream: bool) -> Call:
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"Context:\n{_context(hits)}\n\nQuestion: {req.question}"}]
    level = max((h.collection.classification for h in hits), key=lambda c: LEVELS.get(c, 0))
    return Call(request_id=f"{request_id}/answer", principal=p, kind="chat", alias=req.model,
                chat=ChatRequest(model=req.model, messages=messages, max_tokens=req.max_tokens,
                                 temperature=req.temperature, stream=stream, include_usage=stream),
                metadata={"use_case": "knowledge.answer", "task_id": request_id, "classification": level},
                annotations={
                    "retrieved_chunks": [h.chunk_id for h in hits],
                    # governance reads these: the data classification of every collection in the prompt,
                    # and the passages (verbatim in the prompt) its context guards judge on their own
                    "collections": list({h.collection.id: {"id": h.collection.id,
                                                           "classification": h.collection.classification}
                                         for h in hits}.values()),
                    "passages": [{"id": h.chunk_id, "text": h.text[:PASSAGE_CHARS]} for h in hits]})


def _cited(text: str, n: int) -> set[int]:
    return {int(m) for m in re.findall(r"\[(\d+)\]", text or "") if 1 <= int(m) <= n}


async def answer(kn: Library, p: Principal, req: AnswerRequest, request_id: str) -> dict[str, Any]:
    hits = await retrieve(kn, p, req, request_id)
    if not hits:
        return {"object": "answer", "answer": NOTHING_FOUND, "found": False, "citations": [], "model": None,
                "usage": None}
    result = await kn.gateway.chat(_call(p, req, hits, request_id, stream=False))
    used = _cited(result.content or "", len(hits))
    return {"object": "answer", "answer": result.content or "", "found": True, "model": req.model,
            "finish_reason": result.finish_reason,
            "citations": [citation(n, h, n in used) for n, h in enumerate(hits, 1)],
            "usage": {"prompt_tokens": result.usage.prompt_tokens, "completion_tokens": result.usage.completion_tokens}}


async def answer_stream(kn: Library, p: Principal, req: AnswerRequest,
                        request_id: str) -> tuple[list[Hit], AsyncIterator[dict[str, Any]]]:
    """Retrieve now (so errors become a normal problem response), then stream events:
    `citations` first, `delta`s with text, and `done` with which passages were cited."""
    hits = await retrieve(kn, p, req, request_id)

    async def events() -> AsyncIterator[dict[str, Any]]:
        if not hits:
            yield {"type": "citations", "found": False, "citations": []}
            yield {"type": "delta", "content": NOTHING_FOUND}
            yield {"type": "done", "found": False, "cited": [], "usage": None}
            return
        yield {"type": "citations", "found": True, "citations": [citation(n, h, False) for n, h in enumerate(hits, 1)]}
        text, usage = [], None
        async for delta in kn.gateway.chat_stream(_call(p, req, hits, request_id, stream=True)):
            if delta.content:
                text.append(delta.content)
                yield {"type": "delta", "content": delta.content}
            if delta.usage is not None:
                usage = {"prompt_tokens": delta.usage.prompt_tokens, "completion_tokens": delta.usage.completion_tokens}
        yield {"type": "done", "found": True, "cited": sorted(_cited("".join(text), len(hits))), "usage": usage}

    return hits, events()
