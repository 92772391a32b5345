"""Stored Responses API answers (`store: true`), read back by `GET /v1/responses/{id}` and continued by
`previous_response_id`.

Who sees a stored response follows the rule of workflow runs: its team (a team-less key's: that key, or
another key of the same user), admins, and auditors without a team. Only its owner (the key, or the
same user) or an admin deletes it. Anyone else is told it does not exist (404), never that it is hidden.

Writes are batched off the request path like the usage ledger's; until its batch is in the store a
response is served from memory by the replica that made it, so its own caller reads it at once. Another
replica finds it after the next flush (`interval`, 50 ms by default); one that finds nothing waits two
flush intervals and looks again before it answers 404.

Responses older than `retention_days` (the `responses_retention_days` setting; 0 keeps them forever) read as
404, like an unknown id, and the same background writer deletes them every `purge_every_s` on its clock.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import orjson
import sqlalchemy as sa

from keel.core.batches import BatchInsert, WriteQueue
from keel.core.db import Store
from keel.core.errors import BadRequest, Forbidden, NotFound
from keel.gateway.ingress.response_tables import responses
from keel.identity.principal import Principal

log = logging.getLogger("keel.gateway.responses")
MAX_CHAIN = 256  # responses followed back through `previous_response_id`
DAY_S = 86_400.0


def _sees_all(p: Principal) -> bool:
    return p.is_admin or (p.team_id is None and p.has("audit.read"))


def visible(p: Principal, row: dict[str, Any]) -> bool:
    """May `p` read stored response `row`? Its team, else its owner; admins and team-less auditors always."""
    if _sees_all(p):
        return True
    if row["team_id"] is not None:
        return row["team_id"] == p.team_id
    return owns(p, row)


def owns(p: Principal, row: dict[str, Any]) -> bool:
    return row["key_id"] == p.key_id or (row["user_id"] is not None and row["user_id"] == p.user_id)


def not_found(response_id: str) -> NotFound:
    return NotFound(f"response {response_id!r} not found", response_id=response_id,
                    fix="use the id of a response this key's team stored (`store` true, the default), "
                        "not one that was deleted")


def _decoded(row: dict[str, Any]) -> dict[str, Any]:
    """A row not yet written, as the store reads it back: `input` and `response` decoded."""
    return {**row, "input": orjson.loads(row["input"]), "response": orjson.loads(row["response"])}


class ResponseStore:
    """Stored responses, written in batches; every method runs on the event loop.

    >>> store.record(principal, response_obj, input_items)
    >>> row = await store.get(principal, "resp_…")   # NotFound unless `principal` may read it
    """

    def __init__(self, store: Store, interval: float = 0.05, *, retention_days: float = 30,
                 clock: Callable[[], float] = time.time, purge_every_s: float = 3600.0) -> None:
        self.store = store
        self.interval = interval
        self.retention_s = retention_days * DAY_S  # 0: kept forever
        self.clock = clock  # wall-clock seconds: what is expired, and when the next purge is due (tests move it)
        self.purge_every_s = purge_every_s
        self._next_purge = 0.0  # the first pass of the writer purges
        self._queue = WriteQueue(self._write)
        self._unwritten: dict[str, dict[str, Any]] = {}  # queued rows by id, until their batch is in
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        self._compiled: tuple[sa.Dialect, str, list[str]] | None = None
        self._batch = BatchInsert(len(responses.c))

    def record(self, p: Principal, response: dict[str, Any], input_items: list[dict[str, Any]],
               encoded: bytes | None = None) -> None:
        """Keep `response` (the object returned; `encoded`: its JSON as sent, when the caller has it) with this
        request's `input_items`, owned by `p`. The row holds both as JSON text from here on: encoded once (the
        answer's own bytes where given), nothing re-encoded by the writer, and no object graph kept alive
        (and walked by the garbage collector) until its batch is in."""
        row = {"id": response["id"], "key_id": p.key_id, "user_id": p.user_id, "team_id": p.team_id,
               "model": response["model"], "previous_response_id": response.get("previous_response_id"),
               "input": orjson.dumps(input_items).decode(),
               "response": (encoded if encoded is not None else orjson.dumps(response)).decode(),
               "created_at": float(response["created_at"])}
        self._unwritten[row["id"]] = row
        self._queue.pending.append(row)
        if len(self._queue.pending) >= 200:
            self._wake.set()

    def _write(self, rows: list[dict[str, Any]]) -> None:
        """The batch's INSERT, compiled once per dialect and run at the driver with the JSON columns as the text
        `record` made: the ORM-level insert spent more CPU per row than the request it stores (keel/core/batches.py)."""
        with self.store.engine.begin() as conn:
            dialect = conn.dialect
            if self._compiled is None or self._compiled[0] is not dialect:
                compiled = responses.insert().compile(dialect=dialect)
                names = list(compiled.positiontup or ()) if dialect.positional else [c.name for c in responses.c]
                self._compiled = (dialect, compiled.string, names)
            _, sql, names = self._compiled
            self._batch.run(conn, sql, [tuple(row[n] for n in names) for row in rows] if dialect.positional
                            else [{n: row[n] for n in names} for row in rows])

    async def flush(self) -> None:
        """Write every response recorded so far (a flush already writing is waited for)."""
        rows = list(self._queue.pending)
        await self._queue.flush()
        for row in rows:
            if self._unwritten.get(row["id"]) is row:
                del self._unwritten[row["id"]]

    async def _row(self, p: Principal, response_id: str) -> dict[str, Any] | None:
        """`response_id` if `p` may read it and it is not expired, else None — by the same work either way: the
        query carries the visibility and retention, so another team's row is never read or decoded, and a miss
        (unknown, foreign, expired) waits the two flushes another replica's fresh response might need."""
        def mine() -> dict[str, Any] | None:
            row = self._unwritten.get(response_id)
            return _decoded(row) if row is not None and visible(p, row) and not self._expired(row) else None

        def read() -> dict[str, Any] | None:
            query = sa.select(responses).where(responses.c.id == response_id, *self._readable(p))
            with self.store.read() as conn:
                found = conn.execute(query).first()
            return dict(found._mapping) if found is not None else None

        found = mine() or await asyncio.to_thread(read)
        if found is None:  # perhaps another replica made it and has not flushed yet: give it two flushes
            await asyncio.sleep(2 * self.interval)
            found = mine() or await asyncio.to_thread(read)
        return found

    def _readable(self, p: Principal) -> list[Any]:
        """`visible` and not expired, as WHERE clauses."""
        where: list[Any] = []
        if self.retention_s:
            where.append(responses.c.created_at >= self.clock() - self.retention_s)
        if _sees_all(p):
            return where
        owner = (responses.c.key_id == p.key_id) | (
            (responses.c.user_id == p.user_id) if p.user_id is not None else sa.false())
        team = (responses.c.team_id == p.team_id) if p.team_id is not None else sa.false()
        where.append(team | (responses.c.team_id.is_(None) & owner))
        return where

    def _expired(self, row: dict[str, Any]) -> bool:
        return bool(self.retention_s) and row["created_at"] < self.clock() - self.retention_s

    async def purge(self) -> int:
        """Delete the stored responses older than the retention (none when it is 0); how many went."""
        if not self.retention_s:
            return 0
        cutoff = self.clock() - self.retention_s
        for rid in [rid for rid, row in self._unwritten.items() if row["created_at"] < cutoff]:
            del self._unwritten[rid]  # its queued INSERT still lands: the next purge takes it

        def delete() -> int:
            with self.store.engine.begin() as conn:
                return conn.execute(responses.delete().where(responses.c.created_at < cutoff)).rowcount or 0

        gone = await asyncio.to_thread(delete)
        if gone:
            log.info("deleted %d stored responses older than %g days", gone, self.retention_s / DAY_S)
        return gone

    async def get(self, p: Principal, response_id: str) -> dict[str, Any]:
        """The stored row of `response_id` (`input`, `response`, owner columns); NotFound if `p` may not read it
        or it is past the retention (purged or about to be)."""
        row = await self._row(p, response_id)
        if row is None:
            raise not_found(response_id)
        return row

    async def conversation(self, p: Principal, response_id: str) -> list[dict[str, Any]]:
        """The input and output items of `response_id` and of every response before it, oldest first: what a
        response continuing it starts from. Each one on the way must be readable by `p`."""
        chain: list[dict[str, Any]] = []
        next_id: str | None = response_id
        while next_id is not None:
            if len(chain) >= MAX_CHAIN:
                raise BadRequest(f"the conversation before response {response_id!r} is longer than {MAX_CHAIN} "
                                "responses", fix="start a new conversation with the items it needs as `input`",
                                response_id=response_id)
            row = await self.get(p, next_id)
            chain.append(row)
            next_id = row["previous_response_id"]
        items: list[dict[str, Any]] = []
        for row in reversed(chain):
            items.extend(row["input"])
            items.extend(row["response"].get("output") or [])
        return items

    async def delete(self, p: Principal, response_id: str) -> None:
        """Delete `response_id`: its owner or an admin may; others who may read it get 403, the rest 404."""
        row = await self.get(p, response_id)
        if not (p.is_admin or owns(p, row)):
            raise Forbidden(f"response {response_id!r} belongs to another key", response_id=response_id,
                            fix="delete it with the key that created it, or ask an admin")
        await self.flush()

        def delete() -> None:
            with self.store.engine.begin() as conn:
                conn.execute(responses.delete().where(responses.c.id == response_id))

        await asyncio.to_thread(delete)

    async def _loop(self) -> None:
        while not self._stopping:
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.flush()
            except sa.exc.SQLAlchemyError:
                log.exception("writing stored responses failed; kept for the next try")
                await asyncio.sleep(self.interval)
            if self.retention_s and self.clock() >= self._next_purge:
                self._next_purge = self.clock() + self.purge_every_s
                try:
                    await self.purge()
                except sa.exc.SQLAlchemyError:
                    log.exception("deleting expired stored responses failed; tried again at the next purge")

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="keel-responses")

    async def stop(self) -> None:
        """End the background writer after the write it is doing (cancelling it mid-write could lose the
        batch it holds), then write what is left."""
        if self._task is not None:
            self._stopping = True
            self._wake.set()
            await asyncio.wait([self._task])
        await self.flush()
