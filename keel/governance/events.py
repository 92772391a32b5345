"""Guard events: what each guard found in each request (type, span, action — never the value).

Written in batches off the request path, like the usage ledger; `flush()` runs before reads.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import sqlalchemy as sa

from keel.core.clock import utcnow
from keel.core.batches import WriteQueue
from keel.core.db import Store
from keel.core.ids import new_id
from keel.core.tasks import stop_task
from keel.governance.tables import guard_events

log = logging.getLogger("keel.guards")


class GuardEventLog:
    """Batched, append-only writer and reader of guard events."""

    def __init__(self, store: Store, interval: float = 0.2) -> None:
        self.store = store
        self.interval = interval
        self._queue = WriteQueue(lambda rows: self._write(rows))  # `_write` looked up per flush, like the ledger's
        self._task: asyncio.Task[None] | None = None

    def record(self, request_id: str, key_id: str | None, team_id: str | None, policy_version: int | None,
               events: list[dict[str, Any]]) -> None:
        ts = utcnow()
        for e in events:
            self._queue.pending.append({"id": new_id("gev"), "request_id": request_id, "ts": ts, "key_id": key_id,
                                        "team_id": team_id, "policy_version": policy_version, **e})

    def _write(self, rows: list[dict[str, Any]]) -> None:
        with self.store.engine.begin() as conn:
            conn.execute(guard_events.insert(), rows)

    async def flush(self) -> None:
        """Write every event recorded so far (waiting for a flush already writing: read-your-writes)."""
        await self._queue.flush()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.flush()
            except sa.exc.SQLAlchemyError:
                log.exception("guard event flush failed; events kept for the next try")

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="keel-guard-events")

    async def stop(self) -> None:
        await stop_task(self._task)
        await self.flush()

    def query(self, *, request_id: str | None = None, key_id: str | None = None, team_id: str | None = None,
              limit: int = 200) -> list[dict[str, Any]]:
        q = sa.select(guard_events).order_by(guard_events.c.ts.desc()).limit(max(1, min(limit, 1000)))
        if request_id:
            q = q.where(guard_events.c.request_id == request_id)
        if key_id:
            q = q.where(guard_events.c.key_id == key_id)
        if team_id:
            q = q.where(guard_events.c.team_id == team_id)
        with self.store.engine.connect() as conn:
            rows = conn.execute(q).all()
        return [{"id": r.id, "request_id": r.request_id, "ts": r.ts.isoformat() if r.ts else None,
                 "key_id": r.key_id, "team_id": r.team_id, "guard": r.guard, "side": r.side, "type": r.type,
                 "location": r.location, "start": r.start, "end": r.end, "score": r.score, "action": r.action,
                 "policy_version": r.policy_version} for r in rows]
