"""Stored responses are written on SQLite in multi-row INSERTs (170afe4). Rows per statement must follow the
connection's own bound on a statement's variables, not the library's version: on a build whose bound is lower
(999 here, SQLite's old default), a flush of a few hundred responses failed, was kept for the next try and
failed again for ever — the responses (and every one recorded after them) never stored, and memory grew."""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa

from conftest import lower_sqlite_variable_bound
from keel.core.db import Store
from keel.gateway.ingress.response_store import ResponseStore
from keel.gateway.ingress.response_tables import responses
from keel.identity.principal import Principal

pytestmark = pytest.mark.store
RED = Principal(key_id="k1", role="member", team_id="red")


def test_a_large_flush_fits_the_connections_variable_bound(db_url):
    store = Store.open(db_url)
    lower_sqlite_variable_bound(store)
    store.upgrade()

    async def run() -> None:
        rs = ResponseStore(store, interval=60, clock=lambda: 1_700_000_000.0)
        for i in range(300):
            rid = f"resp_bound_{i}"
            rs.record(RED, {"id": rid, "object": "response", "model": "m", "created_at": 1_700_000_000,
                            "output": []}, [{"type": "message", "role": "user", "content": str(i)}])
        await rs.flush()

    try:
        asyncio.run(run())
        with store.read() as conn:
            n = conn.execute(sa.select(sa.func.count()).select_from(responses)
                             .where(responses.c.id.like("resp_bound_%"))).scalar()
        assert n == 300
    finally:
        store.dispose()
