"""Retrieval quality of knowledge search: a strong BM25 (`bm25s`, Snowball stemmer, English stop words),
Keel's BM25 leg, dense, hybrid, and hybrid with long-question handling, on two query sets, one run.

Corpus: Debian's python3.11-doc reST sources (`make bench-deps` installs them): the FAQ plus, as
distractors, the tutorial, HOWTOs, language reference, "using", "extending" and packaging guides
(the library reference and "what's new" are left out to keep the run to minutes on two cores;
`--full` takes the whole tree). Each FAQ question heading is replaced by a neutral label
("Question 17") before ingestion so the query never appears verbatim in the index.

Query sets, test halves reported (the other halves are for tuning, `--tune`):
- FAQ: each FAQ question heading is a query; its answer section is relevant. Halves by a hash of the text.
- Long: bench/data/long_questions.jsonl, paragraphs that tell a situation before they ask (66,
  written from the packaged docs' HOWTOs, tutorial, reference and "using" pages, not from the FAQ's
  phrasing), each with its relevant sections marked; halves `dev` / `test` in the file
  (bench/data/README.md says how it was built).

Methods: `hybrid` is what search returns by default (fused, then arranged: keel.knowledge.arrange);
`hybrid_fused` the same fused list without the arrangement, for comparison.

Metrics per method (binary gains over chunks): nDCG@10 (every chunk of a relevant section is
relevant) and recall@10 (share of the relevant sections with a chunk in the top 10). The strong
BM25 indexes the same chunk texts (section path + text) Keel's keyword index holds. Runs in-process
on the real code paths (ingest job, gateway, search), on the embedded index.

Prints one JSON line.
    .venv/bin/python bench/retrieval.py [--full] [--data DIR] [--limit N] [--tune] [--export-faq-dev FILE]
`--data DIR` keeps the store in DIR and reuses it on the next run (no re-ingest); `--limit N` runs
the first N queries of each set (for development); `--tune` also reports the dev halves over a
grid of long-question settings, BM25 weights, the RRF constant, the vector leg's feedback and the
arrangement's coverage weight. `--export-faq-dev FILE` writes the FAQ dev half as an eval dataset and reports
its hybrid scores (`faq_dev_hybrid`): `keel eval run FILE --collection pydocs --rerank off` on the same store
(`--data DIR`) reproduces them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ingest import boot, corpus, ingest, shutdown  # noqa: E402
from keel.observe.evals_metrics import ndcg_at_k, recall_at_k  # noqa: E402

DISTRACTORS = ["faq", "tutorial", "howto", "reference", "using", "extending", "installing", "distributing",
               "distutils", "install"]
LONG_SET = Path(__file__).resolve().parent / "data" / "long_questions.jsonl"
K = 10
Key = tuple[str, str]  # (source, section label: the last element of the section path)


def mask_faq(files: list[tuple[str, bytes]]) -> tuple[list[tuple[str, bytes]], list[tuple[str, str, str]]]:
    """Replace each FAQ question heading by `Question N`; returns (files, [(query, source, label)])."""
    out, queries = [], []
    for source, data in files:
        if not source.startswith("faq/"):
            out.append((source, data))
            continue
        lines = data.decode("utf-8", "replace").splitlines()
        for i in range(len(lines) - 1):
            title, under = lines[i].strip(), lines[i + 1].strip()
            if title and re.fullmatch(r"-{3,}", under) and len(under) >= len(title):
                label = f"Question {len(queries) + 1}"
                queries.append((title, source, label))
                lines[i] = label
        out.append((source, ("\n".join(lines) + "\n").encode()))
    return out, queries


def score(keys: list[Key], relevant: set[Key], n_chunks: dict[Key, int]) -> tuple[float, float]:
    """(nDCG@10, recall@10) of a ranked list of chunk keys: Keel's eval metrics (`keel eval run` computes the
    same), every chunk of a relevant section relevant."""
    flags = [k in relevant for k in keys]
    return ndcg_at_k(flags, sum(n_chunks.get(k, 0) for k in relevant), K), recall_at_k(keys, relevant, K)


def mean2(rows: list[tuple[float, float]]) -> dict[str, float]:
    n = max(len(rows), 1)
    return {"ndcg@10": round(sum(r[0] for r in rows) / n, 4), "recall@10": round(sum(r[1] for r in rows) / n, 4)}


def export_dataset(path: Path, queries: list[tuple[str, set[Key]]], n_chunks: dict[Key, int]) -> None:
    """JSONL for `keel eval run`: each question with its relevant sections and their chunk counts, so the eval's
    nDCG@10 has the same ideal ranking as `score` (every chunk of a relevant section relevant)."""
    with path.open("w") as f:
        for text, rel in queries:
            f.write(json.dumps({"question": text, "relevant": [
                {"source": s, "section": label, "chunks": n_chunks[(s, label)]} for s, label in sorted(rel)]}) + "\n")


def load_long(faq_labels: dict[Key, str]) -> list[tuple[str, str, set[Key]]]:
    """(question, split, relevant keys) from the long-question set; FAQ headings become their masked labels."""
    out = []
    for line in LONG_SET.read_text().splitlines():
        q = json.loads(line)
        rel = {(r["source"], faq_labels.get((r["source"], r["section"]), r["section"])) for r in q["relevant"]}
        out.append((q["question"], q["split"], rel))
    return out


class StrongBM25:
    """bm25s over the chunks' section path + text, Snowball English stemmer, English stop words."""

    def __init__(self, rows: list) -> None:  # noqa: ANN001
        import bm25s
        import Stemmer

        self.bm25s = bm25s
        self.stemmer = Stemmer.Stemmer("english")
        self.keys = [(r.source, r.section.split(" > ")[-1]) for r in rows]
        corpus_tokens = bm25s.tokenize([f"{r.section}\n{r.text}" for r in rows], stopwords="en",
                                       stemmer=self.stemmer, show_progress=False)
        self.retriever = bm25s.BM25()
        self.retriever.index(corpus_tokens, show_progress=False)

    def search(self, text: str) -> list[Key]:
        tokens = self.bm25s.tokenize([text], stopwords="en", stemmer=self.stemmer, show_progress=False)
        if not tokens.vocab:
            return []
        docs, _ = self.retriever.retrieve(tokens, k=K, show_progress=False)
        return [self.keys[int(i)] for i in docs[0]]


