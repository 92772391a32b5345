"""Process roles and worker liveness on a shared PostgreSQL store.

`keel up` runs everything in one process (role `all`). At scale, `keel serve --role api` replicas answer
requests and queue runs, and `keel worker` processes execute them. Each process that executes runs records a
heartbeat row; a live one that finds another's heartbeat older than `worker_takeover_s` claims it (one
conditional UPDATE, so exactly one live process wins) and hands its unfinished runs to the shared queue.

    beats = Heartbeats(store, "host-1234-ab12", "worker", interval_s=2, takeover_s=10, on_dead=resume_runs)
    await beats.start()   # ... await beats.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import sqlalchemy as sa

from keel.core.clock import utcnow
from keel.core.db import Store, metadata
from keel.core.errors import ConfigError
from keel.core.ids import new_id

log = logging.getLogger("keel.roles")

# One row per live process that executes runs; its migration is identity's id_0004 (with the master key's
# fingerprint: what the processes sharing one store check about each other).
worker_heartbeats = sa.Table(
    "worker_heartbeats", metadata,
    sa.Column("executor_id", sa.String(100), primary_key=True),
    sa.Column("role", sa.String(20), nullable=False),
    sa.Column("host", sa.String(200), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("beat_at", sa.DateTime(timezone=True), nullable=False),
)


def executes_runs(role: str) -> bool:
    return role in ("all", "worker")


def check_role(role: str, dialect: str) -> None:
    """Split roles share work through the store: only PostgreSQL is shared by several processes."""
    if role != "all" and dialect != "postgresql":
        raise ConfigError(f"role {role!r} needs a PostgreSQL store; this one is {dialect}",
                          fix="set KEEL_DATABASE_URL to postgresql+psycopg://…, or run `keel up` / role all")


def executor_id(role: str, configured: str, explicit: bool) -> str:
    """This process's identity for durable runs: the configured one, else `local` for the one-process default,
    else a fresh one per worker process (no stable pod names needed: a dead one's runs are taken over)."""
    if explicit or role == "all":
        return configured
    return f"{socket.gethostname()}-{os.getpid()}-{new_id('x')[-6:]}"


OnDead = Callable[[str], Awaitable[int]]


class Heartbeats:
    """Records this process as alive every `interval_s`; claims processes silent for `takeover_s` and calls
    `on_dead(executor_id)` (which returns how many runs it handed over) before forgetting them."""

    def __init__(self, store: Store, executor: str, role: str, *, interval_s: float, takeover_s: float,
                 on_dead: OnDead, clock: Callable[[], Any] = utcnow) -> None:
        if takeover_s < 2 * interval_s:
            raise ConfigError(f"worker_takeover_s ({takeover_s}) must be at least twice worker_heartbeat_s "
                              f"({interval_s})", fix="raise worker_takeover_s or lower worker_heartbeat_s")
        self.store, self.executor, self.role = store, executor, role
        self.interval_s, self.takeover_s, self.on_dead, self.clock = interval_s, takeover_s, on_dead, clock
        self._task: asyncio.Task | None = None

    def beat(self) -> None:
        now = self.clock()
        with self.store.engine.begin() as conn:
            n = conn.execute(worker_heartbeats.update().where(worker_heartbeats.c.executor_id == self.executor)
                             .values(beat_at=now)).rowcount
            if not n:
                conn.execute(worker_heartbeats.insert().values(
                    executor_id=self.executor, role=self.role, host=socket.gethostname(), pid=os.getpid(),
                    started_at=now, beat_at=now))

    def claim_dead(self) -> list[str]:
        """The silent processes this one now owns the takeover of: their beat is moved to now (so no other live
        process claims them meanwhile, and a takeover that died midway is retried after `takeover_s`)."""
        now = self.clock()
        cutoff = now - timedelta(seconds=self.takeover_s)
        with self.store.read() as conn:
            silent = conn.execute(sa.select(worker_heartbeats.c.executor_id).where(
                worker_heartbeats.c.beat_at < cutoff, worker_heartbeats.c.executor_id != self.executor)).scalars().all()
        claimed = []
        for executor in silent:
            with self.store.engine.begin() as conn:
                n = conn.execute(worker_heartbeats.update().where(
                    worker_heartbeats.c.executor_id == executor, worker_heartbeats.c.beat_at < cutoff)
                    .values(beat_at=now)).rowcount
            if n == 1:
                claimed.append(executor)
        return claimed

    def forget(self, executor: str) -> None:
        with self.store.engine.begin() as conn:
            conn.execute(worker_heartbeats.delete().where(worker_heartbeats.c.executor_id == executor))

    async def tick(self) -> list[str]:
        """One round: beat, then take over each claimed dead process; returns their executor ids."""
        await asyncio.to_thread(self.beat)
        dead = await asyncio.to_thread(self.claim_dead)
        for executor in dead:
            n = await self.on_dead(executor)
            await asyncio.to_thread(self.forget, executor)
            log.warning("took over a dead worker's runs", extra={"dead_executor": executor, "runs": n,
                                                                 "by": self.executor})
        return dead

    async def _loop(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # the store may be restarting: beat again next round
                log.exception("worker heartbeat failed")
            await asyncio.sleep(self.interval_s)

    async def start(self) -> None:
        await asyncio.to_thread(self.beat)
        self._task = asyncio.create_task(self._loop(), name="worker-heartbeats")

    async def stop(self) -> None:
        """Stop beating. The row stays: runs this process leaves unfinished (waiting for a person, say) are
        taken over by a live worker once it has been silent for `takeover_s`, or recovered by its restart."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
