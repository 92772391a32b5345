"""Rate limits: requests and tokens per minute, per API key, per team and per deployment, shared by
every replica.

A limit is counted in fixed one-minute windows in the store (`rate_counters`: one row per scope, id,
metric and window). A replica does not ask the store about every request: it claims a slice of the
window's allowance with one atomic upsert (`… DO UPDATE SET n = n + grant WHERE n < limit RETURNING`),
spends it in memory, and claims again when it runs out. The stored count only grows, and never past
the limit, so all replicas together admit at most `limit` per window. A slice is at most 1% of the
limit (one request for small limits), so little allowance is stranded in a replica when a window ends.

Tokens/min counts the prompt estimate (`count_tokens`) up front and corrects it with the real usage
when the call ends; the correction is made in memory (a replica's allowance may go below zero, and it
claims the difference before it admits more).

Keys and teams get limits through `/admin/limits`, deployments through their `rpm`/`tpm` settings.
A key, team or deployment without a limit costs no store round trip: definitions are cached in memory,
re-read every 2 s, and at once after an admin change in this process.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import sqlalchemy as sa

from keel.core.clock import utcnow
from keel.core.db import Store, metadata
from keel.core.errors import ConfigError, DeploymentRateLimited, NotFound, RateLimited
from keel.core.settings import DeploymentConfig, Settings
from keel.gateway.admission import Done, Fresh, Lookups, Ticker, prompt_tokens, settled
from keel.gateway.deployments import Deployments
from keel.gateway.pipeline import Call, Next, Upstream, deployment_kind
from keel.gateway.protocol import Provider, Usage

log = logging.getLogger("keel.gateway.limits")

WINDOW_S = 60
SLICE = 0.01  # a claim asks for at most this share of a limit, and at least what the request needs
RELOAD_S = 2.0  # definitions are re-read this often while requests flow
SWEEP_S = 60.0
PREFETCH_S = 2.5  # within a window's last seconds, the next window's slices are claimed for the limits in use

rate_limits = sa.Table(
    "rate_limits", metadata,
    sa.Column("scope", sa.String(20), primary_key=True),
    sa.Column("scope_id", sa.String(300), primary_key=True),
    sa.Column("rpm", sa.BigInteger, nullable=True),
    sa.Column("tpm", sa.BigInteger, nullable=True),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

rate_counters = sa.Table(
    "rate_counters", metadata,
    sa.Column("bucket", sa.String(400), primary_key=True),
    sa.Column("n", sa.BigInteger, nullable=False),
    sa.Column("g", sa.BigInteger, nullable=False),
    sa.Column("window_end", sa.BigInteger, nullable=False, index=True),
)

_CLAIM = sa.text("""
INSERT INTO rate_counters (bucket, n, g, window_end) VALUES (:bucket, :first, :first, :window_end)
ON CONFLICT (bucket) DO UPDATE SET
  g = CASE WHEN CAST(:want AS BIGINT) <= CAST(:lim AS BIGINT) - rate_counters.n
           THEN CAST(:want AS BIGINT) ELSE CAST(:lim AS BIGINT) - rate_counters.n END,
  n = rate_counters.n + CASE WHEN CAST(:want AS BIGINT) <= CAST(:lim AS BIGINT) - rate_counters.n
           THEN CAST(:want AS BIGINT) ELSE CAST(:lim AS BIGINT) - rate_counters.n END
WHERE rate_counters.n < CAST(:lim AS BIGINT)
RETURNING g
""")


# -- counters ----------------------------------------------------------------------------------------------

class Counters(Protocol):
    """Where windows are counted, shared by every replica that uses the same backend.

    `claim(bucket, want, limit, window_end)` atomically adds `min(want, limit - n)` to the bucket's
    count `n` unless `n` already reached `limit`, and returns what it added (0 when full). It never lets
    `n` pass `limit`, however many callers race. Blocking: called from a worker thread.
    `sweep(now)` forgets windows that ended before `now`.
    """

    def claim(self, bucket: str, want: int, limit: int, window_end: int) -> int: ...

    def sweep(self, now: float) -> None: ...


class StoreCounters:
    """Counters in the store: one upsert per claim (PostgreSQL, SQLite ≥ 3.35)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def claim(self, bucket: str, want: int, limit: int, window_end: int) -> int:
        with self.store.engine.begin() as conn:
            row = conn.execute(_CLAIM, {"bucket": bucket, "first": min(want, limit), "want": want, "lim": limit,
                                        "window_end": window_end}).first()
        return int(row[0]) if row is not None else 0

    def sweep(self, now: float) -> None:
        with self.store.engine.begin() as conn:
            conn.execute(rate_counters.delete().where(rate_counters.c.window_end < int(now) - WINDOW_S))