async def main() -> None:
    import sqlalchemy as sa

    from keel.core.ids import new_id
    from keel.knowledge import arrange
    from keel.knowledge.search import Query, search
    from keel.knowledge.tables import chunks, documents

    full = "--full" in sys.argv
    limit = int(sys.argv[sys.argv.index("--limit") + 1]) if "--limit" in sys.argv else None
    data = Path(sys.argv[sys.argv.index("--data") + 1]) if "--data" in sys.argv else None
    files, faq = mask_faq(corpus(None if full else DISTRACTORS))
    base = data or Path(tempfile.mkdtemp(prefix="keel-bench-retrieval-"))
    reuse = (base / "data").is_dir()
    app, kn, p = await boot(base / "data")
    try:
        t0 = time.perf_counter()
        if not reuse:
            await ingest(kn, p, "pydocs", files)
        ingest_s = time.perf_counter() - t0
        with kn.store.engine.connect() as conn:
            rows = conn.execute(sa.select(documents.c.source, chunks.c.section, chunks.c.text).select_from(
                chunks.join(documents, documents.c.id == chunks.c.document_id)).order_by(chunks.c.id)).all()
        n_chunks: dict[Key, int] = {}
        for r in rows:
            key = (r.source, r.section.split(" > ")[-1])
            n_chunks[key] = n_chunks.get(key, 0) + 1
        faq_sets = {"val": [], "test": []}
        for text, source, label in faq:
            if n_chunks.get((source, label)):
                half = int(hashlib.sha256(text.encode()).hexdigest(), 16) % 2
                faq_sets["val" if half == 0 else "test"].append((text, {(source, label)}))
        labels = {(source, text): label for text, source, label in faq}
        long_sets = {"dev": [], "test": []}
        for text, split, rel in load_long(labels):
            if any(n_chunks.get(k) for k in rel):
                long_sets[split].append((text, rel))
        if limit:
            faq_sets = {k: v[:limit] for k, v in faq_sets.items()}
            long_sets = {k: v[:limit] for k, v in long_sets.items()}
        t = time.perf_counter()
        strong = StrongBM25(rows)
        bm25s_index_s = time.perf_counter() - t

        async def keel(qs, mode: str, lq: str = "off", **kw) -> dict[str, float]:  # noqa: ANN001, ANN003
            out = []
            for text, rel in qs:
                hits, _ = await search(kn, p, Query(text=text, collections=["pydocs"], top_k=K, mode=mode,
                                                    long_query=lq, rerank="off", **kw), new_id("req"))
                out.append(score([(h.source, h.section.split(" > ")[-1]) for h in hits], rel, n_chunks))
            return mean2(out)

        async def fused_only(qs) -> dict[str, float]:  # noqa: ANN001
            """Hybrid as fused, without the arrangement (keel.knowledge.arrange) that follows by default."""
            saved = arrange.DEPTH
            arrange.DEPTH = 0
            try:
                return await keel(qs, "hybrid")
            finally:
                arrange.DEPTH = saved

        def bm25s_run(qs) -> dict[str, float]:  # noqa: ANN001
            return mean2([score(strong.search(text), rel, n_chunks) for text, rel in qs])

        async def methods(qs) -> dict[str, dict[str, float]]:  # noqa: ANN001
            return {"bm25s_strong": bm25s_run(qs), "keel_bm25": await keel(qs, "bm25"),
                    "dense": await keel(qs, "vector"), "hybrid_fused": await fused_only(qs),
                    "hybrid": await keel(qs, "hybrid"),
                    "hybrid_long_query": await keel(qs, "hybrid", "auto"),
                    "dense_long_query": await keel(qs, "vector", "on"),
                    "keel_bm25_key_terms": await keel(qs, "bm25", "on")}

        t = time.perf_counter()
        faq_test = await methods(faq_sets["test"])
        long_test = await methods(long_sets["test"])
        queries_s = time.perf_counter() - t
        out = {"bench": "knowledge_retrieval", "corpus_docs": len(files), "chunks": len(rows),
               "chunker": _chunker(kn), "ingest_s": round(ingest_s, 1),
               "bm25s_index_s": round(bm25s_index_s, 2), "queries_s": round(queries_s, 1),
               "faq_queries_test": len(faq_sets["test"]), "long_queries_test": len(long_sets["test"]),
               "faq_test": faq_test, "long_test": long_test,
               "faq_hybrid_ndcg@10_target_0.70": faq_test["hybrid"]["ndcg@10"] >= 0.70,
               "long_ratio_hybrid_long_query_over_bm25s": round(
                   long_test["hybrid_long_query"]["ndcg@10"] / max(long_test["bm25s_strong"]["ndcg@10"], 1e-9), 3),
               "long_ratio_hybrid_over_bm25s": round(
                   long_test["hybrid"]["ndcg@10"] / max(long_test["bm25s_strong"]["ndcg@10"], 1e-9), 3)}
        if "--tune" in sys.argv:
            out["dev"] = await tune(kn, keel, bm25s_run, faq_sets["val"], long_sets["dev"])
        if "--export-faq-dev" in sys.argv:  # the FAQ dev half as a `keel eval run` dataset, and its hybrid score
            export_dataset(Path(sys.argv[sys.argv.index("--export-faq-dev") + 1]), faq_sets["val"], n_chunks)
            out["faq_dev_hybrid"] = await keel(faq_sets["val"], "hybrid")
    finally:
        await shutdown(app)
    print(json.dumps(out))


