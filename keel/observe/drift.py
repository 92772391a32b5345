"""Drift: live traffic's recent window compared with the reference window before it, one test per signal.

| signal | one observation | test (fires when p < alpha) |
|---|---|---|
| query_embedding | a search's query vector | MMD² (RBF kernel, median-distance bandwidth), permutation p-value |
| retrieval_top_score | the best similarity among a search's hits | two-sample Kolmogorov-Smirnov |
| no_answer_rate | a search that found nothing (1) or something (0) | two-proportion z |
| guard_hit_rate | a model call a guard found something in (1) or not (0) | two-proportion z |
| feedback_rate | a feedback that is negative (score < 0: 1) or not (0) | two-proportion z |
| latency_ms | a metered call's latency | two-sample Kolmogorov-Smirnov |
| cost | a metered call's dollars | two-sample Kolmogorov-Smirnov |

Each signal keeps its last `reference + window` observations: the newest `window` are compared with the
`reference` before them (fewer while traffic is low: at least `MIN_SAMPLES` each, else `warming_up`). So a
lasting shift alerts once, when it starts, and becomes the new normal as it fills the reference.
`bench/drift.py` measures detection delay and the false-alarm rate of the query-embedding test.

>>> mon = DriftMonitor(window=50, reference=200)
>>> mon.observe("latency_ms", 12.5)
>>> [s["status"] for s in mon.check()]
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

MIN_SAMPLES = 30
PERMUTATIONS = 200


# -- the tests --------------------------------------------------------------------------------------------

def ks_2samp(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """(D, p) of the two-sample Kolmogorov-Smirnov test; p from the asymptotic Kolmogorov distribution with
    Stephens' small-sample correction."""
    x, y = np.sort(np.asarray(a, dtype=float)), np.sort(np.asarray(b, dtype=float))
    n, m = len(x), len(y)
    if not n or not m:
        return 0.0, 1.0
    grid = np.concatenate([x, y])
    d = float(np.max(np.abs(np.searchsorted(x, grid, side="right") / n - np.searchsorted(y, grid, side="right") / m)))
    en = math.sqrt(n * m / (n + m))
    return d, kolmogorov_q((en + 0.12 + 0.11 / en) * d)


def kolmogorov_q(lam: float) -> float:
    """P(K > lam) for the Kolmogorov distribution."""
    if lam < 0.2:
        return 1.0
    total = sum(2 * (-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam) for k in range(1, 101))
    return min(max(total, 0.0), 1.0)


def two_proportion_z(x1: int, n1: int, x2: int, n2: int) -> tuple[float, float]:
    """(z, two-sided p) for the difference of two proportions x1/n1 (reference) and x2/n2 (recent)."""
    if not n1 or not n2:
        return 0.0, 1.0
    pooled = (x1 + x2) / (n1 + n2)
    if pooled in (0.0, 1.0):
        return 0.0, 1.0
    z = (x2 / n2 - x1 / n1) / math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    return z, math.erfc(abs(z) / math.sqrt(2))


def mmd_permutation(x: np.ndarray, y: np.ndarray, permutations: int = PERMUTATIONS,
                    rng: np.random.Generator | None = None) -> tuple[float, float]:
    """(MMD², p) between samples x and y (rows are vectors): Gaussian kernel with the median pairwise
    distance as bandwidth, biased estimate, p = (1 + #permuted ≥ observed) / (1 + permutations)."""
    rng = rng or np.random.default_rng(0)
    z = np.vstack([x, y]).astype(np.float64)
    n, total = len(x), len(x) + len(y)
    sq = np.sum(z * z, axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * z @ z.T, 0.0)
    off = d2[~np.eye(total, dtype=bool)]
    bandwidth = float(np.median(off[off > 0])) if np.any(off > 0) else 1.0
    k = np.exp(-d2 / bandwidth)
    base = np.concatenate([np.full(n, 1 / n), np.full(total - n, -1 / (total - n))])
    signs = np.column_stack([base, rng.permuted(np.tile(base, (permutations, 1)), axis=1).T])
    stats = np.einsum("ij,ij->j", signs, k @ signs)  # sᵀ K s for every labelling at once
    observed = float(stats[0])
    return observed, float((1 + np.sum(stats[1:] >= observed - 1e-12)) / (1 + permutations))


# -- the signals ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Signal:
    name: str
    test: str  # "mmd" | "ks" | "z"
    alpha: float
    observes: str


SIGNALS = (
    Signal("query_embedding", "mmd", 0.01, "each search's query embedding"),
    Signal("retrieval_top_score", "ks", 0.01, "the best vector similarity among each search's hits"),
    Signal("no_answer_rate", "z", 0.01, "searches that found nothing"),
    Signal("guard_hit_rate", "z", 0.01, "model calls with a guard finding or a guard block"),
    Signal("feedback_rate", "z", 0.01, "negative feedback (score < 0) among feedback given"),
    Signal("latency_ms", "ks", 0.01, "latency of each metered call"),
    Signal("cost", "ks", 0.01, "dollars of each metered call"),
)
TESTS = {"mmd": "MMD² with a Gaussian kernel, permutation p-value", "ks": "two-sample Kolmogorov-Smirnov",
         "z": "two-proportion z-test"}


