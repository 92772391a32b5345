"""The latency a cross-encoder reranker adds to a search: scoring the fused top 30 passages for one query.

With `--path DIR` (an ONNX cross-encoder export: model.onnx + tokenizer.json) it times `local_rerank`
itself. Without one (no cross-encoder ships in a package) it times the same work on the bundled embedder's
graph — all-MiniLM-L6-v2 int8, the encoder that `cross-encoder/ms-marco-MiniLM-L-6-v2` is built on, plus a
head of negligible cost — on the same (query, passage) pairs, as an estimate of what that reranker adds.
Passages are 30 chunks of ~200 words from Python's FAQ (python3.11-doc), queries the FAQ's questions;
the baseline in the same run is one query embedding (what search already pays).

Prints one JSON line.    .venv/bin/python bench/rerank.py [--path DIR] [--threads N] [--rounds N] [--max-length N]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from keel.core.settings import DeploymentConfig  # noqa: E402
from keel.gateway.protocol import ProviderContext  # noqa: E402
from keel.gateway.providers.local_embed import LocalEmbedProvider  # noqa: E402
from keel.gateway.providers.local_rerank import LocalRerankProvider  # noqa: E402

FAQ = Path("/usr/share/doc/python3.11/html/_sources/faq")
TOP = 30


def passages_and_queries() -> tuple[list[str], list[str]]:
    if not FAQ.is_dir():
        sys.exit("no python3.11-doc sources: apt-get install -y python3.11-doc")
    text = " ".join(p.read_text(errors="replace") for p in sorted(FAQ.glob("*.txt")))
    queries = [q.strip() for q in re.findall(r"\n([^\n]+\?)\n-{3,}", text)][:20]
    words = text.split()
    passages = [" ".join(words[i:i + 200]) for i in range(0, len(words) - 200, 200)][:TOP]
    return passages, queries


def timed(fn, rounds: int) -> list[float]:  # noqa: ANN001
    fn()  # warm
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--path", help="an ONNX cross-encoder directory; default: the embedder graph as a proxy")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--max-length", type=int, default=512, help="word pieces per (query, passage) pair")
    args = ap.parse_args()
    passages, queries = passages_and_queries()
    ctx = ProviderContext(get_secret=lambda name: "", threads=args.threads)
    embed = LocalEmbedProvider(DeploymentConfig(alias="e", provider="local_embed", kind="embedding",
                                                options={"max_length": args.max_length}), ctx)
    if args.path:
        rr = LocalRerankProvider(DeploymentConfig(alias="r", provider="local_rerank", kind="rerank", path=args.path,
                                                  options={"max_length": args.max_length}), ctx)
        what = f"local_rerank {args.path}"

        def rerank(q: str) -> None:
            rr.score_sync(q, passages)
    else:
        what = f"proxy: all-MiniLM-L6-v2 int8 encoder on (query, passage) pairs, {args.max_length} pieces max"

        def rerank(q: str) -> None:
            embed.embed_sync([f"{q} [SEP] {p}" for p in passages])
    qi = iter(range(10**9))
    ms = timed(lambda: rerank(queries[next(qi) % len(queries)]), args.rounds)
    base = timed(lambda: embed.embed_sync([queries[next(qi) % len(queries)]]), args.rounds)
    pieces = np.mean([embed.count_tokens([{"role": "user", "content": f"{queries[0]} [SEP] {p}"}])
                      for p in passages])
    print(json.dumps({"what": what, "top": TOP, "threads": args.threads, "rounds": args.rounds,
                      "max_length": args.max_length,
                      "mean_pieces_per_pair": round(float(pieces), 1),
                      "rerank_ms_p50": round(statistics.median(ms), 1), "rerank_ms_max": round(max(ms), 1),
                      "query_embed_ms_p50": round(statistics.median(base), 2),
                      "ratio_rerank_vs_query_embed": round(statistics.median(ms) / statistics.median(base), 1)}))


if __name__ == "__main__":
    main()
