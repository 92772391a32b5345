"""Identifiers: sortable, prefixed, URL-safe."""

from __future__ import annotations

import os
import time

_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"


def _b36(n: int, width: int) -> str:
    out = []
    for _ in range(width):
        n, r = divmod(n, 36)
        out.append(_ALPHABET[r])
    return "".join(reversed(out))


def new_id(prefix: str) -> str:
    """A time-ordered id such as `team_0k3x9…`: millisecond time then 64 random bits."""
    ms = time.time_ns() // 1_000_000
    rnd = int.from_bytes(os.urandom(8), "big")
    return f"{prefix}_{_b36(ms, 9)}{_b36(rnd, 13)}"
