"""Encoded runs in text — percent-encoding, base64, hex — decoded so a guard can look inside them.

A value sent as `ada%40example.com` or `YWRhQGV4YW1wbGUuY29t` is the same value to whoever decodes it;
a guard that matched only the surface would let it through. `decoded_findings` runs a guard's own scan
on each decoded run and reports what it finds as a span of the original text: the exact characters for
percent-encoding, the whole run for base64 and hex (whose characters do not map one to one).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable

from keel.governance.guards.base import Finding

_PERCENT = re.compile(r"%[0-9A-Fa-f]{2}")
_DELIMS = frozenset(" \t\r\n<>\"'()[]{},;")
# base64 (standard or URL-safe, padding optional) of at least 12 bytes; hex of at least 8 bytes.
_B64 = re.compile(r"(?<![A-Za-z0-9+/_-])[A-Za-z0-9+/_-]{16,}={0,2}(?![A-Za-z0-9+/=_-])")
_HEX = re.compile(r"(?<![0-9A-Za-z])(?:[0-9A-Fa-f]{2}){8,}(?![0-9A-Za-z])")
MAX_DEPTH = 2  # a value encoded twice (base64 of percent-encoding) is still found; deeper is not tried
# Unicode tag characters: invisible when shown, yet many models read U+E0020–U+E007E as the ASCII each shadows
# ("ASCII smuggling"). `reveal` reads them so (the rest of the block as spaces), one character for one, so a
# finding's span in the revealed text is its span in the text as sent.
_TAG = re.compile("[\U000E0000-\U000E007F]")
_TAGS = {c: (c - 0xE0000 if 0x20 <= c - 0xE0000 < 0x7F else 0x20) for c in range(0xE0000, 0xE0080)}


def reveal(text: str) -> str:
    """`text` with each Unicode tag character read as the ASCII it shadows (same length, same spans)."""
    return text.translate(_TAGS) if _TAG.search(text) else text



def _printable(raw: bytes) -> str | None:
    """`raw` as text if it is UTF-8 and mostly printable (so a hash or random bytes are not scanned)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    good = sum(1 for c in text if c.isprintable() or c in "\n\t\r")
    return text if text and good >= 0.9 * len(text) else None


def _percent_decode(run: str, offset: int) -> tuple[str, list[tuple[int, int]]]:
    """The decoded run and, for each decoded character, its span in the original text."""
    data = bytearray()
    spans: list[tuple[int, int]] = []  # per byte
    i = 0
    while i < len(run):
        if run[i] == "%" and _PERCENT.match(run, i):
            data.append(int(run[i + 1:i + 3], 16))
            spans.append((offset + i, offset + i + 3))
            i += 3
        else:
            for b in run[i].encode("utf-8"):
                data.append(b)
                spans.append((offset + i, offset + i + 1))
            i += 1
    text = bytes(data).decode("utf-8", "surrogateescape")
    out: list[tuple[int, int]] = []
    pos = 0
    for ch in text:
        n = len(ch.encode("utf-8", "surrogateescape"))
        out.append((spans[pos][0], spans[pos + n - 1][1]))
        pos += n
    return text, out


def _b64(run: str) -> str | None:
    body = run.rstrip("=")
    if len(body) % 4 == 1:
        return None
    padded = body + "=" * (-len(body) % 4)
    try:
        raw = base64.b64decode(padded, altchars=b"-_" if ("-" in body or "_" in body) else None, validate=True)
    except (binascii.Error, ValueError):
        return None
    return _printable(raw)


def encoded_runs(text: str) -> list[tuple[int, int, str, list[tuple[int, int]] | None]]:
    """(start, end, decoded text, per-character spans or None) for every encoded run in `text`."""
    out: list[tuple[int, int, str, list[tuple[int, int]] | None]] = []
    if "%" in text:
        end = 0
        for m in _PERCENT.finditer(text):
            if m.start() < end:
                continue
            start = m.start()
            while start > 0 and text[start - 1] not in _DELIMS:
                start -= 1
            end = m.end()
            while end < len(text) and text[end] not in _DELIMS:
                end += 1
            decoded, spans = _percent_decode(text[start:end], start)
            out.append((start, end, decoded, spans))
    for m in _HEX.finditer(text):
        decoded_hex = _printable(bytes.fromhex(m.group()))
        if decoded_hex is not None:
            out.append((m.start(), m.end(), decoded_hex, None))
    for m in _B64.finditer(text):
        if _HEX.fullmatch(m.group()):
            continue
        decoded_b64 = _b64(m.group())
        if decoded_b64 is not None:
            out.append((m.start(), m.end(), decoded_b64, None))
    return out


def decoded_findings(text: str, scan: Callable[[str], list[Finding]], depth: int = 0) -> list[Finding]:
    """What `scan` finds inside the encoded runs of `text`, as spans of `text`."""
    found: list[Finding] = []
    for start, end, decoded, spans in encoded_runs(text):
        inner = scan(decoded)
        if depth + 1 < MAX_DEPTH:
            inner += decoded_findings(decoded, scan, depth + 1) if spans is None else []
        for f in inner:
            if spans is not None:
                a, b = spans[f.start][0], spans[f.end - 1][1]
            else:
                a, b = start, end
            found.append(Finding(f.guard, f.type, a, b, f.score, f.signals))
    return found
