"""The kill switch's reads: each replica trusts a read of the switch for `SWITCH_TTL_S` (stamped before the read
began), and a pause is acknowledged only after that long, so once `set_paused` has returned every replica's next
read shows the pause — whatever it had read before."""

from __future__ import annotations

import time
from typing import Any

import pytest
from conftest import Clock

from keel.agents.manager import Agents
from keel.agents.store import SWITCH_TTL_S, AgentStore
from keel.core.db import Store
from keel.governance.audit import AuditLog
from keel.identity.principal import Principal

pytestmark = pytest.mark.store
MANDATE = "name: clerk\nmodel: m\ngoal: Record things.\ntools:\n  record: {tables: [t]}\n"
ADMIN = Principal(key_id="key_admin", role="admin")


@pytest.fixture
def store(db_url: str) -> Any:
    s = Store.open(db_url)
    s.upgrade()
    yield s
    s.dispose()


def test_a_read_is_trusted_for_the_ttl_then_read_again(store: Store) -> None:
    clock = Clock()
    a, b = AgentStore(store), AgentStore(store, clock=clock)  # two replicas on one store
    assert b.paused("clerk") is False
    a.set_paused("clerk", True, "key_admin", None)
    clock.now += SWITCH_TTL_S / 2
    assert b.paused_cached("clerk") is False and b.paused("clerk") is False  # the earlier read, still trusted
    clock.now += SWITCH_TTL_S / 2
    assert b.paused_cached("clerk") is None
    assert b.paused("clerk") is True


def test_the_pausing_replica_sees_its_own_pause_at_once(store: Store) -> None:
    a = AgentStore(store, clock=Clock())
    assert a.paused("clerk") is False
    a.set_paused("clerk", True, "key_admin", None)
    assert a.paused_cached("clerk") is True


def test_a_pause_is_acknowledged_only_once_no_replica_trusts_an_older_read(store: Store) -> None:
    """Without the wait, B's read from just before the pause would still be trusted after the acknowledgement."""
    a = AgentStore(store, audit=AuditLog(store))
    b = AgentStore(store)
    agents = Agents(a, durable=None, vault=None)  # type: ignore[arg-type]
    agents.define(MANDATE, ADMIN)
    assert b.paused("clerk") is False
    t0 = time.monotonic()
    assert agents.set_paused("clerk", ADMIN, True)["paused"] is True
    assert time.monotonic() - t0 >= SWITCH_TTL_S
    assert b.paused("clerk") is True


def test_a_resume_is_not_held_back(store: Store) -> None:
    a = AgentStore(store, audit=AuditLog(store))
    agents = Agents(a, durable=None, vault=None)  # type: ignore[arg-type]
    agents.define(MANDATE, ADMIN)
    agents.set_paused("clerk", ADMIN, True)
    t0 = time.monotonic()
    agents.set_paused("clerk", ADMIN, False)
    assert time.monotonic() - t0 < SWITCH_TTL_S
    assert a.paused("clerk") is False