def _chunker(kn) -> str | None:  # noqa: ANN001
    import sqlalchemy as sa

    from keel.knowledge.tables import collections

    with kn.store.engine.connect() as conn:
        return conn.execute(sa.select(collections.c.chunker).where(collections.c.name == "pydocs")).scalar()


async def tune(kn, keel, bm25s_run, faq_val, long_dev) -> dict:  # noqa: ANN001
    """Dev-half numbers over the long-question settings (module constants, changed for the run)."""
    from keel.knowledge import arrange, long_query

    saved_coverage = arrange.COVERAGE_WEIGHT
    res: dict = {"long_bm25s_strong": bm25s_run(long_dev), "long_hybrid": await keel(long_dev, "hybrid"),
                 "faq_hybrid": await keel(faq_val, "hybrid")}
    saved = (long_query.KEY_TERMS, long_query.WHOLE_WEIGHT)
    try:
        for terms in (16, 32, 64):
            long_query.KEY_TERMS = terms
            res[f"long_bm25_key_terms_{terms}"] = await keel(long_dev, "bm25", "on")
        long_query.KEY_TERMS = saved[0]
        for w in (1.0, 8.0):
            long_query.WHOLE_WEIGHT = w
            res[f"long_dense_whole_weight_{w}"] = await keel(long_dev, "vector", "on")
        long_query.WHOLE_WEIGHT = saved[1]
        for w in (0.25, 0.5, 1.0):
            res[f"long_hybrid_long_query_bm25_weight_{w}"] = await keel(
                long_dev, "hybrid", "on", weights={"bm25": w, "vector": 1.0})
            res[f"faq_hybrid_bm25_weight_{w}"] = await keel(faq_val, "hybrid", "off", weights={"bm25": w, "vector": 1.0})
        for k in (10, 30, 60):  # the fusion constant (keel.knowledge.search.RRF_K)
            res[f"faq_hybrid_rrf_k_{k}"] = await keel(faq_val, "hybrid", rrf_k=k)
            res[f"long_hybrid_rrf_k_{k}"] = await keel(long_dev, "hybrid", rrf_k=k)
        for w in (0.2, 0.5):  # the vector leg's pseudo-relevance feedback (opt-in)
            res[f"faq_hybrid_vector_feedback_{w}"] = await keel(faq_val, "hybrid", vector_feedback=w)
            res[f"long_hybrid_vector_feedback_{w}"] = await keel(long_dev, "hybrid", vector_feedback=w)
        for w in (0.0, 0.04, 0.16):  # the arrangement's query-term coverage weight (keel.knowledge.arrange)
            arrange.COVERAGE_WEIGHT = w
            res[f"faq_hybrid_coverage_{w}"] = await keel(faq_val, "hybrid")
            res[f"long_hybrid_coverage_{w}"] = await keel(long_dev, "hybrid")
    finally:
        long_query.KEY_TERMS, long_query.WHOLE_WEIGHT = saved
        arrange.COVERAGE_WEIGHT = saved_coverage
    return res


if __name__ == "__main__":
    asyncio.run(main())