_REDIS_CLAIM = """
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
local want, lim = tonumber(ARGV[1]), tonumber(ARGV[2])
if n >= lim then return 0 end
local g = math.min(want, lim - n)
redis.call('INCRBY', KEYS[1], g)
redis.call('EXPIREAT', KEYS[1], ARGV[3])
return g
"""


class RedisCounters:
    """Counters in Redis (`KEEL_REDIS_URL`): one Lua script per claim, keys expire with their window."""

    def __init__(self, url: str) -> None:
        try:
            import redis  # type: ignore[import-not-found]
        except ImportError:
            raise ConfigError("KEEL_REDIS_URL is set but the `redis` package is not installed",
                              fix="pip install redis, or unset KEEL_REDIS_URL to count in the database") from None
        self.client = redis.Redis.from_url(url)
        self._claim = self.client.register_script(_REDIS_CLAIM)

    def claim(self, bucket: str, want: int, limit: int, window_end: int) -> int:
        return int(self._claim(keys=[f"keel:rl:{bucket}"], args=[want, limit, window_end + WINDOW_S]))

    def sweep(self, now: float) -> None:
        return None  # keys expire by themselves


def make_counters(settings: Settings, store: Store) -> Counters:
    return RedisCounters(settings.redis_url) if settings.redis_url else StoreCounters(store)


# -- definitions and buckets -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Limit:
    """Requests and tokens per minute allowed to one key, team or deployment (None: unlimited)."""

    scope: str
    scope_id: str
    rpm: int | None = None
    tpm: int | None = None

    def to_dict(self, source: str = "api") -> dict[str, Any]:
        return {"scope": self.scope, "id": self.scope_id, "rpm": self.rpm, "tpm": self.tpm,
                "window_s": WINDOW_S, "source": source}


class Bucket:
    """One limit's allowance in one window, as this replica sees it."""

    __slots__ = ("row", "scope", "scope_id", "metric", "limit", "window_end", "avail", "full", "lock", "claimed")

    def __init__(self, row: str, lim: Limit, metric: str, limit: int, window_end: int) -> None:
        self.row = row
        self.scope, self.scope_id, self.metric = lim.scope, lim.scope_id, metric
        self.limit = limit
        self.window_end = window_end
        self.avail = 0  # claimed from the store and not yet used; below zero after a usage correction
        self.full = False  # the store has no more for this window
        self.lock: asyncio.Lock | None = None
        self.claimed = 0  # granted to this replica by the store in this window

    def remaining(self) -> int:
        """What is left of the window's allowance as this replica knows it: exact with one replica; with
        several, others' use shows once the store has no more (`full`)."""
        return max(self.avail if self.full else self.limit - self.claimed + self.avail, 0)


Taken = list[tuple[Bucket, int]]
RATE_LIMITS = "keel.rate_limits"  # `Call.annotations` key: the key and team buckets the call was admitted on


def rate_headers(taken: Taken, now: float) -> dict[str, str]:
    """The `x-ratelimit-*` headers OpenAI's clients (and peers') read: per unit, the tightest limit."""
    tightest: dict[str, Bucket] = {}
    for b, _n in taken:
        unit = "requests" if b.metric == "rpm" else "tokens"
        cur = tightest.get(unit)
        if cur is None or b.remaining() < cur.remaining():
            tightest[unit] = b
    h: dict[str, str] = {}
    for unit, b in tightest.items():
        h[f"x-ratelimit-limit-{unit}"] = str(b.limit)
        h[f"x-ratelimit-remaining-{unit}"] = str(b.remaining())
        h[f"x-ratelimit-reset-{unit}"] = f"{max(math.ceil(b.window_end - now), 0)}s"
    return h


