"""The kill switch's reads: each replica trusts a read that found the agent running for `SWITCH_TTL_S` (stamped
before the read began) — never one that found it paused, so a resume takes effect at once — and a pause is
acknowledged only after that long, so once `set_paused` has returned every replica's next check shows the pause,
whatever it had read before."""

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


def test_a_running_read_is_trusted_for_the_ttl_then_read_again(store: Store) -> None:
    clock = Clock()
    a, b = AgentStore(store), AgentStore(store, clock=clock)  # two replicas on one store
    assert b.paused("clerk") is False
    a.set_paused("clerk", True, "key_admin", None)
    clock.now += SWITCH_TTL_S / 2
    assert b.trusts_running("clerk") and b.paused("clerk") is False  # the earlier read, still trusted
    clock.now += SWITCH_TTL_S / 2
    assert not b.trusts_running("clerk")
    assert b.paused("clerk") is True


def test_a_paused_read_is_never_trusted_so_a_resume_counts_at_once(store: Store) -> None:
    a, b = AgentStore(store), AgentStore(store, clock=Clock())  # B's clock never moves
    a.set_paused("clerk", True, "key_admin", None)
    assert b.paused("clerk") is True and not b.trusts_running("clerk")
    a.set_paused("clerk", False, "key_admin", None)
    assert b.paused("clerk") is False


def test_a_replicas_own_write_leaves_it_nothing_to_trust(store: Store) -> None:
    """A resume's commit says nothing of a pause another replica commits right after it (before the resuming replica
    could stamp it): the resuming replica reads again instead of trusting its own write."""
    a, b = AgentStore(store, clock=Clock()), AgentStore(store)
    assert a.paused("clerk") is False and a.trusts_running("clerk")
    a.set_paused("clerk", False, "key_admin", None)
    assert not a.trusts_running("clerk")
    b.set_paused("clerk", True, "key_admin", None)
    assert a.paused("clerk") is True
    a.set_paused("clerk", True, "key_admin", None)
    assert a.paused("clerk") is True


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
    waits: list[float] = []
    a = AgentStore(store, audit=AuditLog(store))
    agents = Agents(a, durable=None, vault=None, sleep=waits.append)  # type: ignore[arg-type]
    agents.define(MANDATE, ADMIN)
    agents.set_paused("clerk", ADMIN, True)
    assert len(waits) == 1 and 0 < waits[0] <= SWITCH_TTL_S
    agents.set_paused("clerk", ADMIN, False)
    assert len(waits) == 1
    assert a.paused("clerk") is False


def test_a_tool_whose_check_can_take_long_is_never_checked_on_the_event_loop() -> None:
    """`uniqueItems` makes a schema check quadratic in a list the model writes: such a tool's calls are checked in a
    worker thread, whatever their length."""
    from keel.agents.mandate import parse_mandate

    m = parse_mandate(MANDATE.replace("record: {tables: [t]}", "record: {tables: [t]}\n  tag:\n    description: Tag.\n"
                                      "    endpoint: https://tags.example/tag\n"
                                      "    parameters: {type: object, properties: {tags: {type: array, uniqueItems: true}}}"))
    assert m.tools["record"].quick_to_check
    assert not m.tools["tag"].quick_to_check
