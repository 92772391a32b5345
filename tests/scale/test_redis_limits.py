"""Rate limits counted in a real Redis (Debian's `redis-server`, started here) hold across two replicas: together
they admit the limit within 5%, not twice it. The store-counted variant is tests/gateway/test_rate_limits.py."""

from __future__ import annotations

import asyncio

import pytest

from conftest import fake_upstream
from tests.gateway.test_rate_limits import burst, new_key, write_config

pytestmark = pytest.mark.store


def test_one_limit_across_two_replicas_counted_in_redis(one_window, tmp_path, redis_url) -> None:  # noqa: ANN001
    """Guards the Redis path of KEEL_REDIS_URL across replicas: 300 requests split over two processes against an
    rpm limit of 200 admit 190-200, every other one a 429 (rerun, with a new key, if a minute began during them)."""
    limit, sent = 200, 300
    with fake_upstream("--latency-ms", "20") as root:
        cfg = write_config(tmp_path, root + "/v1")

        def scenario(start, minute) -> None:  # noqa: ANN001
            one = start("one", config=cfg, KEEL_REDIS_URL=redis_url)
            key = new_key(one)
            assert one.admin().put(f"/admin/limits/keys/{key['id']}", json={"rpm": limit}).status_code == 200
            two = start("two", config=cfg, KEEL_REDIS_URL=redis_url)

            async def both() -> list[int]:
                a, b = await asyncio.gather(burst(one.url, key["key"], sent // 2, 16),
                                            burst(two.url, key["key"], sent // 2, 16))
                return a + b

            minute.begin()
            codes = asyncio.run(both())
            admitted = codes.count(200)
            assert set(codes) <= {200, 429}, codes
            assert limit * 0.95 <= admitted <= limit, admitted

        one_window(scenario)
