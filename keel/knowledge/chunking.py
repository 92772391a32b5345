"""Structure-aware chunking: sections first, then a token budget with overlap.

A section that fits the budget is one chunk. A longer one is cut into windows of at most
`budget` tokens, preferring to end at a paragraph break, else a line or sentence end, and each
window starts `overlap` tokens before the previous one ended. A section that is only a heading
joins the section after it. Tokens are words and runs of punctuation — a cheap, stable stand-in for
the embedding model's word pieces. Every chunk's text is exactly `parsed.text[start:end]`.

Example:
    >>> from keel.knowledge.parsers import parse
    >>> doc = parse("a.md", b"# A\\n\\nAn introduction long enough to stand as its own chunk.\\n\\n## B\\n\\nbody")
    >>> [c.section for c in chunk(doc)]
    ['A', 'A > B']
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from keel.knowledge.parsers import Parsed, Section

BUDGET, OVERLAP, HEADING_ONLY = 200, 24, 8
_TOKEN = re.compile(r"\w+|[^\w\s]+")
_WORD = re.compile(r"\w+")


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


def _cut(text: str, spans: list[tuple[int, int]], lo: int, hi: int) -> int:
    """Index (in token spans) where a window [lo, hi) should end: after the best break in its second half."""
    if hi >= len(spans):
        return len(spans)
    best = None
    for rank, pattern in enumerate(("\n\n", "\n", ". ")):
        for i in range(hi - 1, lo + (hi - lo) // 2, -1):
            gap = text[spans[i - 1][1]:spans[i][0]] if pattern != ". " else text[spans[i - 1][0]:spans[i][0]]
            if (pattern in gap) if pattern != ". " else (gap.startswith((".", "?", "!")) and gap[1:2].isspace()):
                best = i
                break
        if best is not None:
            return best
    return hi


def chunk(parsed: Parsed, budget: int = BUDGET, overlap: int = OVERLAP) -> list[Chunk]:
    """Chunks of `parsed`, in document order, each with its section path, page and span."""
    text = parsed.text
    out: list[Chunk] = []
    for s in _merge_heading_only(text, parsed.sections):
        spans = [m.span() for m in _TOKEN.finditer(text, s.start, s.end)]
        if not spans:
            continue
        section = " > ".join(s.path)
        lo = 0
        while lo < len(spans):
            hi = _cut(text, spans, lo, min(lo + budget, len(spans)))
            start, end = spans[lo][0], spans[hi - 1][1]
            out.append(Chunk(len(out), text[start:end], section, s.page, start, end, hi - lo))
            if hi >= len(spans):
                break
            lo = max(hi - overlap, lo + 1)
    return out
