"""Structure-aware chunking: sections first, then a token budget with overlap, measured in the
embedding model's own tokens.

A section that fits the budget is one chunk. A longer one is cut into windows, preferring to end
at a paragraph break, else a line or sentence end, and each window starts about `overlap` tokens
before the previous one ended. A section that is only a heading joins the section after it. Every
chunk's text is exactly `parsed.text[start:end]`.

What the embedder sees is `prefix + chunk text`, the prefix being the document title and section
path (`Measure.prefix`). With a `Measure` built from the embedder's tokenizer (`measure_for`), the
budget of each chunk is the embedder's window less its special tokens and that prefix, so no chunk
is ever truncated by the model: every word piece is embedded. Without one (an embedder whose
tokenizer Keel cannot see) tokens are words and runs of punctuation, 200 to a chunk, as before.
`Measure.version` names both the chunker and the measure; a document records the version that cut
it, and a re-ingest re-chunks a document whose version differs (once).

Example:
    >>> from keel.knowledge.parsers import parse
    >>> doc = parse("a.md", b"# A\\n\\nAn introduction long enough to stand as its own chunk.\\n\\n## B\\n\\nbody")
    >>> [c.section for c in chunk(doc)]
    ['A', 'A > B']
"""

from __future__ import annotations

import bisect
import hashlib
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from keel.core.errors import KeelError
from keel.knowledge.parsers import Parsed, Section

CHUNKER_VERSION = 2
BUDGET, OVERLAP, HEADING_ONLY = 200, 24, 8
PREFIX_SHARE = 4  # the prefix (title, section path) takes at most 1/PREFIX_SHARE of the window
_TOKEN = re.compile(r"\w+|[^\w\s]+")
_WORD = re.compile(r"\w+")

Unit = tuple[int, int, int]  # (start, end, tokens): a word (or punctuation run) and what it costs


class Measure:
    """How a chunk's size is counted, and the most one embedding input may hold.

    `Measure.words()` counts words and punctuation runs against a budget of 200 (the prefix not
    counted); `Measure.wordpieces(tokenizer_file, window)` counts the tokenizer's pieces and keeps
    `prefix + chunk` plus the model's two special tokens within `window`.

    >>> Measure.words().count("Hello, world")
    3
    """

    def __init__(self, name: str, window: int, tokenizer: Tokenizer | None = None, specials: int = 0) -> None:
        self.name = name
        self.window = window
        self.tokenizer = tokenizer
        self.specials = specials

    @property
    def version(self) -> str:
        """What a document records: the chunker's version and this measure (`2/wordpiece-<hash>-256`)."""
        return f"{CHUNKER_VERSION}/{self.name}"

    @classmethod
    def words(cls) -> "Measure":
        return cls(f"words-{BUDGET}", BUDGET)

    @classmethod
    def wordpieces(cls, tokenizer_file: Path, window: int) -> "Measure":
        """The measure of a BERT-style embedder: its tokenizer.json and `max_length` (with [CLS]/[SEP])."""
        key = (str(tokenizer_file), window)
        with _LOCK:
            found = _MEASURES.get(key)
            if found is None:
                data = Path(tokenizer_file).read_bytes()
                tok = Tokenizer.from_str(data.decode("utf-8"))
                tok.no_truncation()
                tok.no_padding()
                specials = tok.num_special_tokens_to_add(False)
                found = cls(f"wordpiece-{hashlib.sha256(data).hexdigest()[:12]}-{window}", window, tok, specials)
                _MEASURES[key] = found
        return found

    def units(self, text: str, start: int = 0, end: int | None = None) -> list[Unit]:
        """The words of `text[start:end]` with their spans (in `text`) and token counts."""
        end = len(text) if end is None else end
        if self.tokenizer is None:
            return [(m.start(), m.end(), 1) for m in _TOKEN.finditer(text, start, end)]
        enc = self.tokenizer.encode(text[start:end], add_special_tokens=False)
        out: list[Unit] = []
        last = None
        for wid, (a, b) in zip(enc.word_ids, enc.offsets):
            if wid is not None and wid == last and out:
                s, _, n = out[-1]
                out[-1] = (s, start + b, n + 1)
            else:
                out.append((start + a, start + b, 1))
            last = wid
        return out

    def count(self, text: str) -> int:
        """Tokens of `text` alone (no special tokens)."""
        return sum(u[2] for u in self.units(text))

    def prefix(self, title: str, section: str) -> str:
        """What goes before a chunk's text when it is embedded: title and section path, each on a line,
        cut to at most 1/PREFIX_SHARE of the window."""
        head = f"{title}\n{section}" if section else title
        if self.tokenizer is None:
            return head + "\n"
        units = self.units(head)
        cap = self.window // PREFIX_SHARE
        if sum(u[2] for u in units) > cap:
            total, end = 0, 0
            for s, e, n in units:
                if total + n > cap:
                    break
                total, end = total + n, e
            head = head[:end]
        return head + "\n"

    def budget(self, prefix: str) -> int:
        """Tokens a chunk may hold after `prefix`."""
        if self.tokenizer is None:
            return self.window
        return max(self.window - self.specials - self.count(prefix), 1)


