"""Fitting and judging the injection classifier (training and bench only: needs scikit-learn and scipy).

The model is scikit-learn's `SGDClassifier` with log loss (a logistic regression; class-balanced,
seeded) over exactly the hashed features the guard computes at serving time (`features.featurize`,
each row scaled by 1/√max(n, MIN_EVIDENCE)) plus one 0/1 column per structural signal. Its regularisation `alpha` and the decision threshold
are chosen on validation splits only: the threshold maximises the mean F1 over the validation corpora
that hold attacks, subject to every validation corpus that holds benign texts staying at or under
MAX_VAL_FPR. Probabilities are computed as the guard computes them (`injection.segment_logits`: worst
segment, minimum-evidence shrink of short segments, 1.0 where a rule fires).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy import sparse
from sklearn.linear_model import SGDClassifier

from keel.governance.guards import features, signals
from keel.governance.guards.injection import rule_hit, segment_logits

MIN_EVIDENCE = 64.0  # features (char 3–5-grams + words): about a five-word sentence
MIN_WORDS = 4  # segments of fewer words are shrunk towards PRIOR_LOGIT (one word: to a quarter)
PRIOR_LOGIT = -3.0  # about 5%: the share of attacks a busy gateway might see, not a tuned figure
MAX_VAL_FPR = 0.04
ALPHA_GRID = (3e-6, 1e-5, 3e-5)


def design(texts: Sequence[str], min_evidence: float = MIN_EVIDENCE) -> sparse.csr_matrix:
    rows, cols, vals = [], [], []
    for i, t in enumerate(texts):
        b, _ = features.featurize(t, [(0, len(t))])
        rows.append(np.full(len(b), i))
        cols.append(b)
        vals.append(np.full(len(b), 1 / np.sqrt(max(len(b), min_evidence, 1.0))))
    m = sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                          shape=(len(texts), 1 << features.BITS))
    m.sum_duplicates()
    return sparse.hstack([m, signal_columns(texts)]).tocsr()


def signal_columns(texts: Sequence[str]) -> sparse.csr_matrix:
    """One 0/1 column per structural signal (signals.NAMES), after the hashed n-gram columns."""
    rows, cols = [], []
    for i, t in enumerate(texts):
        for n in signals.fired(t):
            rows.append(i)
            cols.append(signals.NAMES.index(n))
    return sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(texts), len(signals.NAMES)))


class Featured:
    """Texts with what scoring needs computed once: the design matrix, rule hits, long-text flags."""

    def __init__(self, texts: Sequence[str], labels: Sequence[int]) -> None:
        self.texts = list(texts)
        self.y = np.asarray(labels, dtype=np.int64)
        self.x = design(self.texts)
        self.ruled = np.array([rule_hit(features.normalise(t)) is not None for t in self.texts])


def fit(x: sparse.csr_matrix, y: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    clf = SGDClassifier(loss="log_loss", alpha=alpha, max_iter=15, tol=None, class_weight="balanced",
                        random_state=0)
    clf.fit(x, y)
    return clf.coef_[0].astype(np.float64), float(clf.intercept_[0])


def quantise(w: np.ndarray) -> tuple[np.ndarray, float]:
    scale = float(np.abs(w).max() / 127) or 1.0
    return np.clip(np.round(w / scale), -127, 127).astype(np.int8), scale


def split_weights(w: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
    """(hashed n-gram weights, {signal: weight})."""
    dim = 1 << features.BITS
    return w[:dim], {n: round(float(v), 4) for n, v in zip(signals.NAMES, w[dim:])}


def model_dict(w: np.ndarray, bias: float, signal_weights: dict[str, float]) -> dict[str, Any]:
    return {"w": w, "bias": bias, "min_evidence": MIN_EVIDENCE, "min_words": MIN_WORDS, "prior_logit": PRIOR_LOGIT,
            "signal_weights": signal_weights}


def probabilities(model: dict[str, Any], data: Featured) -> np.ndarray:
    """What the guard computes for each text (`InjectionGuard.score`)."""
    out = np.empty(len(data.texts))
    for i, t in enumerate(data.texts):
        if data.ruled[i]:
            out[i] = 1.0
            continue
        spans = features.segments(t)
        out[i] = 1 / (1 + np.exp(-segment_logits(model, t, spans).max())) if spans else 0.0
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


def choose_threshold(val: dict[str, tuple[np.ndarray, np.ndarray]]) -> tuple[float, float]:
    """(threshold, its mean validation F1) over per-corpus (probabilities, labels)."""
    best = (0.5, -1.0)
    for th in np.arange(0.05, 0.99, 0.01):
        ms = [metrics(p, y, float(th)) for p, y in val.values()]
        if any(m["fpr"] is not None and m["fpr"] > MAX_VAL_FPR for m in ms):
            continue
        f1s = [m["f1"] for m in ms if m["f1"] is not None]
        score = float(np.mean(f1s)) if f1s else 0.0
        if score > best[1]:
            best = (round(float(th), 2), score)
    return best


def train(train_sets: Sequence[Featured], val_sets: dict[str, Featured],
          log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Fit on the union of `train_sets`; choose alpha and threshold on `val_sets` (by corpus)."""
    x = sparse.vstack([d.x for d in train_sets]).tocsr()
    y = np.concatenate([d.y for d in train_sets])
    best: dict[str, Any] | None = None
    for alpha in ALPHA_GRID:
        w_all, b = fit(x, y, alpha)
        w, signal_weights = split_weights(w_all)
        q, scale = quantise(w)
        model = model_dict(q.astype(np.float32) * np.float32(scale), b, signal_weights)
        val = {n: (probabilities(model, d), d.y) for n, d in val_sets.items()}
        th, score = choose_threshold(val)
        log(f"alpha={alpha:g} threshold={th} mean validation F1={score:.4f}")
        if best is None or score > best["val_f1"]:
            best = {"alpha": alpha, "q": q, "scale": scale, "model": model, "signal_weights": signal_weights, "threshold": th, "val_f1": round(score, 4),
                    "validation": {n: metrics(p, yv, th) for n, (p, yv) in val.items()}, "n_train": int(len(y))}
    assert best is not None
    return best
