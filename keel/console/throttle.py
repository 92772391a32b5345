"""Sign-in throttling: after `limit` failed password sign-ins for one email within `window_s`, further tries for
that email are refused (429) without checking the password — no guessing at scale, and no scrypt work spent on
it — until the oldest failure leaves the window. A success clears the email's failures.

Per process: each replica counts its own failures (a guesser spread over N replicas gets N × `limit` tries a
window), which still turns an unbounded online guess into a handful an hour.

Spraying (one guess each for many emails) never trips a per-email count, so failures also draw on one
process-wide token bucket: `per_minute` tokens a minute, bursting to a minute's worth. While it is empty every
password try is refused before the scrypt, so a spray cannot burn the CPU; API-key sign-in is not counted.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

LIMIT, WINDOW_S, MAX_TRACKED, PER_MINUTE = 10, 900.0, 100_000, 30.0


class SignInThrottle:
    """Failed sign-ins per email, on an injectable monotonic clock."""

    def __init__(self, limit: int = LIMIT, window_s: float = WINDOW_S, per_minute: float = PER_MINUTE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.window_s, self.clock = limit, window_s, clock
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()
        self.burst, self.rate = per_minute, per_minute / 60.0  # the spray bucket: capacity, tokens a second
        self._tokens, self._filled_at = per_minute, clock()

    def _refill(self, now: float) -> None:
        self._tokens = min(self.burst, self._tokens + (now - self._filled_at) * self.rate)
        self._filled_at = now

    def spray_wait(self) -> float:
        """Seconds until any password try may be checked again, whatever the email (0: now)."""
        with self._lock:
            self._refill(self.clock())
            return 0.0 if self._tokens >= 1 else (1 - self._tokens) / self.rate

    def _recent(self, who: str, now: float) -> deque[float]:
        q = self._failures.get(who) or deque()
        while q and now - q[0] >= self.window_s:
            q.popleft()
        return q

    def retry_after(self, who: str) -> float:
        """Seconds until `who` may try again (0: now)."""
        who = who.strip().lower()[:320]
        with self._lock:
            now = self.clock()
            q = self._recent(who, now)
            return max(0.0, self.window_s - (now - q[0])) if len(q) >= self.limit else 0.0

    def failed(self, who: str) -> None:
        who = who.strip().lower()[:320]
        with self._lock:
            now = self.clock()
            if len(self._failures) >= MAX_TRACKED:  # bounded memory: forget emails whose window has passed
                self._failures = {k: v for k, v in self._failures.items() if self._recent(k, now)}
                while len(self._failures) >= MAX_TRACKED:  # still full: the earliest tracked goes first
                    self._failures.pop(next(iter(self._failures)))
            q = self._recent(who, now)
            q.append(now)
            self._failures[who] = q
            self._refill(now)
            self._tokens = max(0.0, self._tokens - 1)

    def succeeded(self, who: str) -> None:
        with self._lock:
            self._failures.pop(who.strip().lower()[:320], None)
