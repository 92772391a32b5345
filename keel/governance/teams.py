"""Each team's default classification, as the policy stage reads it on every call: cached briefly, re-read
in the background while a team is in use, so no request waits on the store for it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from starlette.concurrency import run_in_threadpool

from keel.core.db import Store
from keel.core.errors import NotFound
from keel.identity import service as identity

log = logging.getLogger("keel.governance")
TEAM_CACHE_S = 5.0


class TeamClassifications:
    """A team's default classification, cached for TEAM_CACHE_S: an entry past half of that is re-read in
    the background while requests go on with it (a team in use never waits on the store); one past the
    whole time is never used. `clock` is injected so tests control time.

    >>> teams = TeamClassifications(store)
    >>> await teams.get("team_…")
    'confidential'
    """

    def __init__(self, store: Store, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.clock = clock
        self._teams: dict[str, tuple[float, str | None]] = {}
        self.reads: dict[str, asyncio.Task[None]] = {}  # background re-reads in flight, by team

    async def get(self, team_id: str | None) -> str | None:
        if team_id is None:
            return None
        hit = self._teams.get(team_id)
        now = self.clock()
        if hit is not None and hit[0] > now:
            if hit[0] - now < TEAM_CACHE_S / 2 and team_id not in self.reads:
                task = asyncio.get_running_loop().create_task(self._refresh(team_id))
                self.reads[team_id] = task
                task.add_done_callback(lambda _t: self.reads.pop(team_id, None))
            return hit[1]
        return await self._read(team_id)

    async def _refresh(self, team_id: str) -> None:
        try:
            await self._read(team_id)
        except Exception:  # the entry runs out on its own; the next request past it reads the store itself
            log.exception("re-reading a team's classification failed", extra={"team_id": team_id})

    async def _read(self, team_id: str) -> str | None:
        started = self.clock()
        try:
            value = (await run_in_threadpool(identity.get_team, self.store, team_id))["classification"]
        except NotFound:
            value = None
        self._teams[team_id] = (started + TEAM_CACHE_S, value)
        return value
