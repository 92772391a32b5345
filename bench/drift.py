"""Drift detection, measured: Keel's query-embedding drift test (`keel.observe.drift`: MMD² with a Gaussian
kernel, permutation p-value; the recent window against the reference window before it) on query streams
with a known shift and without one.

Queries: the Python FAQ's question headings (Debian's python3.11-doc, as bench/retrieval.py reads them) are the
normal traffic; the questions of other projects' FAQs shipped in /usr/share/doc (lsof, sed, zlib, xz, valgrind,
procps, man-db, base-files) are the shift. Each set is halved by a hash of the text: thresholds are chosen on
streams drawn from the dev halves, and reported on streams drawn from the test halves. Queries are embedded
in-process by Keel's own embedding path (the bundled model, `local-embed`), as the live monitor sees them.

A stream is `--length` queries drawn at random (with repeats, like real traffic) from the FAQ half; a shifted
stream, from query `--shift-at` on, takes each query from the other FAQs with probability `--mix`. The test
runs every `--step` queries once the windows are full. Reported: on shifted streams, how many queries after
the shift point the first alarm comes (and any alarm before it); on unshifted streams of the same length, the
share of windows that alarm (the false-alarm rate, target <= 5%). The alpha is the largest candidate whose
dev false-alarm rate is at most half the target.

Prints one JSON line.
    .venv/bin/python bench/drift.py [--streams 6] [--length 600] [--shift-at 400] [--mix 0.5]
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import hashlib
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ingest import boot, corpus, shutdown  # noqa: E402
from retrieval import mask_faq  # noqa: E402
from keel.observe.drift import mmd_permutation  # noqa: E402

OTHER_FAQS = ["lsof/00FAQ.gz", "sed/sedfaq.txt.gz", "zlib1g-dev/FAQ.gz", "xz-utils/faq.txt.gz",
              "valgrind/FAQ.txt.gz", "procps/FAQ.gz", "man-db/FAQ", "base-files/FAQ"]
ALPHAS = (0.005, 0.01, 0.02)
TARGET_FALSE_ALARMS = 0.05
NUMBERING = re.compile(r"^\s*(?:Q[.:]?\s+|\(?\d+(?:\.\d+)*[.)]?\s+)")


def faq_questions() -> list[str]:
    _, queries = mask_faq(corpus(["faq"]))
    return sorted({q for q, _, _ in queries})


def other_questions() -> list[str]:
    out = set()
    for rel in OTHER_FAQS:
        path = Path("/usr/share/doc") / rel
        if not path.is_file():
            continue
        text = gzip.open(path, "rt", errors="replace").read() if path.suffix == ".gz" else path.read_text(errors="replace")
        for line in text.splitlines():
            q = NUMBERING.sub("", line).strip()
            if q.endswith("?") and 15 <= len(q) <= 200 and q[0].isupper():
                out.add(q)
    return sorted(out)


def halves(texts: list[str]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {"dev": [], "test": []}
    for i, t in enumerate(texts):
        out["dev" if int(hashlib.sha256(t.encode()).hexdigest(), 16) % 2 == 0 else "test"].append(i)
    return out


def stream(rng: np.random.Generator, normal: list[int], other: list[int], length: int, shift_at: int | None,
           mix: float) -> list[tuple[str, int]]:
    out = []
    for t in range(length):
        shifted = shift_at is not None and t >= shift_at and rng.random() < mix
        out.append(("other", int(rng.choice(other))) if shifted else ("faq", int(rng.choice(normal))))
    return out


def p_values(vecs: dict[str, np.ndarray], s: list[tuple[str, int]], window: int, reference: int, step: int,
             permutations: int, rng: np.random.Generator) -> list[tuple[int, float]]:
    """(t, p) for each check: the window of queries [t - window, t) against the reference before it."""
    x = np.stack([vecs[kind][i] for kind, i in s])
    return [(t, mmd_permutation(x[t - window - reference:t - window], x[t - window:t], permutations, rng)[1])
            for t in range(window + reference, len(s) + 1, step)]


def measure(vecs: dict[str, np.ndarray], pools: dict[str, list[int]], args: argparse.Namespace,
            seed: int) -> dict[float, dict]:
    rng = np.random.default_rng(seed)
    shifted, unshifted = [], []
    for _ in range(args.streams):
        s = stream(rng, pools["faq"], pools["other"], args.length, args.shift_at, args.mix)
        shifted.append(p_values(vecs, s, args.window, args.reference, args.step, args.permutations, rng))
        s = stream(rng, pools["faq"], pools["other"], args.length, None, args.mix)
        unshifted.append(p_values(vecs, s, args.window, args.reference, args.step, args.permutations, rng))
    out = {}
    for alpha in ALPHAS:
        checks = [p for ps in unshifted for _, p in ps]
        delays, early = [], 0
        for ps in shifted:
            early += any(p < alpha for t, p in ps if t <= args.shift_at)
            after = [t - args.shift_at for t, p in ps if t > args.shift_at and p < alpha]
            if after:
                delays.append(after[0])
        out[alpha] = {"false_alarm_rate": round(sum(p < alpha for p in checks) / len(checks), 4),
                      "unshifted_windows": len(checks), "detected": f"{len(delays)}/{len(shifted)}",
                      "delay_median": statistics.median(delays) if delays else None,
                      "delay_max": max(delays) if delays else None, "shifted_streams_alarmed_before_shift": early}
    return out


async def embed_all(texts: list[str]) -> np.ndarray:
    app, kn, p = await boot(Path(tempfile.mkdtemp(prefix="keel-bench-drift-")) / "data")
    try:
        parts = [await kn.embed(p, "local-embed", texts[i:i + 64], task_id="bench-drift", use_case="bench")
                 for i in range(0, len(texts), 64)]
    finally:
        await shutdown(app)
    return np.vstack(parts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=6)
    ap.add_argument("--length", type=int, default=600)
    ap.add_argument("--shift-at", type=int, default=400)
    ap.add_argument("--mix", type=float, default=0.5)
    ap.add_argument("--window", type=int, default=50)
    ap.add_argument("--reference", type=int, default=200)
    ap.add_argument("--step", type=int, default=10)
    ap.add_argument("--permutations", type=int, default=200)
    args = ap.parse_args()
    faq, other = faq_questions(), other_questions()
    t = time.perf_counter()
    emb = asyncio.run(embed_all(faq + other))
    embed_s = time.perf_counter() - t
    vecs = {"faq": emb[:len(faq)], "other": emb[len(faq):]}
    fh, oh = halves(faq), halves(other)
    t = time.perf_counter()
    dev = measure(vecs, {"faq": fh["dev"], "other": oh["dev"]}, args, seed=1)
    ok = [a for a in ALPHAS if dev[a]["false_alarm_rate"] <= TARGET_FALSE_ALARMS / 2]
    alpha = max(ok) if ok else min(ALPHAS)
    tested = measure(vecs, {"faq": fh["test"], "other": oh["test"]}, args, seed=2)
    test = tested[alpha]
    print(json.dumps({
        "bench": "drift", "signal": "query_embedding", "method": "MMD² Gaussian kernel, permutation p-value",
        "faq_questions": {k: len(v) for k, v in fh.items()}, "other_questions": {k: len(v) for k, v in oh.items()},
        "stream_length": args.length, "shift_at": args.shift_at, "mix": args.mix, "window": args.window,
        "reference": args.reference, "step": args.step, "permutations": args.permutations,
        "streams_per_kind": args.streams, "alpha_chosen_on_dev": alpha,
        "dev": dev[alpha], "test": test, "fires_within_queries": test["delay_max"],
        "test_at_live_alpha_0.01": tested[0.01],  # what Keel's live signal (alpha 0.01) would do
        "false_alarm_rate_le_0.05": test["false_alarm_rate"] <= TARGET_FALSE_ALARMS,
        "embed_s": round(embed_s, 1), "tests_s": round(time.perf_counter() - t, 1)}))


if __name__ == "__main__":
    main()
