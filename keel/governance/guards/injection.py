"""Prompt-injection guard: high-precision rules plus a small logistic regression over hashed n-grams,
structural signals and semantic features.

The model (`injection_model.json`, < 1 MB) is trained by `scripts/train_injection.py` on the train
splits of every labelled injection corpus that ships in a package here; its thresholds were chosen on
the validation splits, one per channel: `direct` (what a user writes) and `indirect` (retrieved passages,
tool outputs, documents — where imperative prose is normal). Long texts are scored sentence by sentence
and the worst sentence is reported. Structural signals (`signals.py`: instruction override, role play,
prompt requests, encoded payloads, leetspeak, invisible Unicode) add learnt weights to a segment's logit
and are named in each finding. Semantic features — the sentence vector of the bundled MiniLM embedder
(`semantic.py`) times learnt weights — are added only to segments whose verdict they could change: the
n-gram logit plus the semantic term's 0.5th/99.5th training percentiles (`semantic_band`) brackets the
full logit, and a segment whose bracket lies wholly on one side of the threshold is decided without
running the embedder, which keeps the guard's cost per KB small.
"""
from __future__ import annotations

import base64
import bisect
import json
import re
import zlib
from functools import lru_cache
from pathlib import Path
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from keel.core.errors import ConfigError
from keel.governance.guards import features, signals
from keel.governance.guards.base import Finding
from keel.governance.guards.decode import reveal

MODEL_PATH = Path(__file__).with_name("injection_model.json")
CHANNELS = ("direct", "indirect")
Embed = Callable[[list[str]], np.ndarray]

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
    if isinstance(meta.get("semantic"), dict):  # keel-injection-lr/3: weights of the sentence vector's dimensions
        sem = meta["semantic"]
        raw = zlib.decompress(base64.b64decode(sem["weights"]))
        meta["semantic_w"] = np.frombuffer(raw, dtype=np.int8).astype(np.float32) * np.float32(sem["scale"])
        meta["semantic_band"] = tuple(sem["band"])
    return {**meta, "w": weights}


_WORD = re.compile(r"\w+")


def segment_signals(text: str, spans: list[tuple[int, int]]) -> list[list[str]]:
    """The structural signals (`signals.fired`) of each segment."""
    return [signals.fired(text[a:b]) for a, b in spans]


def _shrink(model: dict[str, Any], logits: np.ndarray, words: np.ndarray | None) -> np.ndarray:
    if words is None or not len(logits):
        return logits
    prior = model.get("prior_logit", -3.0)
    shrink = np.minimum(1.0, words / model["min_words"])
    return np.where(logits > prior, prior + (logits - prior) * shrink, logits)


def segment_logits(model: dict[str, Any], text: str, spans: list[tuple[int, int]],
                   fired: list[list[str]] | None = None, embed: Embed | None = None,
                   logit_threshold: float | None = None) -> np.ndarray:
    """The classifier's logit for each segment, with the minimum-evidence rule and signal weights applied.

    A segment of fewer than `min_words` words is shrunk towards `prior_logit` in proportion to its
    word count: "Answer." or "keep this" cannot be judged an attack on a few n-grams alone. With a
    semantic model and an `embed` function, the semantic term joins the n-gram logit (before the shrink)
    for every segment — or, given `logit_threshold`, only where it could change the verdict (see the
    module docstring). Then each structural signal that fired adds its learnt weight, unshrunk, so a
    short attack with a signal is still caught. Models without these fields score as before."""
    logits = features.scores(model["w"], model["bias"], text, spans, model.get("min_evidence", 1.0))
    if not len(logits):
        return logits
    words = (np.array([len(_WORD.findall(text[a:b])) for a, b in spans], dtype=np.float64)
             if model.get("min_words", 0) else None)
    bonus = np.zeros(len(logits))
    weights = model.get("signal_weights")
    if weights:
        fired = segment_signals(text, spans) if fired is None else fired
        bonus = np.array([sum(weights.get(n, 0.0) for n in f) for f in fired])
    sem = model.get("semantic_w")
    if sem is not None and embed is not None:
        lo, hi = model["semantic_band"]
        if logit_threshold is None:
            todo = np.arange(len(spans))
        else:
            low = _shrink(model, logits + hi, words) + bonus < logit_threshold  # benign whatever the vector says
            high = _shrink(model, logits + lo, words) + bonus >= logit_threshold  # an attack whatever it says
            todo = np.flatnonzero(~(low | high))
            logits = np.where(low | high, logits + (lo + hi) / 2, logits)  # decided: the band's middle
        if len(todo):
            vectors = embed([text[spans[i][0]:spans[i][1]] for i in todo])
            logits[todo] = logits[todo] + vectors @ sem
    return _shrink(model, logits, words) + bonus


