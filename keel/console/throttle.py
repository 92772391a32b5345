"""Sign-in throttling: after `limit` failed password sign-ins for one email within `window_s`, further tries for
that email are refused (429) without checking the password — no guessing at scale, and no scrypt work spent on
it — until the oldest failure leaves the window. A success clears the email's failures.

Per process: each replica counts its own failures (a guesser spread over N replicas gets N × `limit` tries a
window), which still turns an unbounded online guess into a handful an hour.

Spraying (one guess each for many emails) never trips a per-email count, so each failure is also charged to the
client's address, and failures draw on one process-wide token bucket: `per_minute` tokens a minute, bursting to
a minute's worth. While it is empty, password tries from an address with `address_limit` or more failures in
the window are refused before the scrypt; an address with fewer (the real user's) is still checked. So a
sprayer burns at most the bucket's CPU and locks out only itself, never everyone (CAPEC-2: an attacker must not
turn the lockout against other users; failures keyed on user and address as in django-axes' lockout
parameters). What a sprayer with many fresh addresses still costs: `address_limit` scrypts per address a
window. API-key sign-in is not counted.

The address is the connection's peer; X-Forwarded-For is believed only when the peer is one of
`trusted_proxies`, and then only its entries added by trusted proxies: the right-most entry that is not one.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

LIMIT, WINDOW_S, MAX_TRACKED, PER_MINUTE, ADDRESS_LIMIT = 10, 900.0, 100_000, 30.0, 3
AUDIT_EVERY_S, KEY_FAILURES_AUDITED = 60.0, 10  # audit periods; failed key sign-ins audited one by one per period
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
V = TypeVar("V")


def networks(values: Iterable[str]) -> tuple[Network, ...]:
    """`trusted_proxies` entries (addresses or CIDR blocks) as networks; ValueError names a bad one."""
    return tuple(ipaddress.ip_network(v.strip(), strict=False) for v in values)


def client_address(peer: str | None, forwarded_for: Sequence[str], trusted: Sequence[Network]) -> str:
    """Who sent the request: `peer`, or — while the hop at hand is a trusted proxy — the X-Forwarded-For entry it
    names, walking from the right (a client's own, left-hand entries are never believed past an untrusted hop)."""
    hops = [h.strip() for value in forwarded_for for h in value.split(",") if h.strip()]
    here = peer or "unknown"
    while hops and _trusted(here, trusted):
        here = hops.pop()
    return here[:64]


def email_key(email: str) -> str:
    """What an email's failures are counted under: trimmed, lower-case, at most 320 characters (RFC 5321's bound)."""
    return email.strip().lower()[:320]


def address_key(address: str) -> str:
    """What failures are charged to: an IPv4 address, or an IPv6 address's /64 (one host commonly holds a whole
    /64 and may send each try from a fresh address in it)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def _trusted(address: str, trusted: Sequence[Network]) -> bool:
    if not trusted:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in trusted)


def _make_room(table: dict[str, V], live: Callable[[str, V], bool]) -> dict[str, V]:
    """Bounded memory for a full `table`: the entries still `live`, and while that is still full, the earliest
    tracked go first."""
    kept = {k: v for k, v in table.items() if live(k, v)}
    while len(kept) >= MAX_TRACKED:
        kept.pop(next(iter(kept)))
    return kept


class _Failures:
    """Failure times per name (an email or an address) within a window, in bounded memory."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.by_name: dict[str, deque[float]] = {}

    def recent(self, who: str, now: float) -> deque[float]:
        q = self.by_name.get(who) or deque()
        while q and now - q[0] >= self.window_s:
            q.popleft()
        return q

    def add(self, who: str, now: float) -> None:
        if len(self.by_name) >= MAX_TRACKED:
            self.by_name = _make_room(self.by_name, lambda k, _: bool(self.recent(k, now)))
        q = self.recent(who, now)
        q.append(now)
        self.by_name[who] = q


class SignInThrottle:
    """Failed sign-ins per email and per client address, on an injectable monotonic clock."""

    def __init__(self, limit: int = LIMIT, window_s: float = WINDOW_S, per_minute: float = PER_MINUTE,
                 clock: Callable[[], float] = time.monotonic, address_limit: int = ADDRESS_LIMIT,
                 trusted_proxies: Sequence[Network] = ()) -> None:
        self.trusted = tuple(trusted_proxies)  # peers whose X-Forwarded-For names the client
        self.limit, self.window_s, self.clock, self.address_limit = limit, window_s, clock, address_limit
        self._emails, self._addresses = _Failures(window_s), _Failures(window_s)
        self._audited: dict[str, tuple[float, int, int]] = {}  # who → (period opened, audited in it, held back)
        self._lock = threading.Lock()
        self.burst, self.rate = per_minute, per_minute / 60.0  # the spray bucket: capacity, tokens a second
        self._tokens, self._filled_at = per_minute, clock()

    def _refill(self, now: float) -> None:
        self._tokens = min(self.burst, self._tokens + (now - self._filled_at) * self.rate)
        self._filled_at = now

    def spray_wait(self, address: str = "") -> float:
        """Seconds until a password try from `address` may be checked again, whatever the email (0: now): only an
        address at its own limit waits for the process-wide bucket."""
        with self._lock:
            now = self.clock()
            self._refill(now)
            if self._tokens >= 1 or len(self._addresses.recent(address_key(address), now)) < self.address_limit:
                return 0.0
            return (1 - self._tokens) / self.rate

    def retry_after(self, who: str) -> float:
        """Seconds until `who` may try again (0: now)."""
        who = email_key(who)
        with self._lock:
            now = self.clock()
            q = self._emails.recent(who, now)
            return max(0.0, self.window_s - (now - q[0])) if len(q) >= self.limit else 0.0

    def failed(self, who: str, address: str = "") -> None:
        with self._lock:
            now = self.clock()
            self._emails.add(email_key(who), now)
            self._addresses.add(address_key(address), now)
            self._refill(now)
            self._tokens = max(0.0, self._tokens - 1)

    def to_audit(self, who: str, burst: int = 1, every_s: float = AUDIT_EVERY_S) -> int:
        """Count one event of `who` (a throttled email or address, an address failing key sign-ins); how many to
        audit now: the first `burst` in each `every_s` one by one, after that 0 until the next period opens with
        the count held back — so a flood of requests cannot write an audit event each."""
        with self._lock:
            now = self.clock()
            if len(self._audited) >= MAX_TRACKED and who not in self._audited:
                self._audited = _make_room(self._audited, lambda _, v: now - v[0] < every_s)
            opened, audited, held = self._audited.get(who, (-every_s, 0, 0))
            if now - opened >= every_s:
                opened, audited = now, 0
            if audited < burst:
                self._audited[who] = (opened, audited + 1, 0)
                return held + 1
            self._audited[who] = (opened, audited, held + 1)
            return 0

    def succeeded(self, who: str) -> None:
        with self._lock:
            self._emails.by_name.pop(email_key(who), None)
