"""Rows kept in memory and written to the store in batches, off the event loop (the usage ledger and
the guard-event log, the stored responses)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa

Rows = list[dict[str, Any]]


class WriteQueue:
    """`pending` rows, written by `write(rows)` in a worker thread on `flush()`.

    `flush()` returns once every row queued before it is in the store: a flush already writing is
    waited for (callers read their writes), and the rows of a failed write are put back in front,
    in order, for the next try.
    """

    def __init__(self, write: Callable[[Rows], None]) -> None:
        self.pending: Rows = []
        self._write = write
        self._lock = asyncio.Lock()

    def take(self) -> Rows:
        rows, self.pending = self.pending, []
        return rows

    async def flush(self) -> None:
        async with self._lock:
            rows = self.take()
            if not rows:
                return
            try:
                await asyncio.to_thread(self._write, rows)
            except sa.exc.SQLAlchemyError:
                self.pending[:0] = rows
                raise


MAX_ROWS = 1024  # VALUES groups in one statement at most


class BatchInsert:
    """Runs one table's single-row INSERT (`sql`, compiled for the connection's dialect) for a batch of rows'
    driver parameters. SQLite's `executemany` steps each row with the GIL released and taken back (two hand-overs a
    row between the writing thread and the event loop's), so there the batch goes in a few statements of many VALUES
    groups, each a power of two rows (a handful of cached statements), as many as the connection's own bound on a
    statement's variables allows (32,766 by default since SQLite 3.32, 999 before; a build may lower it). Other
    dialects: `executemany`. Measured in bench/README.md (the ledger's flushing thread per row)."""

    def __init__(self, columns: int) -> None:
        self.columns = columns
        self._sql: str | None = None
        self._multi: dict[int, str] = {}  # multi-row INSERTs of `_sql` by their number of rows
        self._per: int | None = None  # rows per multi-row INSERT on this store's connections

    def run(self, conn: Any, sql: str, params: Sequence[Any]) -> None:
        """Write `params` (one entry per row: a tuple for positional dialects) with `sql` on `conn`."""
        if conn.dialect.paramstyle != "qmark":
            conn.exec_driver_sql(sql, list(params))
            return
        if sql != self._sql:
            self._sql, self._multi = sql, {}
        if self._per is None:
            limit = conn.connection.dbapi_connection.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
            self._per = min(MAX_ROWS, 1 << max(1, limit // self.columns).bit_length() - 1)
        start = 0
        while start < len(params):
            n = min(self._per, 1 << (len(params) - start).bit_length() - 1)
            conn.exec_driver_sql(self._values(sql, n), tuple(v for row in params[start:start + n] for v in row))
            start += n

    def _values(self, sql: str, n: int) -> str:
        found = self._multi.get(n)
        if found is None:
            head, _, group = sql.partition(" VALUES ")
            found = self._multi[n] = f"{head} VALUES {', '.join([group] * n)}"
        return found