def rule_hit(normalised: str) -> str | None:
    """The name of the first rule that matches the (normalised) text, if any."""
    if not _ANY_RULE.search(normalised):
        return None
    return next(name for name, rx in RULES if rx.search(normalised))


class InjectionGuard:
    """Finds instructions aimed at the model in user input (`direct`), retrieved passages and tool outputs
    (`indirect`, `scan_indirect`), each channel judged against its own threshold."""

    name: ClassVar[str] = "injection"
    sides: ClassVar[frozenset[str]] = frozenset({"input", "context"})

    def __init__(self, threshold: float | None = None, model_path: Path | None = None,
                 thresholds: dict[str, float] | None = None, embed: Embed | None = None) -> None:
        self.model = load_model(str(model_path or MODEL_PATH))
        base = self.model.get("thresholds") or {}
        chosen = {c: float(base.get(c, self.model["threshold"])) for c in CHANNELS}
        if threshold is not None:
            chosen = {c: float(threshold) for c in CHANNELS}
        chosen.update({c: float(v) for c, v in (thresholds or {}).items() if c in CHANNELS and v is not None})
        self.thresholds = chosen
        self.threshold = chosen["direct"]
        self._logit = {c: float(np.log(t / (1 - t))) for c, t in chosen.items()}
        if embed is None and "semantic_w" in self.model:
            from keel.governance.guards import semantic

            embed = semantic.embed
        self.embed = embed

    def score(self, text: str, channel: str = "direct") -> float:
        """Probability that `text` (its worst sentence) is an injection, as the `channel`'s verdict sees it
        (segments far from its threshold are scored without semantic features)."""
        text = reveal(text)  # tag characters read as the ASCII they hide
        spans = features.segments(text)
        if not spans:
            return 0.0
        if rule_hit(features.normalise(text)):
            return 1.0
        logits = segment_logits(self.model, text, spans, embed=self.embed, logit_threshold=self._logit[channel])
        return float(1 / (1 + np.exp(-logits.max())))

    def scan(self, text: str) -> list[Finding]:
        return self.scan_channel(text, "direct")

    def scan_indirect(self, text: str) -> list[Finding]:
        """`scan` for a retrieved passage, tool output or document: the `indirect` channel's threshold."""
        return self.scan_channel(text, "indirect")

    def scan_channel(self, text: str, channel: str) -> list[Finding]:
        text = reveal(text)  # tag characters read as the ASCII they hide: same length, same spans
        spans = features.segments(text)
        if not spans:
            return []
        threshold = self._logit[channel]
        fired = segment_signals(text, spans)
        logits = segment_logits(self.model, text, spans, fired, self.embed, threshold)
        norm = features.normalise(text)
        if len(norm) == len(text):  # one pass of the rules over the whole text, hits mapped to segments
            starts = [a for a, _ in spans]
            ruled = {bisect.bisect_right(starts, m.start()) - 1 for m in _ANY_RULE.finditer(norm)}
        else:  # NFKC changed lengths: spans no longer line up, judge each segment on its own
            ruled = {i for i, (a, b) in enumerate(spans) if rule_hit(features.normalise(text[a:b]))}
        out = []
        for i, ((a, b), logit) in enumerate(zip(spans, logits)):
            if i in ruled or logit >= threshold:
                score = 1.0 if i in ruled else float(1 / (1 + np.exp(-logit)))
                out.append(Finding(self.name, "prompt_injection", a, b, round(score, 4), tuple(fired[i])))
        return out
