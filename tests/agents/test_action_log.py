"""The action log's write path: each action row and its audit event are written in one transaction, a replayed
step's twin writes neither, and an audit write that fails never costs the action row."""

from __future__ import annotations

import json
from typing import Any

import pytest
import sqlalchemy as sa

from keel.agents.store import AgentStore
from keel.core.db import Store
from keel.governance.audit import AuditLog

pytestmark = pytest.mark.store


@pytest.fixture
def stores(db_url: str) -> Any:
    store = Store.open(db_url)
    store.upgrade()
    audit = AuditLog(store)
    yield AgentStore(store, audit=audit), audit, store
    store.dispose()


def action(seq: int, decision: str = "allowed") -> dict[str, Any]:
    return {"run_id": "arun_1", "seq": seq, "agent": "clerk", "version": 3, "principal": "key_1", "team_id": "team_a",
            "kind": "tool", "tool": "record", "arguments": {"table": "t", "data": {"n": seq}}, "decision": decision,
            "rule": None, "detail": "", "result": "{}", "tokens": 0, "cost": 0.0}


def event(seq: int, decision: str = "allowed") -> tuple[str, str, str | None, dict[str, Any]]:
    return (f"agent.action.{decision}", "key_1", "team_a",
            {"run_id": "arun_1", "agent": "clerk", "version": 3, "seq": seq, "kind": "tool", "tool": "record",
             "rule": None, "tokens": 0, "cost": 0.0})


def test_row_and_event_written_once(stores: Any) -> None:
    """Regression guard for folding the audit event into the action's transaction: one event per action, with the
    details (and team) the separate write recorded, a twin writing neither, and the chain still verifying."""
    agents, audit, _ = stores
    assert agents.log_action(action(1), event(1)) is True
    assert agents.log_action(action(2, "refused"), event(2, "refused")) is True
    assert agents.log_action(action(1), event(1)) is False  # a replayed step's twin
    assert [a["seq"] for a in agents.actions("arun_1")] == [1, 2]
    events = audit.events(action="agent.action.*")
    assert [e["action"] for e in reversed(events)] == ["agent.action.allowed", "agent.action.refused"]
    assert json.loads(events[-1]["details"]) == {**event(1)[3], "team_id": "team_a"}
    assert events[-1]["team_id"] == "team_a"
    assert audit.verify().ok


def test_failed_audit_write_keeps_the_action(stores: Any, db_url: str) -> None:
    """An audit write the store refuses (a trigger here) must not lose the action row: the row is written on its
    own and the event is reported as not written, as before they shared a transaction."""
    agents, audit, store = stores
    with store.engine.begin() as conn:
        if store.dialect == "postgresql":
            conn.execute(sa.text("CREATE FUNCTION keel_test_refuse() RETURNS trigger AS $$ BEGIN "
                                 "RAISE EXCEPTION 'audit refused'; END $$ LANGUAGE plpgsql"))
            conn.execute(sa.text("CREATE TRIGGER refuse_audit BEFORE INSERT ON audit_events "
                                 "FOR EACH ROW EXECUTE FUNCTION keel_test_refuse()"))
        else:
            conn.execute(sa.text("CREATE TRIGGER refuse_audit BEFORE INSERT ON audit_events "
                                 "BEGIN SELECT RAISE(ABORT, 'audit refused'); END"))
    assert agents.log_action(action(1), event(1)) is True
    assert [a["seq"] for a in agents.actions("arun_1")] == [1]
    assert audit.events(action="agent.action.*") == []
    assert agents.log_action(action(1), event(1)) is False
