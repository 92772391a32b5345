"""The usage ledger writer: rows are queued in memory and written in batches off the hot path.

`record()` never blocks a request; a background task flushes every `interval` seconds or every
`batch_size` rows, and `stop()` drains everything on graceful shutdown. The request id (always one
Keel made: a fresh one per HTTP request, or a deterministic one such as a workflow step's
`{run_id}/{step_id}`) is the primary key, so a call re-run after a crash is never metered twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from keel.core.batches import BatchInsert, WriteQueue
from keel.core.db import Store
from keel.core.tasks import stop_task
from keel.observe import rollup
from keel.observe.spool import Spool
from keel.observe.tables import usage_ledger

log = logging.getLogger("keel.ledger")


class Ledger:
    """Batched, append-only writer of usage rows."""

    def __init__(self, store: Store, interval: float = 0.2, batch_size: int = 500,
                 observer: Callable[[dict[str, Any]], None] | None = None, spool: Spool | None = None) -> None:
        self.store = store
        self.spool = spool  # rows on local disk until written, so a killed process loses none (keel/observe/spool.py)
        # sees every row once it is written (the metrics), in the flushing thread, so what it counts is what the
        # store holds, and the request path pays nothing for it; must not raise
        self.observer = observer
        self.interval = interval
        self.batch_size = batch_size
        self._queue = WriteQueue(self._write_safely)
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._compiled: tuple[sa.Dialect, str, Callable[[dict[str, Any]], Any]] | None = None
        self._batch = BatchInsert(len(usage_ledger.c))
        self.written = 0

    def record(self, row: dict[str, Any]) -> None:
        if self.spool is not None:
            self.spool.append(row)
        self._queue.pending.append(row)
        if len(self._queue.pending) >= self.batch_size:
            self._wake.set()

    def _write(self, rows: list[dict[str, Any]]) -> None:
        with self.store.engine.begin() as conn:
            sql, params = self._insert(conn.dialect)
            self._batch.run(conn, sql, [params(row) for row in rows])
            rollup.add(conn, rows)  # the daily rollups, in the same transaction: counted exactly when written
        self.written += len(rows)

    def _insert(self, dialect: sa.Dialect) -> tuple[str, Callable[[dict[str, Any]], Any]]:
        """The INSERT compiled once for the store's dialect, and a function that turns a row into its
        driver parameters with the columns' own conversions: what `conn.execute(insert, rows)` does per
        row, without its per-row statement bookkeeping (a large share of a flush's time; bench/README.md). A column a
        row leaves out is written as NULL."""
        if self._compiled is None or self._compiled[0] is not dialect:
            compiled = usage_ledger.insert().compile(dialect=dialect)
            convert = {c.name: f for c in usage_ledger.c
                       if (f := c.type.dialect_impl(dialect).bind_processor(dialect)) is not None}
            names = list(compiled.positiontup or ()) if dialect.positional else [c.name for c in usage_ledger.c]
            # the columns with a conversion, by position: the rest are taken as they are, in one comprehension
            # (cheaper per row in the flushing thread than a generator testing each column: measured in
            # bench/README.md); a conversion's answer for None (a JSON column's `null`) is computed once
            converted = [(i, f, f(None)) for i, name in enumerate(names) if (f := convert.get(name)) is not None]

            def values(row: dict[str, Any]) -> list[Any]:
                get = row.get
                out = [get(n) for n in names]
                for i, f, none in converted:
                    v = out[i]
                    out[i] = none if v is None else f(v)
                return out

            def positional(row: dict[str, Any]) -> tuple[Any, ...]:
                return tuple(values(row))

            def named(row: dict[str, Any]) -> dict[str, Any]:
                return dict(zip(names, values(row)))

            self._compiled = (dialect, compiled.string, positional if dialect.positional else named)
        return self._compiled[1], self._compiled[2]

    def flush_sync(self) -> None:
        mark = self.spool.seal() if self.spool is not None else None
        rows = self._queue.take()
        if rows:
            self._write_safely(rows)
        if mark is not None:
            self.spool.release(mark)

    def _write_safely(self, rows: list[dict[str, Any]]) -> None:
        written = rows
        try:
            self._write(rows)
        except sa.exc.IntegrityError:
            # A repeated request id (a workflow step re-run after a crash): write row by row, skip repeats.
            written = []
            for row in rows:
                try:
                    self._write([row])
                    written.append(row)
                except sa.exc.IntegrityError:
                    log.warning("duplicate ledger row skipped", extra={"ledger_request_id": row["request_id"]})
        if self.observer is not None:
            for row in written:
                self.observer(row)

    async def flush(self) -> None:
        """Write every row recorded so far; when it returns they are in the store (a flush already
        writing is waited for, so callers can read their writes)."""
        mark = self.spool.seal() if self.spool is not None else None
        await self._queue.flush()
        if mark is not None:  # every row recorded before the seal is in the store now
            self.spool.release(mark)

    async def _loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.flush()
            except sa.exc.SQLAlchemyError:
                log.exception("ledger flush failed; rows kept for the next try")
                await asyncio.sleep(self.interval)

    async def start(self) -> None:
        if self.spool is not None:
            for rows in self.spool.recover():  # a killed process's rows: recorded again, written by the next flush
                for row in rows:
                    self.record(row)
        self._task = asyncio.create_task(self._loop(), name="keel-ledger")

    async def stop(self) -> None:
        await stop_task(self._task)
        try:
            await self.flush()
        finally:
            if self.spool is not None:
                self.spool.close()
