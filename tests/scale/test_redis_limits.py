"""Rate limits counted in a real Redis (Debian's `redis-server`, started here) hold across two replicas: together
they admit the limit within 5%, not twice it. The store-counted variant is tests/gateway/test_rate_limits.py."""

from __future__ import annotations

import pytest

from conftest import fake_upstream
from tests.gateway.test_rate_limits import admit_across_two_replicas, write_config

pytestmark = pytest.mark.store


def test_one_limit_across_two_replicas_counted_in_redis(one_window, tmp_path, redis_url) -> None:  # noqa: ANN001
    """Guards the Redis path of KEEL_REDIS_URL across replicas: 300 requests split over two processes against an
    rpm limit of 200 admit 190-200, every other one a 429 (rerun, with a new key, if a minute began during them)."""
    with fake_upstream("--latency-ms", "20") as root:
        admit_across_two_replicas(one_window, write_config(tmp_path, root + "/v1"), {"KEEL_REDIS_URL": redis_url})
