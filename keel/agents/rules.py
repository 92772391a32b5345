"""Parameter rules of a mandate's tools (`amount <= 500`, `currency in [EUR, USD]`, `to matches '.*@acme\\.com'`)
and the host and recipient allow-lists: parsed when a mandate is defined, checked before every tool call.

A rule is `<argument path> <operator> <YAML value>`; no expression is ever evaluated. A rule on an argument
the call does not give refuses the call, unless the path ends in `?` (`recipient? in [...]`: checked when
given). `in`, `not in`, `matches` and `not matches` on a list argument check every element (`recipients in [a@x, b@x]`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import yaml

OPS = ("<=", ">=", "==", "!=", "<", ">", "not in", "in", "not matches", "matches")
_RULE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)(\??)\s+"
                   r"(<=|>=|==|!=|<|>|not\s+in|in|not\s+matches|matches)\s+(.+?)\s*$", re.DOTALL)
_MISSING = object()


@dataclass(frozen=True)
class Rule:
    """One parsed rule; `text` is what the author wrote (and what a refusal names)."""

    text: str
    path: tuple[str, ...]
    op: str
    value: Any
    optional: bool = False

    def holds(self, args: Any) -> bool:
        """Whether `args` satisfy the rule (an absent argument or a wrongly typed one does not)."""
        got: Any = args
        for part in self.path:
            got = got.get(part, _MISSING) if isinstance(got, dict) else _MISSING
        if got is _MISSING or (got is None and self.optional):
            return self.optional
        if self.op in ("in", "not in"):
            items = got if isinstance(got, list) else [got]
            inside = [any(_same(g, v) for v in self.value) for g in items]
            return all(inside) if self.op == "in" else not any(inside)
        if self.op in ("matches", "not matches"):
            items = got if isinstance(got, list) else [got]
            hits = [isinstance(g, str) and re.fullmatch(self.value, g) is not None for g in items]
            return all(hits) if self.op == "matches" else not any(hits)
        if self.op in ("==", "!="):
            return _same(got, self.value) == (self.op == "==")
        if not _number(got) or not _number(self.value):
            return False
        return {"<=": got <= self.value, ">=": got >= self.value, "<": got < self.value,
                ">": got > self.value}[self.op]


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _same(a: Any, b: Any) -> bool:
    if _number(a) and _number(b):
        return a == b
    return type(a) is type(b) and a == b


def parse_rule(text: str, tool: str | None = None, params: dict[str, Any] | None = None) -> Rule:
    """A rule from its text; ValueError says what is wrong. `refund.amount` in tool `refund` means `amount`."""
    m = _RULE.match(text) if isinstance(text, str) else None
    if m is None:
        raise ValueError(f"{text!r} is not a rule: write '<argument> <op> <value>' with op one of "
                         f"{', '.join(OPS)} (e.g. 'amount <= 500')")
    path = tuple(m.group(1).split("."))
    if tool and len(path) > 1 and path[0] == tool and tool not in ((params or {}).get("properties") or {}):
        path = path[1:]
    op = " ".join(m.group(3).split())
    try:
        value = yaml.safe_load(m.group(4))
    except yaml.YAMLError:
        raise ValueError(f"the value in rule {text!r} is not a YAML value") from None
    if op in ("in", "not in") and not isinstance(value, list):
        raise ValueError(f"rule {text!r}: '{op}' needs a list, e.g. [EUR, USD]")
    if op in ("matches", "not matches"):
        if not isinstance(value, str):
            raise ValueError(f"rule {text!r}: '{op}' needs a regular expression string")
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"rule {text!r}: invalid regular expression ({exc})") from None
    if op in ("<", "<=", ">", ">=") and not _number(value):
        raise ValueError(f"rule {text!r}: '{op}' needs a number")
    return Rule(text=text.strip(), path=path, op=op, value=value, optional=m.group(2) == "?")


# -- allow-lists ------------------------------------------------------------------------------------
_HOST_ENTRY = re.compile(r"^(?:\*\.)?[a-z0-9_](?:[a-z0-9_.-]*[a-z0-9_])?(?::\d{1,5})?$|^\[[0-9a-f:.]+\](?::\d{1,5})?$")


def valid_host_entry(entry: str) -> bool:
    """`host`, `host:port` or `*.domain` (no scheme or path), as workflow `allow_hosts` takes them."""
    return bool(_HOST_ENTRY.match(entry.strip().lower()))


def host_allowed(url: str, allow_hosts: tuple[str, ...]) -> bool:
    """Whether `url` is http(s) to a listed host (the egress checks the address again when it connects)."""
    try:
        parts = urlsplit(url)
        host, port = (parts.hostname or "").rstrip(".").lower(), parts.port
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not host or parts.username or parts.password:
        return False
    port = port or (443 if parts.scheme == "https" else 80)
    for entry in allow_hosts:
        e = entry.strip().lower()
        e_host, e_port = e, None
        if not e.endswith("]") and e.rsplit(":", 1)[-1].isdigit() and ":" in e:
            e_host, p = e.rsplit(":", 1)
            e_port = int(p)
        e_host = e_host.strip("[]")
        if e_port is not None and e_port != port:
            continue
        if host == e_host or (e_host.startswith("*.") and host.endswith(e_host[1:])):
            return True
    return False


_ADDRESS = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$")


def valid_recipient_entry(entry: str) -> bool:
    """`name@example.com` or `*@example.com`."""
    return bool(_ADDRESS.match(entry.replace("*@", "x@", 1) if entry.startswith("*@") else entry))


def recipient_allowed(to: Any, allow: tuple[str, ...]) -> bool:
    """Whether `to` is one plain address that an entry names (exactly, or by `*@domain`)."""
    if not isinstance(to, str) or not _ADDRESS.match(to):
        return False
    to = to.lower()
    domain = to.rsplit("@", 1)[1]
    return any(to == e.lower() or (e.startswith("*@") and domain == e[2:].lower()) for e in allow)
