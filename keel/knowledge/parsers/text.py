"""Markdown, reStructuredText and plain text: the text is kept as written; headings mark sections.

Markdown: ATX (`## Title`) and setext (`Title` over `===`/`---`) headings, none inside code fences.
reST: a title line under- (and optionally over-) lined with one punctuation character; levels
follow the order in which the adornment styles first appear, as docutils assigns them.
"""

from __future__ import annotations

import re

from keel.knowledge.parsers.base import Parsed, Section

_ATX = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)[ \t#]*$")
_FENCE = re.compile(r"^ {0,3}(```|~~~)")
_ADORN = re.compile(r"^([!-/:-@\[-`{-~])\1{2,}\s*$")


def decode(data: bytes) -> str:
    """UTF-8 (BOM or not), UTF-16 with a BOM, else Windows-1252; newlines normalised to `\\n`."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        text = data.decode("utf-16", errors="replace")
    else:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            text = data.decode("cp1252", errors="replace")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _line_starts(lines: list[str]) -> list[int]:
    starts, pos = [], 0
    for ln in lines:
        starts.append(pos)
        pos += len(ln) + 1
    return starts


def _md_headings(lines: list[str]) -> list[tuple[int, int, str]]:
    """(line index, level, title) of each Markdown heading."""
    out, fenced = [], False
    for i, ln in enumerate(lines):
        if _FENCE.match(ln):
            fenced = not fenced
            continue
        if fenced:
            continue
        m = _ATX.match(ln)
        if m:
            out.append((i, len(m.group(1)), m.group(2).strip()))
        elif (i + 1 < len(lines) and ln.strip() and not ln.startswith(("    ", "\t", "-", "*", ">", "|"))
              and re.fullmatch(r" {0,3}(=+|-+)\s*", lines[i + 1]) and (i == 0 or not lines[i - 1].strip())):
            out.append((i, 1 if lines[i + 1].strip()[0] == "=" else 2, ln.strip()))
    return out


def _rst_headings(lines: list[str]) -> list[tuple[int, int, str]]:
    out, styles = [], []
    i = 0
    while i < len(lines) - 1:
        ln, nxt = lines[i], lines[i + 1]
        over = None
        if _ADORN.match(ln) and i + 2 < len(lines) and _ADORN.match(lines[i + 2]) and lines[i + 1].strip() \
                and lines[i + 2].strip()[0] == ln.strip()[0]:
            over, title, start = ln.strip()[0], lines[i + 1].strip(), i
            step = 3
        elif ln.strip() and not ln[0].isspace() and _ADORN.match(nxt) and len(nxt.strip()) >= len(ln.strip()) \
                and not _ADORN.match(ln):
            title, start, step = ln.strip(), i, 2
        else:
            i += 1
            continue
        style = (over or "", (lines[i + 2] if over else nxt).strip()[0])
        if style not in styles:
            styles.append(style)
        out.append((start, styles.index(style) + 1, title))
        i += step
    return out


def parse_text(name: str, data: bytes, fmt: str) -> Parsed:
    text = decode(data)
    lines = text.split("\n")
    heads = _md_headings(lines) if fmt == "md" else _rst_headings(lines) if fmt == "rst" else []
    starts = _line_starts(lines)
    sections: list[Section] = []
    path: list[tuple[int, str]] = []
    if not heads or heads[0][0] > 0:
        sections.append(Section(0, 0, ()))
    for line, level, title in heads:
        while path and path[-1][0] >= level:
            path.pop()
        path.append((level, title))
        sections.append(Section(starts[line], 0, tuple(t for _, t in path)))
    for i, s in enumerate(sections):
        s.end = sections[i + 1].start if i + 1 < len(sections) else len(text)
    sections = [s for s in sections if text[s.start:s.end].strip()]
    title = next((t for _, lvl, t in heads if lvl == 1), heads[0][2] if heads else "")
    return Parsed(text=text, sections=sections, title=title, format=fmt)
