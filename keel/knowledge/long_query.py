"""Long questions: a paragraph that tells a story before it asks ("I was charged twice last month …,
the branch told me …, what can I do?") drowns as one embedding and one OR of every word.

`plan(text, mode)` turns a long question into
- dense sub-queries: the whole question plus each of its sentences, each embedded and searched on
  its own, the lists fused with reciprocal rank fusion (`fuse`), so a passage that answers one
  sentence well is not averaged away by the others;
- a keyword query of its key terms (`key_terms`): the rarest words, ranked by an IDF estimate read
  from the embedder's WordPiece vocabulary (ordered by corpus frequency, so a word's id is its
  frequency rank; a word it must split is rarer than any it holds whole), weighted by how often
  the question repeats them. No round trip to the index, the same for every backend.

`mode` is per request: `off`, `on`, or `auto` (long when it has several sentences and at least
`AUTO_MIN_WORDS` words). Short questions are left exactly as they were.

Example:
    >>> p = plan("I deploy a Flask app with gunicorn. The workers die after an upgrade of the "
    ...          "interpreter, and the log says a C extension module failed to import. "
    ...          "How do I rebuild the extension for the new Python?", "auto")
    >>> len(p.dense), "gunicorn" in p.keyword
    (4, True)
"""

from __future__ import annotations

import math
import re
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from keel.core.errors import BadRequest
from keel.knowledge.index import STOPWORDS, Scored

MODES = ("auto", "on", "off")
AUTO_MIN_WORDS = 25
MAX_SENTENCES = 8  # a longer question's sentences are merged into this many sub-queries
MIN_SENTENCE_WORDS = 4  # shorter fragments join the sentence before them
KEY_TERMS = 32  # as good as every term on the dev half, fewer lookups (bench/README.md)
RRF_K = 60
# The whole question's list against 1.0 for each sentence's: the more weight, the better on the dev half, up to
# the whole question alone (bench/README.md).
WHOLE_WEIGHT = 8.0
# Words of a request's story and manners that say little about the subject (beyond the index's stop words):
# ranked last, so dropped first (dropping them outright did worse on the dev half: bench/README.md).
FILLER = frozenset("""about above after again against all also am any anyone anything around asked back because been
before being below between both cannot come did didn doesn doing don done down during each else even ever every
few find first following further get gets getting give go goes going got gotten happen happened happens having
help here him his hers herself himself however i'd i'll i'm i've im instead ive just keep kind know last let like
look looking lot made make makes making many may maybe might mine more most much must myself need needed needs
new now off once one only other others otherwise ought ours ourselves out over own please point pretty put quite
rather really right said same say says see seem seemed seems seen should show since some someone something
sometimes somewhere still sure take tell thank thanks thing things think though through thus told too tried tries
try trying two under until up upon us use used uses using usually very want wanted wants way ways well went
whether while whose within without won work worked working works wouldn yes yet yourself""".split())
_SENTENCE = re.compile(r"(?<=[.?!])\s+|\n\s*\n|\n(?=\s*[-*•\d])")
_WORD = re.compile(r"\w+")
_ALNUM = re.compile(r"[^\W_]")


@dataclass(frozen=True)
class Plan:
    """How one long question is searched: texts to embed (the whole question first) and the keyword query."""

    dense: list[str]
    keyword: str


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise BadRequest(f"unknown long_query {mode!r}", fix=f"use one of: {', '.join(MODES)}")
    return mode


def words(text: str) -> list[str]:
    return [w for w in _WORD.findall(text) if _ALNUM.search(w)]


