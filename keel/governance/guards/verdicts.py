"""Clean verdicts: which (guard, channel, text) scans found nothing, so a text is scanned once, not per call.

An agent's conversation (or any chat client's) is sent again whole on every model call, so without this the
guards re-scan every earlier message and tool output on each call: work that grows with the square of the
conversation. A guard's `scan` is pure and deterministic (the `Guard` protocol), so a text it found nothing in
stays clean; only such verdicts are kept — a text with findings is scanned again on every call, so its events,
redactions, blocks and reviews happen exactly as before.

Keys are a 16-byte BLAKE2b digest of the text (never the text itself) with the guard object's id and the
channel; `PolicyGuards` keeps one `CleanVerdicts` per policy version (a new policy starts empty), and the guard
objects it holds live as long as it, so an id is never another guard's. Bounded: the least recently used
verdict goes first.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

MAX_VERDICTS = 20_000  # ~100 bytes each


class CleanVerdicts:
    """A bounded LRU set of (guard, channel, text digest) whose scan found nothing; thread-safe."""

    def __init__(self, limit: int = MAX_VERDICTS) -> None:
        self.limit = limit
        self._seen: OrderedDict[tuple[int, str, bytes], None] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0

    @staticmethod
    def key(guard: object, channel: str, text: str) -> tuple[int, str, bytes]:
        digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        return id(guard), channel, digest

    def clean(self, key: tuple[int, str, bytes]) -> bool:
        with self._lock:
            if key in self._seen:
                self._seen.move_to_end(key)
                self.hits += 1
                return True
        return False

    def add(self, key: tuple[int, str, bytes]) -> None:
        with self._lock:
            self._seen[key] = None
            self._seen.move_to_end(key)
            while len(self._seen) > self.limit:
                self._seen.popitem(last=False)

    def __len__(self) -> int:
        return len(self._seen)
