"""The ledger's own row conversion writes exactly what SQLAlchemy's `insert` does for the same rows: every column
type (time, booleans, JSON `meta` given, null and left out), a row with only its required fields (the rest NULL,
`meta` JSON null). Guards the flushing thread's shortcut (keel/observe/ledger.py `_insert`). Real store: SQLite,
or PostgreSQL with KEEL_TEST_DATABASE=postgres."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from conftest import lower_sqlite_variable_bound
from keel.core.db import Store
from keel.observe.ledger import Ledger
from keel.observe.tables import usage_ledger

pytestmark = pytest.mark.store

TS = datetime(2026, 12, 6, 14, 30, 0, 123456, tzinfo=UTC)


def rows(prefix: str) -> list[dict[str, Any]]:
    full = {"ts": TS, "key_id": "key_a", "team_id": "team_a", "user_id": "user_1", "kind": "chat", "alias": "m1",
            "deployment": "m1/openai_compatible/x", "provider": "openai_compatible", "tokens_in": 12, "tokens_out": 9,
            "cost": 1.25e-05, "latency_ms": 21.375, "ttft_ms": 3.5, "status": "ok", "http_status": 200,
            "error_code": None, "stream": True, "cache_hit": False, "saved_cost": 0.0, "use_case": "u",
            "task_id": "t", "meta": {"use_case": "u", "n": [1, 2.5, None, "é"]}, "client_request_id": "c-1",
            "prompt_version": "p@3"}
    return [
        {"request_id": f"{prefix}full", **full},
        {"request_id": f"{prefix}nulls", **{k: None for k in full},
         "ts": TS + timedelta(seconds=1), "kind": "embedding", "status": "error", "tokens_in": 0, "tokens_out": 0,
         "cost": 0.0, "latency_ms": 0.0, "http_status": 502, "stream": False, "cache_hit": True, "saved_cost": 0.5},
        {"request_id": f"{prefix}bare", "ts": TS, "kind": "chat", "status": "ok", "tokens_in": 1, "tokens_out": 2,
         "cost": 0.0, "latency_ms": 1.0, "http_status": 200, "stream": False, "cache_hit": False, "saved_cost": 0.0},
    ]


def stored(store: Store, prefix: str) -> list[tuple[Any, ...]]:
    """The rows as the database holds them (`meta` as its stored text: JSON null and SQL NULL differ)."""
    cols = [sa.cast(c, sa.Text) if c.name == "meta" else c for c in usage_ledger.c if c.name != "request_id"]
    with store.engine.connect() as conn:
        found = conn.execute(sa.select(usage_ledger.c.request_id, *cols)
                             .where(usage_ledger.c.request_id.like(prefix + "%"))
                             .order_by(usage_ledger.c.request_id)).all()
    return [tuple(r)[1:] for r in found]


def test_ledger_writes_what_sqlalchemy_writes(db_url: str) -> None:
    store = Store.open(db_url)
    store.upgrade()
    try:
        ledger = Ledger(store)
        ledger._write_safely(rows("ours-"))
        with store.engine.begin() as conn:
            # a column the row leaves out given as None: NULL, and the JSON column's `null` for `meta`
            conn.execute(usage_ledger.insert(), [{c.name: None for c in usage_ledger.c} | r for r in rows("sqla-")])
        ours, theirs = stored(store, "ours-"), stored(store, "sqla-")
        assert len(ours) == 3
        assert ours == theirs
    finally:
        store.engine.dispose()


def test_a_large_batch_is_written_whole_and_a_repeat_once(db_url: str) -> None:
    """A flush of more rows than one statement holds (SQLite: multi-row INSERTs of a power of two rows each) writes
    every row; a batch holding an id already written falls back to row by row and skips only the repeat. On SQLite
    the build's bound on a statement's variables is lowered to the old default (999): 32 rows a statement."""
    store = Store.open(db_url)
    lower_sqlite_variable_bound(store)
    store.upgrade()
    try:
        ledger = Ledger(store)
        base = rows("big-")[0]
        batch = [{**base, "request_id": f"big-{i:05d}", "tokens_in": i} for i in range(1500 + 37)]
        ledger._write_safely(batch)
        ledger._write_safely([{**base, "request_id": "big-00007", "tokens_in": -1},
                              {**base, "request_id": "big-new", "tokens_in": 5}])
        with store.engine.connect() as conn:
            found = dict(conn.execute(sa.select(usage_ledger.c.request_id, usage_ledger.c.tokens_in)
                                      .where(usage_ledger.c.request_id.like("big-%"))).all())
        assert found == {**{r["request_id"]: r["tokens_in"] for r in batch}, "big-new": 5}
        assert ledger.written == 1500 + 37 + 1
        if store.dialect == "sqlite":
            assert ledger._batch._per == 32
    finally:
        store.engine.dispose()
