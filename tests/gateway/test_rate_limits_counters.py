"""Conformance of every `Counters` backend: racing claims never pass the limit, and the sum of grants is
exactly the limit. The store runs on SQLite and PostgreSQL; Redis when KEEL_TEST_REDIS_URL is set."""

from __future__ import annotations

import concurrent.futures as cf
import os
import time
import uuid

import pytest
import sqlalchemy as sa

from keel.core.db import Store
from keel.gateway.limits import Counters, RedisCounters, StoreCounters, rate_counters

pytestmark = pytest.mark.store


@pytest.fixture(params=["store", "redis"])
def counters(request, db_url):
    if request.param == "redis":
        url = os.environ.get("KEEL_TEST_REDIS_URL")
        if not url:
            pytest.skip("set KEEL_TEST_REDIS_URL (and install `redis`) to test the Redis counters")
        yield RedisCounters(url)
        return
    store = Store.open(db_url)
    store.upgrade()
    yield StoreCounters(store)
    store.dispose()


def test_racing_claims_grant_exactly_the_limit(counters: Counters):
    bucket, limit, end = f"key|k{uuid.uuid4().hex}|rpm|0", 500, int(time.time()) + 60
    with cf.ThreadPoolExecutor(8) as pool:
        grants = list(pool.map(lambda want: counters.claim(bucket, want, limit, end), [7] * 100))
    assert sum(grants) == limit
    assert all(0 <= g <= 7 for g in grants)
    assert grants.count(7) == limit // 7 and grants.count(limit % 7) >= 1
    assert counters.claim(bucket, 1, limit, end) == 0
    assert counters.claim(bucket, 5, limit + 3, end) == 3  # a raised limit grants the difference


def test_sweep_forgets_ended_windows(db_url):
    store = Store.open(db_url)
    store.upgrade()
    counters = StoreCounters(store)
    now = time.time()
    counters.claim("old", 1, 10, int(now) - 120)
    counters.claim("current", 1, 10, int(now) + 30)
    counters.sweep(now)
    with store.engine.connect() as conn:
        assert [r.bucket for r in conn.execute(sa.select(rate_counters.c.bucket))] == ["current"]
    store.dispose()


def test_the_next_windows_slices_are_claimed_before_it_starts(db_url, tmp_path):
    """Performance guard: shortly before a window ends, the limits in use claim their next window's slice
    in the background, so the first requests of the next minute make no claim on their path."""
    import asyncio

    from keel.core.settings import Settings
    from keel.gateway.limits import Limit, RateLimiter

    store = Store.open(db_url)
    store.upgrade()
    claims: list[tuple[str, int]] = []

    class Counting(StoreCounters):
        def claim(self, bucket: str, want: int, limit: int, window_end: int) -> int:
            claims.append((bucket, window_end))
            return super().claim(bucket, want, limit, window_end)

    now = [int(time.time()) // 60 * 60 + 3600 + 10.0]  # 10 s into a window
    settings = Settings(data_dir=tmp_path / "data", database_url=db_url, embedded_models=False)
    limiter = RateLimiter(store, settings, None, counters=Counting(store),  # type: ignore[arg-type]
                          clock=lambda: now[0])
    lim = Limit("key", f"k{uuid.uuid4().hex}", rpm=1000, tpm=None)

    async def main() -> None:
        await limiter.admit(None, limiter.needs([lim], lambda: 1))  # type: ignore[arg-type]
        assert len(claims) == 1
        await limiter._tick()  # mid-window: nothing to do
        assert len(claims) == 1
        now[0] += 48.5  # 1.5 s before the window ends
        await limiter._tick()
        assert len(claims) == 2 and claims[1][1] == claims[0][1] + 60  # the next window's slice
        await limiter._tick()
        assert len(claims) == 2  # once
        now[0] += 2  # the next window
        for _ in range(5):
            await limiter.admit(None, limiter.needs([lim], lambda: 1))  # type: ignore[arg-type]
        assert len(claims) == 2, "a request of the new window claimed on its path"

    asyncio.run(main())
    store.dispose()
