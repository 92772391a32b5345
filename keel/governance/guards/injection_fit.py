"""Fitting and judging the injection classifier (training and bench only: needs scikit-learn and scipy).

The model is scikit-learn's `SGDClassifier` with log loss (a logistic regression; class-balanced,
seeded) over exactly the hashed features the guard computes at serving time (`features.featurize`,
each row scaled by 1/√max(n, MIN_EVIDENCE)) plus one 0/1 column per structural signal. Its regularisation `alpha` and the decision threshold
are chosen on validation splits only: the threshold maximises the mean F1 over the validation corpora
that hold attacks, subject to every validation corpus that holds benign texts staying at or under
MAX_VAL_FPR. Probabilities are computed as the guard computes them (`injection.segment_logits`: worst
segment, minimum-evidence shrink of short segments, 1.0 where a rule fires).

With `semantic=True` the design gains the 384 dimensions of the guard's sentence vector (`semantic.embed`,
cached under /tmp by text hash), and one threshold is chosen per channel (CHANNEL_OF): `direct` on the
corpora of user prompts, `indirect` on the corpora of injected documents and tool outputs, both under the
benign corpora's FPR limit.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import sparse
from sklearn.linear_model import SGDClassifier

from keel.governance.guards import features, signals
from keel.governance.guards.injection import rule_hit, segment_logits

EMB_CACHE = Path(os.environ.get("KEEL_INJECTION_EMB_CACHE", "/tmp/keel-injection-embeddings.npz"))
MIN_EVIDENCE = 64.0  # features (char 3–5-grams + words): about a five-word sentence
MIN_WORDS = 4  # segments of fewer words are shrunk towards PRIOR_LOGIT (one word: to a quarter)
PRIOR_LOGIT = -3.0  # about 5%: the share of attacks a busy gateway might see, not a tuned figure
MAX_VAL_FPR = 0.04
# Per channel: a document is judged segment by segment, so its false-positive chance grows with its length
# (an 11-sentence runbook at a 4% per-segment rate is flagged a third of the time): stricter for the
# indirect channel, whose texts are the long ones.
MAX_VAL_FPR_BY_CHANNEL = {"direct": 0.04, "indirect": 0.01}
F1_SLACK = 0.002  # of the thresholds within this of the best mean F1, the highest (fewest false positives)
ALPHA_GRID = (3e-6, 1e-5, 3e-5)


def embeddings(texts: Sequence[str], batch: int = 256) -> np.ndarray:
    """The guard's sentence vectors (`semantic.embed`) of `texts`, cached by text hash in EMB_CACHE (computing
    them is most of a training run's time on a small machine)."""
    from keel.governance.guards import semantic

    cache: dict[str, np.ndarray] = {}
    if EMB_CACHE.exists():
        with np.load(EMB_CACHE) as z:
            cache = dict(zip(z["keys"].tolist(), z["vecs"]))
    keys = [hashlib.sha1(t.encode("utf-8", "surrogatepass")).hexdigest() for t in texts]
    missing = list({k: t for k, t in zip(keys, texts) if k not in cache}.items())  # in the order given
    for i in range(0, len(missing), batch):
        part = missing[i:i + batch]
        for (k, _), v in zip(part, semantic.embed([t for _, t in part])):
            cache[k] = v
        print(f"embedded {min(i + batch, len(missing))}/{len(missing)}", file=sys.stderr)
        if (i // batch) % 4 == 3 or i + batch >= len(missing):
            np.savez(EMB_CACHE, keys=np.array(list(cache)), vecs=np.stack(list(cache.values())))
    return np.stack([cache[k] for k in keys]) if keys else np.zeros((0, semantic.DIM), np.float32)


CHANNEL_OF = {"s-labs": "direct", "neuralchemy": "direct", "yanismiraoui": "direct", "agentdojo": "indirect",
              # None: texts both channels see (requests and document prose)
              "benign-requests": None, "benign-pydocs": None, "benign-readmes": None,
              "benign-translations": None}
BAND_PERCENTILES = (0.5, 99.5)


def design(texts: Sequence[str], min_evidence: float = MIN_EVIDENCE,
           emb: np.ndarray | None = None) -> sparse.csr_matrix:
    rows, cols, vals = [], [], []
    for i, t in enumerate(texts):
        b, _ = features.featurize(t, [(0, len(t))])
        rows.append(np.full(len(b), i))
        cols.append(b)
        vals.append(np.full(len(b), 1 / np.sqrt(max(len(b), min_evidence, 1.0))))
    m = sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                          shape=(len(texts), 1 << features.BITS))
    m.sum_duplicates()
    parts = [m, signal_columns(texts)] + ([sparse.csr_matrix(emb.astype(np.float64))] if emb is not None else [])
    return sparse.hstack(parts).tocsr()


