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