class RateLimiter:
    """The admission stage for key and team limits; `DeploymentLimits` uses it around each deployment call.

    >>> limiter = RateLimiter(store, settings, deployments)
    >>> upstream = DeploymentLimits(Providers(deployments), limiter)
    >>> gateway = Gateway(deployments, ledger, tracer, stages=[limiter, ...], router=Router(upstream, settings))
    """

    changes_answer = False  # it settles tokens after `nxt`, and never touches the answer

    def __init__(self, store: Store, settings: Settings, deployments: Deployments,
                 counters: Counters | None = None, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock  # wall-clock seconds: windows are whole minutes of it, the same on every replica
        self.deployments = deployments
        self.counters = counters or make_counters(settings, store)
        self.lookups = Lookups(deployments, settings)
        self._limits: dict[tuple[str, str], Limit] = {}
        self._fresh = Fresh(self.reload)
        self._swept = time.monotonic()
        self._buckets: dict[tuple[str, str, str, int, int], Bucket] = {}
        self._window = (0, 0)
        self._ticker = Ticker("keel-rate-limits", 1.0, self._tick)
        self.reload()

    async def start(self) -> None:
        """Run the background upkeep (next-window claims, definition reloads, sweeps) until `stop`."""
        self._ticker.start()

    async def stop(self) -> None:
        await self._ticker.stop()

    # -- the governed path -----------------------------------------------------------------------------
    async def handle(self, call: Call, nxt: Next) -> Any:
        if self._fresh.stale():
            await self._fresh.refresh()
        p = call.principal
        key = self._limits.get(("key", p.key_id))
        team = self._limits.get(("team", p.team_id)) if p.team_id else None
        if key is None and team is None:
            return await nxt(call)
        limits = [lim for lim in (key, team) if lim is not None]
        needs = self.needs(limits, lambda: prompt_tokens(call, self._alias_provider(call)))
        correct = await self.admit(call, needs)
        call.annotations[RATE_LIMITS] = needs
        if correct is None:
            return await nxt(call)
        try:
            out = await nxt(call)
        except BaseException:
            correct(None)
            raise
        return settled(call, out, correct)

    def _alias_provider(self, call: Call) -> Provider | None:
        deps = self.lookups.deployments(call.alias, deployment_kind(call))
        return self.lookups.provider(deps[0]) if deps else None

    def needs(self, limits: list[Limit], estimate: Callable[[], int]) -> Taken:
        """What the call takes from each of the limits' buckets in the current window."""
        start, end = self._current_window()
        needs: Taken = []
        tokens: int | None = None
        for lim in limits:
            for metric, value in (("rpm", lim.rpm), ("tpm", lim.tpm)):
                if not value:
                    continue
                if metric == "tpm":
                    tokens = estimate() if tokens is None else tokens
                need = 1 if metric == "rpm" else max(tokens or 0, 1)
                needs.append((self._bucket(lim, metric, value, start, end), need))
        return needs

    async def admit(self, call: Call, needs: Taken) -> Done | None:
        """Take `needs` from every bucket, or none of them and raise 429. Gives what corrects the tokens
        taken on the estimate to the real usage once the call is over (None: no limit counts tokens)."""
        for bucket, need in needs:
            if bucket.avail < need:
                break
        else:  # the common case: all in memory, nothing awaited
            for bucket, need in needs:
                bucket.avail -= need
            return self._corrector(call, needs)
        taken: Taken = []
        for bucket, need in needs:
            if bucket.avail >= need:
                bucket.avail -= need
            elif not await self._take(bucket, need):
                for b, n in taken:
                    b.avail += n
                raise self._refused(bucket, need, self.clock())
            taken.append((bucket, need))
        return self._corrector(call, taken)

    @staticmethod
    def _corrector(call: Call, taken: Taken) -> Done | None:
        tokens = [(b, n) for b, n in taken if b.metric == "tpm"]
        if not tokens:
            return None

        def correct(usage: Usage | None) -> None:
            used = 0 if usage is None or call.cache_hit else usage.total_tokens
            for b, n in tokens:
                b.avail += n - used

        return correct

    async def _take(self, b: Bucket, need: int) -> bool:
        if b.avail >= need:
            b.avail -= need
            return True
        if b.full or need > b.limit:
            return False
        if b.lock is None:
            b.lock = asyncio.Lock()
        async with b.lock:  # one claim at a time per bucket in this replica
            if b.avail >= need:
                b.avail -= need
                return True
            if b.full:
                return False
            want = max(need - b.avail, int(b.limit * SLICE))
            got = await asyncio.get_running_loop().run_in_executor(
                None, self.counters.claim, b.row, want, b.limit, b.window_end)
            b.avail += got
            b.claimed += got
            if got < want:
                b.full = True
            if b.avail >= need:
                b.avail -= need
                return True
            return False

    def _current_window(self) -> tuple[int, int]:
        now = self.clock()
        if now >= self._window[1]:
            start = int(now // WINDOW_S * WINDOW_S)
            self._window = (start, start + WINDOW_S)
        return self._window

    def _bucket(self, lim: Limit, metric: str, value: int, start: int, end: int) -> Bucket:
        key = (lim.scope, lim.scope_id, metric, value, start)
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = Bucket(f"{lim.scope}|{lim.scope_id}|{metric}|{start}", lim, metric, value, end)
        return b

    @staticmethod
    def _refused(b: Bucket, need: int, now: float) -> RateLimited:
        retry = max(1, math.ceil(b.window_end - now))
        unit = "requests" if b.metric == "rpm" else "tokens"
        who = f"{b.scope} {b.scope_id}"
        if need > b.limit:
            detail = (f"this request needs about {need} tokens, more than the {b.limit} tokens per minute "
                      f"that {who} may use")
        else:
            detail = f"rate limit reached: {who} may use {b.limit} {unit} per minute; the window resets in {retry} s"
        if b.scope == "deployment":
            fix = f"retry after {retry} s, or raise the deployment's {b.metric} in keel.yaml or /admin/deployments"
        else:
            fix = (f"retry after {retry} s, or ask an admin to raise it: PUT /admin/limits/{b.scope}s/{b.scope_id}")
        resets = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(b.window_end))
        unit_headers = rate_headers([(b, need)], now) if b.scope != "deployment" else {}
        kind = DeploymentRateLimited if b.scope == "deployment" else RateLimited
        return kind(detail, fix=fix, headers={"Retry-After": str(retry), **unit_headers},
                    limit={"scope": b.scope, "id": b.scope_id, "metric": b.metric, "value": b.limit,
                           "window_s": WINDOW_S, "resets_at": resets, "retry_after_s": retry})

    # -- background upkeep ------------------------------------------------------------------------------
    async def _tick(self) -> None:
        now = self.clock()
        for k in [k for k, b in self._buckets.items() if b.window_end < now - 5]:
            del self._buckets[k]
        loop = asyncio.get_running_loop()
        await self._prefetch(now)
        if time.monotonic() - self._fresh.at >= RELOAD_S:
            await loop.run_in_executor(None, self.reload)
        if time.monotonic() - self._swept >= SWEEP_S:
            self._swept = time.monotonic()
            await loop.run_in_executor(None, self.counters.sweep, now)

    async def _prefetch(self, now: float) -> None:
        """Shortly before a window ends, claim the next window's slice of every limit used in this one, so
        the first requests of the next minute need no store round trip (one claim per limit on some
        request's path, every minute, otherwise). A slice a replica then does not use is lost for that
        window, as any unused slice is: at most `SLICE` of each limit."""
        start, end = self._current_window()
        if end - now > PREFETCH_S:
            return
        loop = asyncio.get_running_loop()
        for (scope, scope_id, metric, value, wstart) in list(self._buckets):
            if wstart != start:
                continue
            nb = self._bucket(Limit(scope, scope_id), metric, value, end, end + WINDOW_S)
            if nb.lock is None:
                nb.lock = asyncio.Lock()
            if nb.avail > 0 or nb.full or nb.lock.locked():
                continue
            async with nb.lock:  # a request of the new window waits for this claim instead of making its own
                want = max(1, int(nb.limit * SLICE))
                got = await loop.run_in_executor(None, self.counters.claim, nb.row, want, nb.limit, nb.window_end)
                nb.avail += got
                nb.claimed += got
                if got < want:
                    nb.full = True

    # -- definitions (also the admin API's service functions) ----------------------------------------------
    def reload(self) -> None:
        with self.store.engine.connect() as conn:
            rows = conn.execute(sa.select(rate_limits)).all()
        self._limits = {(r.scope, r.scope_id): Limit(r.scope, r.scope_id, r.rpm, r.tpm) for r in rows}
        self._fresh.at = time.monotonic()

    def listing(self) -> list[dict[str, Any]]:
        """Stored key and team limits, then the limits deployments carry in their settings."""
        self.reload()
        out = [lim.to_dict() for _k, lim in sorted(self._limits.items())]
        for cfg in self.deployments.all().values():
            if cfg.rpm is not None or cfg.tpm is not None:
                out.append(Limit("deployment", cfg.deployment_id(), cfg.rpm, cfg.tpm).to_dict("deployment"))
        return out

    def get(self, scope: str, scope_id: str) -> dict[str, Any]:
        self.reload()
        lim = self._limits.get((scope, scope_id))
        if lim is None:
            raise NotFound(f"{scope} {scope_id} has no rate limit",
                           fix=f"set one: PUT /admin/limits/{scope}s/{scope_id}", scope=scope, scope_id=scope_id)
        return lim.to_dict()

    def put(self, scope: str, scope_id: str, rpm: int | None, tpm: int | None) -> dict[str, Any]:
        values = {"rpm": rpm, "tpm": tpm, "updated_at": utcnow()}
        where = (rate_limits.c.scope == scope) & (rate_limits.c.scope_id == scope_id)
        with self.store.engine.begin() as conn:
            if not conn.execute(rate_limits.update().where(where).values(**values)).rowcount:
                conn.execute(rate_limits.insert().values(scope=scope, scope_id=scope_id, **values))
        self.reload()
        return Limit(scope, scope_id, rpm, tpm).to_dict()

    def delete(self, scope: str, scope_id: str) -> None:
        where = (rate_limits.c.scope == scope) & (rate_limits.c.scope_id == scope_id)
        with self.store.engine.begin() as conn:
            if not conn.execute(rate_limits.delete().where(where)).rowcount:
                raise NotFound(f"{scope} {scope_id} has no rate limit", fix="list limits at GET /admin/limits",
                               scope=scope, scope_id=scope_id)
        self.reload()


class DeploymentLimits:
    """An `Upstream` that takes from a deployment's own `rpm`/`tpm` (upstream protection) before each
    attempt on it, and corrects the tokens to the real usage after; the router sees the same shape.

    >>> upstream = DeploymentLimits(Providers(deployments), limiter)
    """

    def __init__(self, inner: Upstream, limiter: RateLimiter) -> None:
        self.inner = inner
        self.limiter = limiter
        self.deployments = inner.deployments
        self.resolve = inner.resolve
        self.check_capabilities = inner.check_capabilities
        self._invoke = inner.invoke
        self._own: dict[int, tuple[DeploymentConfig, Limit]] = {}

    async def invoke(self, call: Call, cfg: DeploymentConfig) -> Any:
        if cfg.rpm is None and cfg.tpm is None:
            return await self._invoke(call, cfg)
        held = self._own.get(id(cfg))
        if held is None or held[0] is not cfg or (held[1].rpm, held[1].tpm) != (cfg.rpm, cfg.tpm):
            if len(self._own) > 1000:
                self._own.clear()
            held = self._own[id(cfg)] = (cfg, Limit("deployment", cfg.deployment_id(), cfg.rpm, cfg.tpm))
        limiter = self.limiter
        needs = limiter.needs([held[1]], lambda: prompt_tokens(call, limiter.lookups.provider(cfg)))
        correct = await limiter.admit(call, needs)
        if correct is None:
            return await self._invoke(call, cfg)
        try:
            out = await self._invoke(call, cfg)
        except BaseException:
            correct(None)
            raise
        return settled(call, out, correct)