def sentences(text: str) -> list[str]:
    """The question's sentences (list items and paragraphs count as sentences), short fragments
    joined to the one before, at most `MAX_SENTENCES` (neighbours merged evenly beyond that)."""
    out: list[str] = []
    for part in (p.strip() for p in _SENTENCE.split(text)):
        if not part:
            continue
        if out and len(words(part)) < MIN_SENTENCE_WORDS:
            out[-1] = f"{out[-1]} {part}"
        elif out and len(words(out[-1])) < MIN_SENTENCE_WORDS:
            out[-1] = f"{out[-1]} {part}"
        else:
            out.append(part)
    if len(out) > MAX_SENTENCES:
        cuts = [i * len(out) // MAX_SENTENCES for i in range(MAX_SENTENCES + 1)]
        out = [" ".join(out[a:b]) for a, b in zip(cuts, cuts[1:])]
    return out


def is_long(text: str) -> bool:
    return len(words(text)) >= AUTO_MIN_WORDS and len(sentences(text)) >= 2


def plan(text: str, mode: str) -> Plan | None:
    """The plan for `text`, or None where it is searched as one query (`off`, or `auto` and short)."""
    check_mode(mode)
    if mode == "off" or (mode == "auto" and not is_long(text)):
        return None
    parts = sentences(text)
    dense = [text] + (parts if len(parts) > 1 else [])
    return Plan(dense=dense, keyword=" ".join(key_terms(text)) or text)


class Rarity:
    """An IDF estimate per word from a WordPiece vocabulary ordered by frequency (BERT's is): log of
    the word's rank; a word the vocabulary must split ranks after every whole word, once per piece."""

    FIRST_WORD_ID = 1996  # BERT uncased: ids below are [PAD]/[unused]/[CLS]… and single characters

    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer
        self.size = tokenizer.get_vocab_size() if tokenizer is not None else 30522

    def __call__(self, word: str) -> float:
        if self.tokenizer is None:
            return math.log(1 + 2000 * len(word))  # no vocabulary: longer words are rarer, roughly
        wid = self.tokenizer.token_to_id(word)
        if wid is not None and wid >= self.FIRST_WORD_ID:
            return math.log(wid - self.FIRST_WORD_ID + 2)
        pieces = len(self.tokenizer.encode(word, add_special_tokens=False).ids)
        return math.log(self.size * max(pieces, 1))


_RARITY: list[Rarity] = []
_LOCK = threading.Lock()


def rarity() -> Rarity:
    """The estimator over the bundled MiniLM tokenizer's vocabulary (loaded once)."""
    with _LOCK:
        if not _RARITY:
            from keel.gateway.providers.local_embed import BUNDLED_TOKENIZER, DEFAULT_TOKENIZER, package_file

            paths = [BUNDLED_TOKENIZER] + [package_file(pkg, rel) for pkg, rel in DEFAULT_TOKENIZER]
            found = next((p for p in paths if p is not None and Path(p).is_file()), None)
            _RARITY.append(Rarity(Tokenizer.from_file(str(found)) if found else None))
        return _RARITY[0]


def key_terms(text: str, limit: int | None = None) -> list[str]:
    """The `limit` (default `KEY_TERMS`) terms of `text` most worth a keyword search, in the order they
    appear: no stop words, ranked by estimated IDF times (1 + log of how often the question uses them),
    filler last."""
    limit = KEY_TERMS if limit is None else limit
    ws = [w.lower() for w in words(text)]
    counts = Counter(ws)
    cands = [w for w in dict.fromkeys(ws) if w not in STOPWORDS and (len(w) > 1 or w.isdigit())]
    if len(cands) <= limit:
        return cands
    est = rarity()
    score = {w: est(w) * (1 + math.log(counts[w])) * (0.25 if w in FILLER else 1.0) for w in cands}
    keep = set(sorted(cands, key=lambda w: -score[w])[:limit])
    return [w for w in cands if w in keep]


def fuse(lists: list[list[Scored]], n: int, weights: list[float] | None = None, k: int = RRF_K) -> list[Scored]:
    """Reciprocal rank fusion of ranked lists into one of at most `n`, the fused score as `score`."""
    fused: dict[int, float] = {}
    for i, hits in enumerate(lists):
        w = weights[i] if weights else 1.0
        for rank, h in enumerate(hits, 1):
            fused[h.chunk_id] = fused.get(h.chunk_id, 0.0) + w / (k + rank)
    best = sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
    return [Scored(cid, score) for cid, score in best]
