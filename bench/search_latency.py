"""Knowledge search latency at 100k chunks, without the reranker, and what a reranker adds for the top 30.

Builds the collection through the real paths: Python's FAQ (python3.11-doc) ingested as one upload would
(`bench/ingest.py`'s `ingest`: parse, chunk, embed), then grown to `--chunks` (default 100,000) with
jittered copies of those chunks written through the index's own `write_document` (FTS5 rows and HNSW
vectors, as ingestion writes them). Queries are the FAQ's questions; each is searched once untimed
(term statistics, pages warm), then timed end to end through `keel.knowledge.search.search` with the
default settings — query embedding included, reranker off — in wall time and in the process's CPU time
(`cpu_p50_ms`/`cpu_p95_ms`: every thread's, so the embedder's too; far steadier than wall time when other
work shares the machine, and roughly what wall time is on an idle one). The baseline in the same run is the same
queries on the ingested collection before it grows (`ratio_p95_vs_seed`), and in every run the query
embedding alone (`query_embed`, what each search pays first), since a shared machine's load moves all
of these together (`loadavg_1m` says how busy it was).

The reranker's added latency for the top 30: no cross-encoder ships in a package, so by default it is
the bundled embedder's graph (all-MiniLM-L6-v2 int8, the encoder `cross-encoder/ms-marco-MiniLM-L-6-v2`
is built on; its head costs next to nothing) scoring each query's real fused top 30 as (query, passage)
pairs through the governed embedding call, as `bench/rerank.py` estimates it; `--rerank ALIAS` instead
times a configured reranker deployment or chat model inside `search` (rerank_ms).

Prints one JSON line.
    .venv/bin/python bench/search_latency.py [--data DIR] [--collection NAME] [--chunks N] [--queries N]
                                             [--rerank ALIAS]
`--data DIR` keeps the store (a later run reuses the grown collection and measures only); `--collection`
names an existing collection in that store to grow instead of ingesting the FAQ.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ingest import boot, corpus, count_chunks, faq_questions, grow, ingest, option, pct, shutdown  # noqa: E402

TOP = 30


async def timed_searches(kn, p, coll: str, queries: list[str],  # noqa: ANN001
                         mode: str = "hybrid", **kw) -> list[float]:  # noqa: ANN003
    from keel.core.ids import new_id
    from keel.knowledge.search import Query, search

    def q(text: str) -> Query:
        return Query(text=text, collections=[coll], top_k=10, mode=mode, rerank=kw.get("rerank", "off"))

    for text in queries:  # untimed pass: steady state
        await search(kn, p, q(text), new_id("req"))
    out, cpu = [], []
    for text in queries:
        t, c = time.perf_counter(), time.process_time()
        await search(kn, p, q(text), new_id("req"))
        out.append((time.perf_counter() - t) * 1000)
        cpu.append((time.process_time() - c) * 1000)
    CPU[mode] = cpu
    return out


CPU: dict[str, list[float]] = {}  # the process's CPU ms per timed search (all its threads), by mode


async def timed_embeds(kn, p, queries: list[str]) -> list[float]:  # noqa: ANN001
    """One query embedding each, through the governed call search makes: what every search pays first."""
    out = []
    for text in queries:
        t = time.perf_counter()
        await kn.embed(p, "local-embed", [text], task_id="bench", use_case="bench")
        out.append((time.perf_counter() - t) * 1000)
    return out


def summary(ms: list[float]) -> dict[str, float]:
    return {"p50_ms": pct(ms, 50), "p95_ms": pct(ms, 95)}


async def rerank_proxy(kn, p, coll: str, queries: list[str]) -> dict:  # noqa: ANN001
    """The embedder graph over each query's fused top 30 as (query, passage) pairs: a cross-encoder's work."""
    from keel.core.ids import new_id
    from keel.knowledge.search import Query, search

    ms, pieces = [], []
    for text in queries:
        hits, _ = await search(kn, p, Query(text=text, collections=[coll], top_k=TOP, rerank="off"), new_id("req"))
        pairs = [f"{text} [SEP] {h.text}" for h in hits]
        t = time.perf_counter()
        await kn.embed(p, "local-embed", pairs, task_id="bench", use_case="bench.rerank")
        ms.append((time.perf_counter() - t) * 1000)
        pieces.append(len(pairs))
    return {"what": "proxy: all-MiniLM-L6-v2 int8 encoder on (query, passage) pairs of the fused top 30",
            "passages": round(sum(pieces) / max(len(pieces), 1), 1), **summary(ms)}


async def main() -> None:
    from keel.knowledge import catalog
    from keel.knowledge.search import RRF_K

    target = int(option("--chunks") or 100_000)
    kept = option("--data")
    coll = option("--collection") or "latency"
    alias = option("--rerank")
    base = Path(kept) if kept else Path(tempfile.mkdtemp(prefix="keel-bench-search-"))
    app, kn, p = await boot(base / "data")
    try:
        queries = faq_questions()
        queries = queries[: int(option("--queries") or len(queries))]
        out: dict = {"bench": "knowledge_search_latency", "queries": len(queries), "rrf_k": RRF_K, "top_k": 10,
                     "reranker": "off"}
        if not catalog.readable(kn.store, p, None) or not any(
                c.name == coll for c in catalog.readable(kn.store, p, None)):
            t = time.perf_counter()
            await ingest(kn, p, coll, corpus(["faq"]))
            out["seed_ingest_s"] = round(time.perf_counter() - t, 1)
        c = catalog.readable(kn.store, p, [coll])[0]
        seed = count_chunks(kn, c)
        if seed < target:
            out["seed_chunks"] = seed
            out["seed_hybrid"] = summary(await timed_searches(kn, p, coll, queries))
            t = time.perf_counter()
            await asyncio.to_thread(grow, kn, c, target)
            kn.index.checkpoint()
            out["grow_s"] = round(time.perf_counter() - t, 1)
        out["chunks"] = count_chunks(kn, c)
        for mode in ("hybrid", "bm25", "vector"):
            out[mode] = summary(await timed_searches(kn, p, coll, queries, mode))
            # CPU per search moves far less with other work on the machine than wall time does
            out[mode].update({f"cpu_{k}": v for k, v in summary(CPU[mode]).items()})
        out["query_embed"] = summary(await timed_embeds(kn, p, queries))  # the same run's baseline: machine load
        out["ratio_hybrid_p95_vs_query_embed_p95"] = round(out["hybrid"]["p95_ms"] / max(out["query_embed"]["p95_ms"],
                                                                                        1e-9), 2)
        out["loadavg_1m"] = round(os.getloadavg()[0], 1)
        out["hybrid_p95_target_50ms"] = out["hybrid"]["p95_ms"] <= 50
        if "seed_hybrid" in out:
            out["ratio_p95_vs_seed"] = round(out["hybrid"]["p95_ms"] / max(out["seed_hybrid"]["p95_ms"], 1e-9), 2)
        few = queries[:3]
        if alias:
            from keel.core.ids import new_id
            from keel.knowledge.search import Query, search

            ms = []
            for text in few:
                _, timings = await search(kn, p, Query(text=text, collections=[coll], top_k=10, rerank=alias),
                                          new_id("req"))
                ms.append(float(timings.get("rerank_ms", 0.0)))
            out["rerank_added"] = {"what": alias, **summary(ms)}
        else:
            out["rerank_added"] = await rerank_proxy(kn, p, coll, few)
    finally:
        await shutdown(app)
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main())
