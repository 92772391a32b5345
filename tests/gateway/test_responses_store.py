"""The stored responses' batched writer on a real store (SQLite, and PostgreSQL in the `store` run): what the
caller was answered is readable at once by `GET` and `previous_response_id` while its batch is still pending,
a pending one can be deleted (its queued write never brings it back), another team never sees it pending or
written, and the durability rule of docs/gateway.md holds: a graceful stop writes every pending response, and
a written one survives the replica that wrote it (a new store over the same database reads it)."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
import sqlalchemy as sa

from conftest import eventually_async

pytestmark = pytest.mark.store

NOW = 1_700_000_000.0


def response(rid: str, text: str, previous: str | None = None) -> dict[str, Any]:
    return {"id": rid, "object": "response", "model": "m", "created_at": int(NOW), "previous_response_id": previous,
            "output": [{"type": "message", "id": "msg_" + rid, "role": "assistant", "status": "completed",
                        "content": [{"type": "output_text", "text": text, "annotations": []}]}],
            "usage": {"input_tokens": 3, "output_tokens": 2}, "metadata": {"ünïcode": "✓"}}


def user(text: str) -> list[dict[str, Any]]:
    return [{"type": "message", "role": "user", "content": text}]


def stored_ids(store) -> set[str]:
    from keel.gateway.ingress.response_tables import responses

    with store.read() as conn:
        return {r[0] for r in conn.execute(sa.select(responses.c.id))}


def with_store(db_url: str, body) -> None:
    from keel.core.db import Store

    store = Store.open(db_url)
    store.upgrade()
    try:
        asyncio.run(body(store))
    finally:
        store.dispose()


def principals():
    from keel.identity.principal import Principal

    return (Principal(key_id="k1", role="member", team_id="red"),
            Principal(key_id="k2", role="builder", team_id="red"),
            [Principal(key_id="k3", role="member", team_id="blue"), Principal(key_id="k4", role="builder", team_id="blue"),
             Principal(key_id="k5", role="member")])


def test_pending_responses_read_delete_and_scope_like_written_ones(db_url):
    from keel.core.errors import Forbidden, NotFound
    from keel.gateway.ingress.response_store import ResponseStore

    owner, teammate, strangers = principals()
    one, two = response("resp_1", "Hello Ada."), response("resp_2", "You are Ada.", previous="resp_1")

    async def body(store) -> None:
        rs = ResponseStore(store, interval=0.01, clock=lambda: NOW)  # not started: no batch is written unless asked
        rs.record(owner, one, user("My name is Ada."), orjson.dumps(one))
        rs.record(owner, two, user("Who am I?"))
        assert stored_ids(store) == set(), "still pending"
        for who in (owner, teammate):  # read your writes at once: the object answered, exactly
            assert (await rs.get(who, "resp_1"))["response"] == one
        assert await rs.conversation(owner, "resp_2") == [*user("My name is Ada."), *one["output"],
                                                            *user("Who am I?"), *two["output"]]
        for who in strangers:
            for action in (rs.get(who, "resp_1"), rs.conversation(who, "resp_2"), rs.delete(who, "resp_1")):
                with pytest.raises(NotFound):
                    await action
        with pytest.raises(Forbidden):
            await rs.delete(teammate, "resp_1")
        await rs.delete(owner, "resp_2")  # deleted while pending
        await rs.flush()
        assert stored_ids(store) == {"resp_1"}, "the pending write of a deleted response never lands"
        with pytest.raises(NotFound):
            await rs.get(owner, "resp_2")
        written = await rs.get(teammate, "resp_1")  # now from the store: the same object
        assert written["response"] == one and written["input"] == user("My name is Ada.")
        for who in strangers:
            with pytest.raises(NotFound):
                await rs.get(who, "resp_1")

    with_store(db_url, body)


def test_a_graceful_stop_writes_what_is_pending_and_written_responses_outlive_the_replica(db_url):
    from keel.core.db import Store
    from keel.gateway.ingress.response_store import ResponseStore

    owner, _, _ = principals()

    async def body(store) -> None:
        rs = ResponseStore(store, interval=0.01, clock=lambda: NOW)
        await rs.start()
        rs.record(owner, response("resp_a", "a"), user("a"))
        await eventually_async(lambda: stored_ids(store) == {"resp_a"})  # the writer's next batch, on its own
        rs.record(owner, response("resp_b", "b"), user("b"))
        await rs.stop()  # SIGTERM's path: pending rows are written before the replica ends
        assert stored_ids(store) == {"resp_a", "resp_b"}
        again = Store.open(db_url)  # another replica (or this one restarted) over the same database
        try:
            fresh = ResponseStore(again, interval=0.01, clock=lambda: NOW)
            for rid, text in (("resp_a", "a"), ("resp_b", "b")):
                row = await fresh.get(owner, rid)
                assert row["response"] == response(rid, text) and row["input"] == user(text)
        finally:
            again.dispose()

    with_store(db_url, body)


def test_a_batch_of_any_size_is_stored_row_for_row(db_url):
    """The writer's batch (on SQLite: multi-row INSERTs of a power of two rows each) stores every row, column
    for column, as recorded — for batch sizes around the powers of two."""
    from keel.gateway.ingress.response_store import ResponseStore
    from keel.gateway.ingress.response_tables import responses

    owner, other, others = principals()
    who = [owner, other, *others]

    async def body(store) -> None:
        rs = ResponseStore(store, interval=60, clock=lambda: NOW)
        expected = {}
        for n in (1, 2, 3, 7, 8, 13, 64, 65):
            for i in range(n):
                p, rid = who[i % len(who)], f"resp_{n}_{i}"
                previous = f"resp_{n}_{i - 1}" if i else None
                rs.record(p, response(rid, f"ünï {n} {i}", previous), user(rid))
                expected[rid] = {"id": rid, "key_id": p.key_id, "user_id": p.user_id, "team_id": p.team_id,
                                 "model": "m", "previous_response_id": previous, "input": user(rid),
                                 "response": response(rid, f"ünï {n} {i}", previous), "created_at": NOW}
            await rs.flush()
        with store.read() as conn:
            written = {r.id: dict(r._mapping) for r in conn.execute(sa.select(responses))}
        assert written == expected

    with_store(db_url, body)
