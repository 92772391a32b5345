"""Hybrid search: BM25 and vector candidates fused with weighted reciprocal rank fusion, then
arranged (`keel.knowledge.arrange`: query-term coverage and section grouping over the fused top 30, in
hybrid mode), then (optionally) reranked. Permissions and filters are applied inside each index query and again
when hits are read back, so nothing outside the caller's scope can be returned, counted or ranked.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import sqlalchemy as sa

from keel.core.errors import BadRequest
from keel.identity.principal import Principal
from keel.knowledge import arrange, catalog, long_query
from keel.knowledge.acl import Collection, Scope, filter_conditions
from keel.knowledge.hits import Hit
from keel.knowledge.index import Scored, reading
from keel.observe.tracing import span
from keel.knowledge.parts import Library
from keel.knowledge.rerank import OFF, collection_reranker, for_alias
from keel.knowledge.tables import chunks, documents

__all__ = ["DEFAULT_WEIGHTS", "RRF_K", "VECTOR_FEEDBACK", "Hit", "Query", "rrf", "search"]

# The RRF constant: smaller puts more weight on each leg's top ranks. Chosen on the dev halves
# (bench/retrieval.py, legs computed once and re-fused over a grid of k and BM25 weight): 10 lifted the FAQ
# a little and left the long questions flat, and no cell was clearly better; measured in bench/README.md.
# Requests may set their own (`rrf_k`).
RRF_K = 10
RRF_K_MAX = 1000
# Pseudo-relevance feedback for the vector leg (Rocchio on embeddings), opt-in per request: the leg searches
# again with the query vector moved toward its own best hit, q' = q/|q| + w * e/|e|. w 0.2 was the best on the
# dev halves but did not carry over to the FAQ's test half, so it is not the default (measured in bench/README.md).
VECTOR_FEEDBACK = 0.0
# The BM25 weight against vector 1.0: on the FAQ's validation half (bench/retrieval.py) nDCG@10 is flat from
# 0.1 to 0.25 and falls at 1:1 (measured in bench/README.md); 0.25 keeps exact keyword matches (identifiers,
# codes) weighing on other corpora. Requests may set their own.
DEFAULT_WEIGHTS = {"bm25": 0.25, "vector": 1.0}
MODES = ("hybrid", "bm25", "vector")
# Hits are read back by chunk id this many at a time. With a longer id list SQLite's planner (no ANALYZE
# statistics) switches from chunk primary-key lookups to scanning the collection's documents, which at 100k
# chunks is far slower than several short lookups (measured in bench/README.md).
HYDRATE_BATCH = 10


@dataclass
class Query:
    text: str
    collections: list[str] | None = None
    top_k: int = 5
    filters: dict[str, Any] | None = None
    mode: str = "hybrid"
    weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    candidates: int | None = None
    rerank: str | None = None  # a reranker or chat model alias, "off", or None: the collections' setting
    long_query: str = "off"  # long questions: sub-queries and key terms (keel.knowledge.long_query)
    rrf_k: int = RRF_K  # the fusion constant (see RRF_K)
    vector_feedback: float = VECTOR_FEEDBACK  # > 0: the vector leg's pseudo-relevance feedback (off by default)


def rrf(lists: dict[str, list[Scored]], weights: dict[str, float], k: int = RRF_K) -> list[tuple[int, float]]:
    """Weighted reciprocal rank fusion: score(d) = Σ_m w_m / (k + rank_m(d)), ranks from 1."""
    fused: dict[int, float] = {}
    for method, hits in lists.items():
        w = weights.get(method, 0.0)
        for rank, h in enumerate(hits, 1):
            fused[h.chunk_id] = fused.get(h.chunk_id, 0.0) + w / (k + rank)
    return sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))


def _hydrate(kn: Library, scope: Scope, ids: list[int]) -> dict[int, tuple[Any, np.ndarray | None]]:
    """Chunk + document rows for `ids`, re-checked against the scope (defence in depth)."""
    out: dict[int, tuple[Any, np.ndarray | None]] = {}
    with reading(kn.store) as conn:
        for i in range(0, len(ids), HYDRATE_BATCH):
            q = (sa.select(chunks.c.id, chunks.c.document_id, chunks.c.collection_id, chunks.c.section,
                           chunks.c.page, chunks.c.span_start, chunks.c.span_end, chunks.c.text, chunks.c.embedding,
                           documents.c.title, documents.c.source, documents.c.format)
                 .select_from(chunks.join(documents, documents.c.id == chunks.c.document_id))
                 .where(chunks.c.id.in_(ids[i:i + HYDRATE_BATCH]), scope.documents_where()))
            out.update((r.id, (r, r.embedding)) for r in conn.execute(q))
    return out


def _with_feedback(kn: Library, qv: np.ndarray, first: list[Scored], w: float, scope: Scope,
                   n: int) -> list[Scored]:
    """The vector leg searched again from the query moved toward its best hit (see VECTOR_FEEDBACK)."""
    if not first or w <= 0:
        return first
    with reading(kn.store) as conn:
        emb = conn.execute(sa.select(chunks.c.embedding).where(chunks.c.id == first[0].chunk_id)).scalar()
    if emb is None or len(emb) != len(qv):
        return first
    return kn.index.vector(feedback_vector(qv, np.asarray(emb, np.float32), w), scope, n) or first


def _vector_with_feedback(kn: Library, qv: np.ndarray, w: float, scope: Scope, n: int) -> list[Scored]:
    return _with_feedback(kn, qv, kn.index.vector(qv, scope, n), w, scope, n)


def feedback_vector(q: np.ndarray, best: np.ndarray, w: float) -> np.ndarray:
    """Rocchio on embeddings: the unit vector along q/|q| + w * best/|best|."""
    def unit(v: np.ndarray) -> np.ndarray:
        return v / max(float(np.linalg.norm(v)), 1e-12)

    return unit(unit(np.asarray(q, np.float32)) + w * unit(best))


def _each_vector(kn: Library, vectors: np.ndarray, scope: Scope, n: int) -> list[list[Scored]]:
    return [kn.index.vector(v, scope, n) for v in vectors]


async def search(kn: Library, p: Principal, q: Query, request_id: str) -> tuple[list[Hit], dict[str, Any]]:
    """The hits for `q` the principal may read, best first, and timings in ms; a `retrieval` span when traced."""
    with span("retrieval", {"keel.retrieval.mode": q.mode, "keel.retrieval.top_k": q.top_k}) as s:
        hits, timings = await _search(kn, p, q, request_id)
        if s is not None:
            s.set_attribute("keel.retrieval.hits", len(hits))
            s.set_attribute("keel.retrieval.documents", sorted({h.document_id for h in hits}))
        return hits, timings


async def _search(kn: Library, p: Principal, q: Query, request_id: str) -> tuple[list[Hit], dict[str, Any]]:
    if q.mode not in MODES:
        raise BadRequest(f"unknown mode {q.mode!r}", fix=f"use one of: {', '.join(MODES)}")
    if not 1 <= q.top_k <= 100:
        raise BadRequest("top_k must be between 1 and 100", fix="ask for fewer hits")
    if any(m not in ("bm25", "vector") or not isinstance(w, (int, float)) or w < 0 for m, w in q.weights.items()):
        raise BadRequest("weights must map `bm25` and/or `vector` to non-negative numbers",
                         fix='e.g. "weights": {"bm25": 1.0, "vector": 1.2}')
    if isinstance(q.rrf_k, bool) or not isinstance(q.rrf_k, int) or not 1 <= q.rrf_k <= RRF_K_MAX:
        raise BadRequest(f"rrf_k must be a whole number between 1 and {RRF_K_MAX}",
                         fix=f"leave it out for the default ({RRF_K}), or give e.g. 60 to flatten the legs' top ranks")
    if isinstance(q.vector_feedback, bool) or not isinstance(q.vector_feedback, (int, float)) \
            or not 0 <= q.vector_feedback <= 1:
        raise BadRequest("vector_feedback must be a number between 0 and 1",
                         fix=f"leave it out for the default ({VECTOR_FEEDBACK}), or give 0 to turn it off")
    filter_conditions(q.filters)  # reject malformed filters before any work
    lq = long_query.plan(q.text, q.long_query)
    t0 = time.perf_counter()
    colls = await asyncio.to_thread(catalog.readable, kn.store, p, q.collections)
    scope = Scope(p, tuple(colls), q.filters, bounded_keyword=q.mode == "hybrid")
    timings: dict[str, Any] = {}
    if not colls or not q.text.strip():
        return [], timings
    n = q.candidates or max(50, 4 * q.top_k)
    lists: dict[str, list[Scored]] = {}
    qvecs: dict[str, np.ndarray] = {}
    subvecs: dict[str, np.ndarray] = {}  # long questions: every sub-query's vector
    if lq:
        timings["sub_queries"] = len(lq.dense)

    async def keyword() -> None:
        t = time.perf_counter()
        lists["bm25"] = await asyncio.to_thread(kn.index.keyword, lq.keyword if lq else q.text, scope, n)
        timings["bm25_ms"] = round((time.perf_counter() - t) * 1000, 3)

    async def vector() -> None:
        t = time.perf_counter()
        hits: list[Scored] = []
        by_model: dict[str, list[Collection]] = {}
        for c in colls:
            if c.dims:
                by_model.setdefault(c.embedding_model, []).append(c)
        for model, group in by_model.items():
            vecs = await kn.embed(p, model, lq.dense if lq else [q.text], task_id=request_id,
                                  use_case="knowledge.search", request_id=f"{request_id}/embed/{len(qvecs)}")
            qvecs[model] = vecs[0]
            sub = Scope(p, tuple(group), q.filters)
            if lq:  # one list per sub-query, fused; a hit's similarity is its best over them
                subvecs[model] = vecs
                per = await asyncio.to_thread(_each_vector, kn, vecs, sub, n)
                hits += long_query.fuse(per, n, [long_query.WHOLE_WEIGHT] + [1.0] * (len(per) - 1))
                continue
            if q.vector_feedback > 0:  # one worker-thread hop, not two: each is a wait for a core under load
                hits += await asyncio.to_thread(_vector_with_feedback, kn, qvecs[model], q.vector_feedback, sub, n)
            else:
                hits += await asyncio.to_thread(kn.index.vector, qvecs[model], sub, n)
        hits.sort(key=lambda h: -h.score)
        lists["vector"] = hits[:n]
        timings["vector_ms"] = round((time.perf_counter() - t) * 1000, 3)

    work = []
    if q.mode in ("hybrid", "bm25"):
        work.append(keyword())
    if q.mode in ("hybrid", "vector"):
        work.append(vector())
    await asyncio.gather(*work)
    weights = q.weights if q.mode == "hybrid" else {q.mode: 1.0}
    fused = rrf(lists, weights, q.rrf_k)
    ranks = {m: {h.chunk_id: i for i, h in enumerate(hs, 1)} for m, hs in lists.items()}
    alias = q.rerank if q.rerank is not None else collection_reranker(colls)
    reranker = for_alias(kn.gateway, alias) if alias and alias != OFF else None
    keep = arrange.DEPTH if q.mode == "hybrid" else q.top_k
    want = fused[: max(q.top_k, n if reranker else keep)]
    rows = await asyncio.to_thread(_hydrate, kn, scope, [cid for cid, _ in want])
    by_id = {c.id: c for c in colls}
    hits: list[Hit] = []
    for cid, score in want:
        got = rows.get(cid)
        if got is None:
            continue  # deleted meanwhile, or outside the scope after all
        r, emb = got
        c = by_id[r.collection_id]
        sim = None
        qv = qvecs.get(c.embedding_model)
        if qv is not None and emb is not None and len(emb) == len(qv):
            sim = float(np.dot(emb, qv) / max(float(np.linalg.norm(emb) * np.linalg.norm(qv)), 1e-12))
            if c.embedding_model in subvecs:
                best = float(np.max(subvecs[c.embedding_model] @ emb))  # sub-query vectors are unit length
                sim = max(sim, best / max(float(np.linalg.norm(emb)), 1e-12))
        hits.append(Hit(cid, r.document_id, c, r.title, r.source, r.format, r.section, r.page, r.span_start,
                        r.span_end, r.text, score, ranks.get("bm25", {}).get(cid), ranks.get("vector", {}).get(cid),
                        sim))
    if q.mode == "hybrid":
        hits = arrange.arrange(hits, q.text)
    if reranker is not None and hits:
        t = time.perf_counter()
        depth = max(q.top_k * 2, reranker.depth)
        hits = await reranker.rerank(q.text, hits[:depth], p, request_id) + hits[depth:]
        timings["reranker"] = alias
        timings["rerank_ms"] = round((time.perf_counter() - t) * 1000, 3)
    timings["total_ms"] = round((time.perf_counter() - t0) * 1000, 3)
    if kn.on_retrieval is not None:  # the drift signals: query vector, best similarity, whether anything was found
        kn.on_retrieval(next(iter(qvecs.values()), None),
                        max((h.similarity for h in hits if h.similarity is not None), default=None), len(hits))
    return hits[:q.top_k], timings
