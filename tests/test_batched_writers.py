"""The batched writers (usage ledger, guard events) promise read-your-writes after `flush()`: a flush
that starts while the background flush is still writing must not return before those rows are in."""

from __future__ import annotations

import asyncio
import threading
import time

from conftest import eventually_async
from keel.core.db import Store
from keel.governance.events import GuardEventLog
from keel.observe.ledger import Ledger


class SlowWrites:
    """Makes `_write` take a while, and records when each write started and finished."""

    def __init__(self, writer, delay: float) -> None:  # noqa: ANN001
        self.started = threading.Event()
        self.done: list[float] = []
        inner = writer._write

        def slow(rows):  # noqa: ANN001, ANN202
            self.started.set()
            time.sleep(delay)  # the subject: a write that is still going when the second flush comes
            inner(rows)
            self.done.append(time.monotonic())

        writer._write = slow


def _store(tmp_path) -> Store:  # noqa: ANN001
    store = Store.open(f"sqlite:///{tmp_path / 'keel.db'}")
    store.upgrade()
    return store


def flush_while_flushing(writer, slow: SlowWrites, record) -> None:  # noqa: ANN001
    """Record, start a background flush, flush again while it writes: the second flush returns only
    once the background write has finished."""

    async def go() -> float:
        record()
        background = asyncio.create_task(writer.flush())
        await eventually_async(slow.started.is_set)  # the background flush has taken the rows and is writing them
        await writer.flush()
        returned = time.monotonic()
        await background
        return returned

    returned = asyncio.run(go())
    assert slow.done and returned >= slow.done[0]


def test_ledger_flush_waits_for_a_flush_in_progress(tmp_path):
    """Regression: a second flush saw an empty queue while the first was still writing, and returned early."""
    from conftest import ledger_rows

    ledger = Ledger(_store(tmp_path))
    slow = SlowWrites(ledger, 0.3)
    row = {"request_id": "req_1", "ts": __import__("datetime").datetime.now(), "key_id": None, "team_id": None,
           "user_id": None, "kind": "chat", "alias": "a", "deployment": None, "provider": None, "tokens_in": 1,
           "tokens_out": 1, "cost": 0.0, "latency_ms": 1.0, "ttft_ms": None, "status": "ok", "http_status": 200,
           "error_code": None, "stream": False, "cache_hit": False, "saved_cost": 0.0, "use_case": None,
           "task_id": None, "meta": None}

    flush_while_flushing(ledger, slow, lambda: ledger.record(row))
    assert len(ledger_rows(f"sqlite:///{tmp_path / 'keel.db'}")) == 1


def test_guard_event_flush_waits_for_a_flush_in_progress(tmp_path):
    """Regression: /v1/guard-events flushed, found nothing pending, and read before the rows landed."""
    log = GuardEventLog(_store(tmp_path))
    slow = SlowWrites(log, 0.3)

    flush_while_flushing(log, slow, lambda: log.record("req_1", None, None, 1, [
        {"side": "input", "guard": "pii", "type": "email", "action": "redact", "location": "messages[0]",
         "start": 0, "end": 5}]))
    assert len(log.query(request_id="req_1")) == 1
