"""The guard protocol, what a guard finds, and how a policy action is applied to the text.

A guard only *finds*; the policy decides the action (`allow`, `redact`, `block`, `review`, and for
retrieved passages and tool outputs `quote` or `drop`), so every guard is treated the same way.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

SIDES = ("input", "output", "context")


@dataclass(frozen=True)
class Finding:
    """One thing a guard found: its type and character span. The value itself is never kept."""

    guard: str
    type: str
    start: int
    end: int
    score: float | None = None
    signals: tuple[str, ...] = ()  # why, where a guard can say (the injection guard's structural signals)

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"guard": self.guard, "type": self.type, "start": self.start, "end": self.end,
                                  "score": self.score}
        if self.signals:
            out["signals"] = list(self.signals)
        return out


@runtime_checkable
class Guard(Protocol):
    """Finds sensitive or hostile content in text.

    Semantics every implementation keeps (checked by `tests/governance/test_guard_conformance.py`):
    - `scan(text)` is pure, thread-safe and deterministic; it returns findings sorted by `start`,
      non-overlapping, with `0 <= start < end <= len(text)`, and `[]` for empty text.
    - A finding carries a type and a span, never the matched value (so events can be stored).
    - `sides` names where a policy may apply it: `input`, `output`, `context`.
    - It stays fast: all built-in guards together take well under 2 ms per KB of text.

    >>> from keel.governance.guards.pii import PiiGuard
    >>> [f.type for f in PiiGuard().scan("mail me at ada@example.com")]
    ['email']
    """

    name: ClassVar[str]
    sides: ClassVar[frozenset[str]]

    def scan(self, text: str) -> list[Finding]: ...


def resolve_overlaps(found: list[tuple[int, int, int, Finding]]) -> list[Finding]:
    """Keep non-overlapping findings: lower priority number wins, then the longer span."""
    chosen: list[Finding] = []
    taken: list[tuple[int, int]] = []
    for _prio, _neg_len, _start, f in sorted(found, key=lambda t: (t[0], t[1], t[2])):
        if all(f.end <= a or f.start >= b for a, b in taken):
            chosen.append(f)
            taken.append((f.start, f.end))
    return sorted(chosen, key=lambda f: f.start)


class Placeholders:
    """Stable placeholders (`<EMAIL_3f9a1c>`): the same value gives the same placeholder for one caller.

    The value → placeholder map lives only in memory for the current call, so a response can be
    restored for the same caller; nothing of it is stored.
    """

    def __init__(self, secret: bytes, caller: str) -> None:
        self._secret = secret
        self._caller = caller.encode()
        self.values: dict[str, str] = {}

    def __call__(self, kind: str, value: str, remember: bool = True) -> str:
        """The placeholder for `value`; only remembered ones (the caller's own input) are restored."""
        digest = hmac.new(self._secret, self._caller + b"\0" + value.encode(), hashlib.sha256).hexdigest()[:6]
        token = f"<{kind.upper()}_{digest}>"
        if remember:
            self.values[token] = value
        return token

    def restore(self, text: str, escape: Callable[[str], str] | None = None) -> str:
        """`text` with each remembered placeholder replaced by its value (`escape`d, e.g. for JSON text)."""
        if not self.values or "<" not in text:
            return text
        for token, value in self.values.items():
            if token in text:
                text = text.replace(token, escape(value) if escape else value)
        return text


def redact(text: str, findings: list[Finding], placeholder: Callable[[str, str], str]) -> str:
    """Replace each finding's span by `placeholder(type, value)`."""
    if not findings:
        return text
    out, pos = [], 0
    for f in findings:
        out.append(text[pos:f.start])
        out.append(placeholder(f.type, text[f.start:f.end]))
        pos = f.end
    out.append(text[pos:])
    return "".join(out)
