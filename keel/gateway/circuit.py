"""A circuit breaker per deployment: stop sending traffic to a deployment that keeps failing, then probe it.

    closed ──N consecutive failures──► open ──cool-down passed──► half-open: one trial request
      ▲                                 ▲                                  │
      └──────── trial succeeded ────────┼────────── trial failed ──────────┘

Results are reported with the token `acquire()` returned, so a request let through in an earlier
state (say, one still in flight when the circuit opened) cannot close or re-open it by accident.
State lives in the process: each replica keeps its own breakers.
"""

from __future__ import annotations

import time
from collections.abc import Callable

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class Circuit:
    """One deployment's breaker.

    >>> c = Circuit(failures=2, cooldown_s=10, clock=lambda: 0.0)
    >>> t = c.acquire(); c.record(t, False); c.record(c.acquire(), False); c.state
    'open'
    >>> c.acquire() is None
    True
    """

    def __init__(self, failures: int = 5, cooldown_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = failures
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.state = CLOSED
        self.failures = 0  # consecutive, while closed
        self.opened_at = 0.0
        self.epoch = 0  # bumped on every state change; tokens from older epochs are ignored
        self._trial_at: float | None = None  # when the half-open trial was let through; None: slot free

    def available(self) -> bool:
        """Would `acquire()` let a request through now? (Does not take the half-open trial slot.)"""
        if self.state == CLOSED:
            return True
        now = self.clock()
        if self.state == OPEN:
            return now - self.opened_at >= self.cooldown_s
        # A trial that never reported (its caller vanished) frees the slot after one more cool-down.
        return self._trial_at is None or now - self._trial_at >= self.cooldown_s

    def acquire(self) -> int | None:
        """Permission for one request: a token for `record`, or None while the circuit rejects."""
        if self.state == CLOSED:
            return self.epoch
        if not self.available():
            return None
        self._move(HALF_OPEN)
        self._trial_at = self.clock()
        return self.epoch

    def record(self, token: int | None, ok: bool | None) -> None:
        """Report how a request ended: True served, False failed, None no verdict (cancelled, caller's error).

        `token=None` reports against the current state (used for a stream that fails after its first delta).
        """
        if token is not None and token != self.epoch:
            return
        if self.state == CLOSED:
            if ok is True:
                self.failures = 0
            elif ok is False:
                self.failures += 1
                if self.failures >= self.threshold:
                    self._open()
        elif self.state == HALF_OPEN:
            if ok is True:
                self._move(CLOSED)
            elif ok is False:
                self._open()
            else:
                self._trial_at = None

    def retry_in(self) -> float:
        """Seconds until the circuit lets a trial through (0 when it would now)."""
        if self.available():
            return 0.0
        since = self.opened_at if self.state == OPEN else (self._trial_at or 0.0)
        return max(0.0, self.cooldown_s - (self.clock() - since))

    def _open(self) -> None:
        self._move(OPEN)
        self.opened_at = self.clock()

    def _move(self, state: str) -> None:
        self.state = state
        self.epoch += 1
        self.failures = 0
        self._trial_at = None