def signal_columns(texts: Sequence[str]) -> sparse.csr_matrix:
    """One 0/1 column per structural signal (signals.NAMES), after the hashed n-gram columns."""
    rows, cols = [], []
    for i, t in enumerate(texts):
        for n in signals.fired(t):
            rows.append(i)
            cols.append(signals.NAMES.index(n))
    return sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(texts), len(signals.NAMES)))


class Featured:
    """Texts with what scoring needs computed once: the design matrix, rule hits, sentence vectors."""

    def __init__(self, texts: Sequence[str], labels: Sequence[int], semantic: bool = False) -> None:
        self.texts = list(texts)
        self.y = np.asarray(labels, dtype=np.int64)
        self.emb = embeddings(self.texts) if semantic else None
        self.x = design(self.texts, emb=self.emb)
        self.ruled = np.array([rule_hit(features.normalise(t)) is not None for t in self.texts])

    def subset(self, n: int, seed: int = 7) -> "Featured":
        """A seeded sample of at most `n` rows (same features, nothing recomputed)."""
        if len(self.texts) <= n:
            return self
        idx = np.sort(np.random.default_rng(seed).choice(len(self.texts), n, replace=False))
        out = Featured.__new__(Featured)
        out.texts = [self.texts[i] for i in idx]
        out.y, out.x, out.ruled = self.y[idx], self.x[idx], self.ruled[idx]
        out.emb = None if self.emb is None else self.emb[idx]
        return out