def compare(signal: Signal, reference: list[Any], recent: list[Any], permutations: int = PERMUTATIONS,
            rng: np.random.Generator | None = None) -> dict[str, Any]:
    """The signal's test on the two windows: statistic, p-value, and whether it fires."""
    if signal.test == "mmd":
        stat, p = mmd_permutation(np.asarray(reference), np.asarray(recent), permutations, rng)
        summary = {}
    elif signal.test == "ks":
        stat, p = ks_2samp(reference, recent)
        summary = {"reference_median": float(np.median(reference)), "recent_median": float(np.median(recent))}
    else:
        x1, x2 = int(sum(reference)), int(sum(recent))
        stat, p = two_proportion_z(x1, len(reference), x2, len(recent))
        summary = {"reference_rate": round(x1 / len(reference), 4), "recent_rate": round(x2 / len(recent), 4)}
    return {"statistic": round(stat, 6), "p_value": round(p, 6), "fired": p < signal.alpha, **summary}


def windows(values: list[Any], window: int, reference: int) -> tuple[list[Any], list[Any]] | None:
    """(reference, recent) from the held observations, oldest first; None while there are too few."""
    n = len(values)
    if n < 2 * MIN_SAMPLES:
        return None
    recent = window if n >= window + MIN_SAMPLES else n // 2
    return values[max(0, n - recent - reference):n - recent], values[n - recent:]


class DriftMonitor:
    """Holds each signal's recent observations (any thread may add) and runs the tests when asked."""

    def __init__(self, window: int = 50, reference: int = 200, permutations: int = PERMUTATIONS,
                 seed: int = 0) -> None:
        self.window, self.reference, self.permutations = window, reference, permutations
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()
        self._values: dict[str, deque[Any]] = {s.name: deque(maxlen=window + reference) for s in SIGNALS}
        self._fired: set[str] = set()

    def observe(self, signal: str, value: Any) -> None:
        with self._lock:
            self._values[signal].append(value)

    def observe_row(self, row: dict[str, Any]) -> None:
        """A ledger row (the ledger's observer, in its flushing thread): latency, cost and guard hits of model calls."""
        if row.get("kind") not in ("chat", "embedding", "rerank") or row.get("cache_hit"):
            return
        meta = row.get("meta")
        guarded = bool(meta.get("keel_guards")) if isinstance(meta, dict) else False
        with self._lock:
            if row.get("status") == "ok":
                self._values["latency_ms"].append(float(row.get("latency_ms") or 0.0))
                self._values["cost"].append(float(row.get("cost") or 0.0))
            if row.get("kind") == "chat":
                self._values["guard_hit_rate"].append(int(guarded or row.get("error_code") == "guard_blocked"))

    def observe_retrieval(self, query_vector: Any, top_similarity: float | None, hits: int) -> None:
        """A search (knowledge's `on_retrieval`): its query embedding, best similarity and hit count."""
        with self._lock:
            if query_vector is not None:
                self._values["query_embedding"].append(np.asarray(query_vector, dtype=np.float32))
            self._values["no_answer_rate"].append(int(hits == 0))
            if top_similarity is not None:
                self._values["retrieval_top_score"].append(float(top_similarity))

    def observe_feedback(self, score: float | None) -> None:
        if score is not None:
            self.observe("feedback_rate", int(score < 0))

    def check(self, track: bool = False) -> list[dict[str, Any]]:
        """Each signal's status: `ok`, `drift` or `warming_up`. With `track` (the alerting loop), a signal that
        fires and did not at the last tracked check is marked `new`."""
        with self._lock:
            held = {name: list(values) for name, values in self._values.items()}
        out = []
        for s in SIGNALS:
            row: dict[str, Any] = {"signal": s.name, "observes": s.observes, "test": TESTS[s.test], "alpha": s.alpha,
                                   "window": self.window, "reference": self.reference}
            split = windows(held[s.name], self.window, self.reference)
            if split is None:
                out.append({**row, "status": "warming_up", "observations": len(held[s.name]),
                            "needs": 2 * MIN_SAMPLES})
                continue
            ref, recent = split
            result = compare(s, ref, recent, self.permutations, self._rng)
            fired = result.pop("fired")
            new = fired and s.name not in self._fired
            if track:
                (self._fired.add if fired else self._fired.discard)(s.name)
            out.append({**row, **result, "status": "drift" if fired else "ok", "new": track and new,
                        "reference_n": len(ref), "recent_n": len(recent)})
        return out
