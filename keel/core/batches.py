"""Rows kept in memory and written to the store in batches, off the event loop (the usage ledger and
the guard-event log)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
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
