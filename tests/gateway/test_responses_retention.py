"""Stored responses expire: `responses_retention_days` (default 30, 0 keeps them forever). The store's own
background writer deletes rows older than that (checked on its clock, injected here, so no test waits on real
time), and until it does an expired row already reads as 404, like an id that never existed."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import sqlalchemy as sa

from conftest import Clock, eventually_async

pytestmark = pytest.mark.store

DAY = 86_400.0


def response(rid: str, created_at: float) -> dict[str, Any]:
    return {"id": rid, "object": "response", "model": "m", "created_at": int(created_at),
            "output": [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "hi"}]}]}


def stored_ids(store) -> set[str]:
    from keel.gateway.ingress.response_tables import responses

    with store.read() as conn:
        return {r[0] for r in conn.execute(sa.select(responses.c.id))}


def run(db_url: str, body) -> None:
    from keel.core.db import Store

    store = Store.open(db_url)
    store.upgrade()
    try:
        asyncio.run(body(store))
    finally:
        store.dispose()


def test_the_background_writer_purges_responses_past_retention(db_url):
    from keel.core.errors import NotFound
    from keel.gateway.ingress.response_store import ResponseStore
    from keel.identity.principal import Principal

    owner = Principal(key_id="k1", role="member", team_id="t1")
    clock = Clock(1_700_000_000.0)

    async def body(store) -> None:
        rs = ResponseStore(store, interval=0.01, retention_days=30, clock=clock, purge_every_s=3600)
        rs.record(owner, response("resp_old", clock.now - 10 * DAY), [])
        rs.record(owner, response("resp_new", clock.now), [])
        await rs.start()
        try:
            await eventually_async(lambda: stored_ids(store) == {"resp_old", "resp_new"})
            clock.now += 25 * DAY  # resp_old is 35 days old, resp_new 25: only resp_old goes
            await eventually_async(lambda: stored_ids(store) == {"resp_new"})
            with pytest.raises(NotFound) as exc:
                await rs.get(owner, "resp_old")
            assert exc.value.status == 404 and "resp_old" in exc.value.detail
            assert (await rs.get(owner, "resp_new"))["id"] == "resp_new"

            clock.now += 6 * DAY  # resp_new is now 31 days old: it reads as 404 even before the next purge
            with pytest.raises(NotFound):
                await rs.get(owner, "resp_new")
            clock.now += 3600  # the next purge is due on the store's clock
            await eventually_async(lambda: stored_ids(store) == set())
        finally:
            await rs.stop()

    run(db_url, body)


def test_retention_zero_keeps_responses_forever(db_url):
    from keel.gateway.ingress.response_store import ResponseStore
    from keel.identity.principal import Principal

    owner = Principal(key_id="k1", role="member", team_id="t1")
    clock = Clock(1_700_000_000.0)

    async def body(store) -> None:
        rs = ResponseStore(store, interval=0.01, retention_days=0, clock=clock, purge_every_s=3600)
        rs.record(owner, response("resp_kept", clock.now - 400 * DAY), [])
        await rs.start()
        try:
            await eventually_async(lambda: stored_ids(store) == {"resp_kept"})
            clock.now += 10 * 365 * DAY
            assert await rs.purge() == 0
            assert stored_ids(store) == {"resp_kept"}
            assert (await rs.get(owner, "resp_kept"))["id"] == "resp_kept"
        finally:
            await rs.stop()

    run(db_url, body)


def test_the_setting_defaults_to_30_days_and_refuses_negatives(tmp_path):
    from pydantic import ValidationError

    from keel.core.settings import Settings

    assert Settings(data_dir=tmp_path).responses_retention_days == 30
    assert Settings(data_dir=tmp_path, responses_retention_days=0).responses_retention_days == 0
    with pytest.raises(ValidationError):
        Settings(data_dir=tmp_path, responses_retention_days=-1)
