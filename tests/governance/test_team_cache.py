"""A team's default classification is cached briefly: a team in steady use is re-read in the background
(no request waits on the store), and an entry past the cache time is never used."""

from __future__ import annotations

import asyncio
import threading

import pytest

from keel.core.db import Store
from keel.governance.teams import TEAM_CACHE_S, TeamClassifications
from keel.identity import service as identity

pytestmark = pytest.mark.store


def test_a_team_in_use_is_reread_off_the_request_path(db_url, monkeypatch):
    store = Store.open(db_url)
    store.upgrade()
    team = identity.create_team(store, "risk", classification="confidential")
    now = [100.0]
    gate = threading.Event()
    gate.set()
    reads: list[str] = []
    real = identity.get_team

    def get_team(store_, ref):
        reads.append(ref)
        assert gate.wait(10)
        return real(store_, ref)

    monkeypatch.setattr(identity, "get_team", get_team)
    teams = TeamClassifications(store, clock=lambda: now[0])
    ttl = TEAM_CACHE_S

    async def main() -> None:
        assert await teams.get(team["id"]) == "confidential"  # first use: read
        now[0] += ttl * 0.3
        await teams.get(team["id"])
        assert len(reads) == 1  # fresh
        gate.clear()  # the store is slow from here
        now[0] += ttl * 0.4  # past half the cache time: served, and re-read in the background
        assert await asyncio.wait_for(teams.get(team["id"]), 1) == "confidential"
        await asyncio.wait_for(teams.get(team["id"]), 1)
        await asyncio.sleep(0.1)
        assert len(reads) == 2  # one background read, however many requests
        gate.set()
        while teams.reads:
            await asyncio.sleep(0.01)
        now[0] += ttl * 2  # past the cache time: read on the request's path
        gate.clear()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.shield(teams.get(team["id"])), 0.2)
        gate.set()

    asyncio.run(main())
    store.dispose()