_LOCK = threading.Lock()
_MEASURES: dict[tuple[str, int], Measure] = {}


def measure_for(gateway: Any, alias: str) -> Measure:
    """The measure for embeddings from `alias`: the local embedder's own tokenizer and window when
    every deployment behind the alias is one (the smallest window wins), else words."""
    from keel.gateway.providers.local_embed import LocalEmbedProvider

    deployments = getattr(gateway, "deployments", None)
    if deployments is None:
        return Measure.words()
    found: list[Measure] = []
    for cfg in deployments.for_alias(alias):
        try:
            prov = deployments.provider(cfg)
        except KeelError:  # a deployment that cannot load fails the embedding call, which says why
            return Measure.words()
        if not isinstance(prov, LocalEmbedProvider):
            return Measure.words()
        found.append(Measure.wordpieces(prov.tokenizer_file, prov.max_length))
    return min(found, key=lambda m: (m.window, m.name)) if found else Measure.words()


@dataclass
class Chunk:
    ordinal: int
    text: str
    section: str
    page: int | None
    start: int
    end: int
    tokens: int


def count_tokens(text: str) -> int:
    return len(_TOKEN.findall(text))


def _merge_heading_only(text: str, sections: list[Section]) -> list[Section]:
    out: list[Section] = []
    carry: Section | None = None
    for s in sections:
        if carry is not None:
            s = Section(carry.start, s.end, s.path if s.path[:len(carry.path)] == carry.path else carry.path[
                :_common(carry.path, s.path)], carry.page if carry.page is not None else s.page)
            carry = None
        body = text[s.start:s.end]
        first_nl = body.find("\n")
        rest = body[first_nl:] if first_nl >= 0 else ""
        if s.path and len(_WORD.findall(rest)) < HEADING_ONLY and s is not sections[-1] and len(body) < 400:
            carry = s
            continue
        out.append(s)
    if carry is not None:
        out.append(carry)
    return out


def _common(a: tuple[str, ...], b: tuple[str, ...]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _cut(text: str, spans: list[Unit], lo: int, hi: int) -> int:
    """Index (in units) where a window [lo, hi) should end: after the best break in its second half."""
    if hi >= len(spans):
        return len(spans)
    for pattern in ("\n\n", "\n", ". "):
        for i in range(hi - 1, lo + (hi - lo) // 2, -1):
            if pattern != ". ":
                if pattern in text[spans[i - 1][1]:spans[i][0]]:
                    return i
            else:
                gap = text[spans[i - 1][0]:spans[i][0]]
                if gap.startswith((".", "?", "!")) and gap[1:2].isspace():
                    return i
    return hi


def chunk(parsed: Parsed, measure: Measure | None = None, overlap: int = OVERLAP, *,
          budget: int | None = None) -> list[Chunk]:
    """Chunks of `parsed`, in document order, each with its section path, page and span; with `measure`
    (default: words) each fits its budget, so `measure.prefix(...) + text` fits the embedder's window.
    `budget` caps a chunk's tokens lower still."""
    measure = measure or Measure.words()
    text = parsed.text
    out: list[Chunk] = []
    for s in _merge_heading_only(text, parsed.sections):
        units = measure.units(text, s.start, s.end)
        if not units:
            continue
        section = " > ".join(s.path)
        room = measure.budget(measure.prefix(parsed.title, section))
        room = min(room, budget) if budget else room
        cum = [0]
        for u in units:
            cum.append(cum[-1] + u[2])
        lo = 0
        while lo < len(units):
            # the most units from lo whose tokens fit the budget (at least one)
            hi = max(bisect.bisect_right(cum, cum[lo] + room) - 1, lo + 1)
            hi = _cut(text, units, lo, min(hi, len(units)))
            start, end = units[lo][0], units[hi - 1][1]
            out.append(Chunk(len(out), text[start:end], section, s.page, start, end, cum[hi] - cum[lo]))
            if hi >= len(units):
                break
            back = bisect.bisect_right(cum, cum[hi] - overlap) - 1  # start about `overlap` tokens before hi
            lo = max(min(back, hi - 1), lo + 1)
    return out
