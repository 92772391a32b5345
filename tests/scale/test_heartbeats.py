"""Worker liveness on the store, on an injected clock: a silent process is claimed by exactly one live one, a
takeover that died midway is retried, and a heartbeat too slow for its takeover time is refused at start."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import pytest

from keel.core.db import Store
from keel.core.errors import ConfigError
from keel.core.roles import Heartbeats

pytestmark = pytest.mark.store


def test_exactly_one_live_process_claims_a_silent_one(db_url: str) -> None:
    """Guards takeover exclusivity and retry: two live processes look for the silent one; one claims it, the other
    finds nothing; if the claimant dies before handing its runs over, the other claims it takeover_s later."""
    store = Store.open(db_url)
    store.upgrade()
    now = [datetime(2026, 1, 1, tzinfo=timezone.utc)]
    handed: list[tuple[str, str]] = []

    def beats(name: str) -> Heartbeats:
        async def on_dead(executor: str) -> int:
            handed.append((name, executor))
            return 0
        return Heartbeats(store, name, "worker", interval_s=1, takeover_s=3, on_dead=on_dead, clock=lambda: now[0])

    def later(seconds: float) -> None:
        now[0] += timedelta(seconds=seconds)

    dead, a, b = beats("dead"), beats("a"), beats("b")
    try:
        for p in (dead, a, b):
            p.beat()
        later(2)
        a.beat(), b.beat()
        assert a.claim_dead() == [] and b.claim_dead() == []  # silent 2 s: not yet dead
        later(2)
        a.beat()
        assert a.claim_dead() == ["dead"]
        assert b.claim_dead() == []  # a holds the takeover
        later(2)
        b.beat()
        assert b.claim_dead() == []  # a's beat and its claim are 2 s old
        later(2)  # a died before handing anything over: its claim and its own beat age out
        assert sorted(asyncio.run(b.tick())) == ["a", "dead"]
        assert sorted(e for who, e in handed) == ["a", "dead"] and {who for who, _ in handed} == {"b"}
        assert b.claim_dead() == []  # handed over and forgotten
    finally:
        store.dispose()


def test_a_heartbeat_too_slow_for_its_takeover_time_is_refused(db_url: str) -> None:
    """Guards a setting that would take over live workers: takeover must allow two missed beats."""
    store = Store.open(db_url)

    async def on_dead(executor: str) -> int:
        return 0
    try:
        with pytest.raises(ConfigError, match="worker_takeover_s"):
            Heartbeats(store, "x", "worker", interval_s=5, takeover_s=6, on_dead=on_dead)
    finally:
        store.dispose()