def fit(x: sparse.csr_matrix, y: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    clf = SGDClassifier(loss="log_loss", alpha=alpha, max_iter=15, tol=None, class_weight="balanced",
                        random_state=0)
    clf.fit(x, y)
    return clf.coef_[0].astype(np.float64), float(clf.intercept_[0])


def quantise(w: np.ndarray) -> tuple[np.ndarray, float]:
    scale = float(np.abs(w).max() / 127) or 1.0
    return np.clip(np.round(w / scale), -127, 127).astype(np.int8), scale


def split_weights(w: np.ndarray) -> tuple[np.ndarray, dict[str, float], np.ndarray | None]:
    """(hashed n-gram weights, {signal: weight}, sentence-vector weights or None)."""
    dim = 1 << features.BITS
    n = len(signals.NAMES)
    sem = w[dim + n:] if len(w) > dim + n else None
    return w[:dim], {k: round(float(v), 4) for k, v in zip(signals.NAMES, w[dim:dim + n])}, sem


def model_dict(w: np.ndarray, bias: float, signal_weights: dict[str, float],
               semantic_w: np.ndarray | None = None, band: tuple[float, float] | None = None) -> dict[str, Any]:
    out = {"w": w, "bias": bias, "min_evidence": MIN_EVIDENCE, "min_words": MIN_WORDS, "prior_logit": PRIOR_LOGIT,
           "signal_weights": signal_weights}
    if semantic_w is not None:
        out["semantic_w"], out["semantic_band"] = semantic_w.astype(np.float32), band
    return out


def lookup_embed(data: Featured) -> Callable[[list[str]], np.ndarray]:
    """`semantic.embed` for scoring `data`: its own texts from the computed vectors, others (segments of long
    texts) through the cache."""
    known = {t: i for i, t in enumerate(data.texts)} if data.emb is not None else {}

    def embed(texts: list[str]) -> np.ndarray:
        missing = [t for t in texts if t not in known]
        extra = dict(zip(missing, embeddings(missing))) if missing else {}
        return np.stack([data.emb[known[t]] if t in known else extra[t] for t in texts])  # type: ignore[index]
    return embed


def probabilities(model: dict[str, Any], data: Featured, threshold: float | None = None) -> np.ndarray:
    """What the guard computes for each text (`InjectionGuard.score`); with a `threshold`, semantic features
    only where they could change the verdict at that threshold, as the guard does."""
    embed = lookup_embed(data) if data.emb is not None and "semantic_w" in model else None
    logit_th = None if threshold is None else float(np.log(threshold / (1 - threshold)))
    out = np.empty(len(data.texts))
    for i, t in enumerate(data.texts):
        if data.ruled[i]:
            out[i] = 1.0
            continue
        spans = features.segments(t)
        out[i] = (1 / (1 + np.exp(-segment_logits(model, t, spans, embed=embed, logit_threshold=logit_th).max()))
                  if spans else 0.0)
    return out


def metrics(p: np.ndarray, y: np.ndarray, threshold: float) -> dict[str, Any]:
    y = np.asarray(y)
    pred = p >= threshold
    tp, fp = int((pred & (y == 1)).sum()), int((pred & (y == 0)).sum())
    fn, tn = int((~pred & (y == 1)).sum()), int((~pred & (y == 0)).sum())
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    f1 = (2 * precision * recall / (precision + recall) if precision and recall else 0.0) if tp + fn else None
    r = lambda v: None if v is None else round(v, 4)  # noqa: E731
    return {"precision": r(precision), "recall": r(recall), "f1": r(f1),
            "fpr": r(fp / (fp + tn)) if fp + tn else None, "n_attack": tp + fn, "n_benign": fp + tn}


def choose_threshold(val: dict[str, tuple[np.ndarray, np.ndarray]],
                     scored: set[str] | None = None, max_fpr: float = MAX_VAL_FPR) -> tuple[float, float]:
    """(threshold, its mean validation F1) over per-corpus (probabilities, labels): the mean F1 of the corpora
    in `scored` (default: all), with the FPR of each of them that holds benign texts at or under `max_fpr` —
    or, where none of them does, of every corpus that does (benign text must never be left unconstrained)."""
    names = set(val) if scored is None else scored
    limited = {n for n in names if (val[n][1] == 0).any()} or {n for n in val if (val[n][1] == 0).any()}
    feasible: list[tuple[float, float]] = []
    for th in np.arange(0.05, 0.99, 0.01):
        ms = {n: metrics(p, y, float(th)) for n, (p, y) in val.items()}
        if any(ms[n]["fpr"] > max_fpr for n in limited):
            continue
        f1s = [m["f1"] for n, m in ms.items() if m["f1"] is not None and (scored is None or n in scored)]
        feasible.append((round(float(th), 2), float(np.mean(f1s)) if f1s else 0.0))
    if not feasible:  # no threshold keeps benign text under the limit: the strictest one, scored as nothing
        return (0.98, 0.0)
    top = max(f1 for _, f1 in feasible)
    return max((th, f1) for th, f1 in feasible if f1 >= top - F1_SLACK)


def channel_corpora(names: Any, channel: str) -> set[str]:
    """The corpora whose attacks choose `channel`'s threshold: its own, and the ones both channels see."""
    return {n for n in names if CHANNEL_OF.get(n, "direct") in (channel, None)}


def train(train_sets: Sequence[Featured], val_sets: dict[str, Featured],
          log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Fit on the union of `train_sets`; choose alpha and one threshold per channel on `val_sets` (by corpus)."""
    x = sparse.vstack([d.x for d in train_sets]).tocsr()
    y = np.concatenate([d.y for d in train_sets])
    semantic = train_sets[0].emb is not None
    best: dict[str, Any] | None = None
    for alpha in ALPHA_GRID:
        w_all, b = fit(x, y, alpha)
        w, signal_weights, sem = split_weights(w_all)
        q, scale = quantise(w)
        band = None
        if sem is not None:
            sq, sscale = quantise(sem)
            sem = sq.astype(np.float32) * np.float32(sscale)
            term = np.concatenate([d.emb @ sem for d in train_sets])  # type: ignore[operator]
            band = tuple(round(float(v), 4) for v in np.percentile(term, BAND_PERCENTILES))
        model = model_dict(q.astype(np.float32) * np.float32(scale), b, signal_weights, sem, band)
        val = {n: (probabilities(model, d), d.y) for n, d in val_sets.items()}
        chosen = {c: choose_threshold(val, channel_corpora(val, c), MAX_VAL_FPR_BY_CHANNEL[c]) for c in ("direct", "indirect")
                  if any(CHANNEL_OF.get(n, "direct") == c for n in val)}
        score = float(np.mean([f1 for _, f1 in chosen.values()]))
        thresholds = {c: th for c, (th, _) in chosen.items()}
        thresholds.setdefault("indirect", thresholds.get("direct", 0.5))
        thresholds.setdefault("direct", thresholds["indirect"])
        log(f"alpha={alpha:g} thresholds={thresholds} mean validation F1={score:.4f}")
        if best is None or score > best["val_f1"]:
            best = {"alpha": alpha, "q": q, "scale": scale, "model": model, "signal_weights": signal_weights,
                    "threshold": thresholds["direct"], "thresholds": thresholds, "val_f1": round(score, 4),
                    "semantic": semantic, "band": band, "n_train": int(len(y)),
                    "semantic_q": quantise(sem) if sem is not None else None,
                    "validation": {n: metrics(p, yv, thresholds[CHANNEL_OF.get(n) or "direct"])
                                   for n, (p, yv) in val.items()}}
    assert best is not None
    return best
