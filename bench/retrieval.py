"""Retrieval quality of knowledge search on the Python FAQ: BM25-only, vector-only and hybrid, one run.

Corpus: Debian's python3.11-doc reST sources (`apt-get install python3.11-doc`): the FAQ plus, as
distractors, the tutorial, HOWTOs, language reference, "using", "extending" and packaging
guides (the library reference and "what's new" are left out to keep the run to minutes on two
cores; `--full` takes the whole tree). Each FAQ question heading is a query; its answer section
is the relevant passage. The heading text is replaced by a neutral label ("Question 17") before
ingestion so the query never appears verbatim in the index.

Metrics per method: recall@5, MRR@10, nDCG@10 (binary gains over chunks of the answer section).
The RRF weight of BM25 against vector (vector fixed at 1) is chosen on a validation half of the
queries; all numbers are reported on the other (test) half. Target: hybrid beats both single
methods on nDCG@10. Runs in-process on the real code paths (ingest job, gateway, search).

Prints one JSON line.    .venv/bin/python bench/retrieval.py [--full]
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ingest import boot, corpus, ingest, shutdown  # noqa: E402

DISTRACTORS = ["faq", "tutorial", "howto", "reference", "using", "extending", "installing", "distributing",
               "distutils", "install"]
WEIGHT_GRID = [0.1, 0.15, 0.25, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0]
K = 10


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


def scores(hits: list[dict], source: str, label: str, n_relevant: int) -> tuple[float, float, float]:
    rel = [h["source"] == source and h["section"].split(" > ")[-1] == label for h in hits[:K]]
    recall5 = 1.0 if any(rel[:5]) else 0.0
    mrr = next((1 / (i + 1) for i, r in enumerate(rel) if r), 0.0)
    dcg = sum(1 / math.log2(i + 2) for i, r in enumerate(rel) if r)
    ideal = sum(1 / math.log2(i + 2) for i in range(min(n_relevant, K)))
    return recall5, mrr, dcg / ideal if ideal else 0.0


def mean3(rows: list[tuple[float, float, float]]) -> dict[str, float]:
    n = max(len(rows), 1)
    return {"recall@5": round(sum(r[0] for r in rows) / n, 4), "mrr@10": round(sum(r[1] for r in rows) / n, 4),
            "ndcg@10": round(sum(r[2] for r in rows) / n, 4)}


async def main() -> None:
    import sqlalchemy as sa

    from keel.core.ids import new_id
    from keel.knowledge.search import Query, search
    from keel.knowledge.tables import chunks, documents

    full = "--full" in sys.argv
    files, queries = mask_faq(corpus(None if full else DISTRACTORS))
    base = Path(tempfile.mkdtemp(prefix="keel-bench-retrieval-"))
    app, kn, p = await boot(base / "data")
    try:
        t0 = time.perf_counter()
        await ingest(kn, p, "pydocs", files)
        ingest_s = time.perf_counter() - t0
        with kn.store.engine.connect() as conn:
            rows = conn.execute(sa.select(documents.c.source, chunks.c.section).select_from(
                chunks.join(documents, documents.c.id == chunks.c.document_id))).all()
        relevant: dict[tuple[str, str], int] = {}
        for r in rows:
            key = (r.source, r.section.split(" > ")[-1])
            relevant[key] = relevant.get(key, 0) + 1
        queries = [q for q in queries if relevant.get((q[1], q[2]))]
        half = {q: int(hashlib.sha256(q[0].encode()).hexdigest(), 16) % 2 for q in queries}
        val = [q for q in queries if half[q] == 0]
        test = [q for q in queries if half[q] == 1]

        async def run(qs, mode: str, weights=None) -> list[tuple[float, float, float]]:  # noqa: ANN001
            out = []
            for text, source, label in qs:
                hits, _ = await search(kn, p, Query(text=text, collections=["pydocs"], top_k=K, mode=mode,
                                                    **({"weights": weights} if weights else {})), new_id("req"))
                out.append(scores([h.public() for h in hits], source, label, relevant[(source, label)]))
            return out

        tuning = {}
        for w in WEIGHT_GRID:
            tuning[w] = mean3(await run(val, "hybrid", {"bm25": w, "vector": 1.0}))["ndcg@10"]
        best = max(WEIGHT_GRID, key=lambda w: (tuning[w], -abs(w - 1.0)))
        chosen = {"bm25": best, "vector": 1.0}
        result = {"bm25": mean3(await run(test, "bm25")), "vector": mean3(await run(test, "vector")),
                  "hybrid": mean3(await run(test, "hybrid", chosen)),
                  "hybrid_equal_weights": mean3(await run(test, "hybrid", {"bm25": 1.0, "vector": 1.0}))}
        out = {"bench": "knowledge_retrieval", "corpus_docs": len(files), "chunks": len(rows),
               "queries_validation": len(val), "queries_test": len(test), "ingest_s": round(ingest_s, 1),
               "weights_chosen": chosen, "validation_ndcg@10_by_bm25_weight": tuning, **result,
               "hybrid_beats_both_ndcg@10": result["hybrid"]["ndcg@10"] > max(result["bm25"]["ndcg@10"],
                                                                             result["vector"]["ndcg@10"])}
    finally:
        await shutdown(app)
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main())
