"""A team's default classification is cached briefly: a team in steady use is re-read in the background
(no request waits on the store), and an entry past the cache time is never used."""

from __future__ import annotations

import asyncio
import threading

import pytest

from conftest import eventually_async

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
        await eventually_async(lambda: len(reads) >= 2, timeout=10)  # the background re-read has started
        gate.set()
        main_only = {asyncio.current_task()}
        await eventually_async(lambda: asyncio.all_tasks() == main_only, timeout=10)  # every read started ended
        assert len(reads) == 2 and not teams.reads  # one background read, however many requests
        now[0] += ttl * 2  # past the cache time: read on the request's path
        gate.clear()
        request = asyncio.create_task(teams.get(team["id"]))
        await eventually_async(lambda: len(reads) == 3, timeout=10)  # its read is at the (slow) store…
        assert not request.done()  # … and the request waits for it
        gate.set()
        assert await asyncio.wait_for(request, 10) == "confidential"

    asyncio.run(main())
    store.dispose()
