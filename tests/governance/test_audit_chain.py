"""The audit chain: append-only (the database refuses edits), concurrent appends stay one chain, and any
change, deletion, insertion or reordering of stored events is detected at its first broken link —
in the store, in a backup copy read offline, and in an export."""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings, strategies as st
from typer.testing import CliRunner

from keel.core.db import Store
from keel.governance.audit import AuditLog, event_hash, export_lines, verify_export

N_EVENTS = 12


@pytest.fixture
def log(db_url):
    store = Store.open(db_url)
    store.upgrade()
    yield AuditLog(store)
    store.dispose()


def _fill(log: AuditLog, n: int = N_EVENTS) -> None:
    for i in range(n):
        log.record("key.create" if i % 2 else "policy.deny", f"key_{i}", "team_a" if i % 3 else None,
                   n=i, note="é✓")


@pytest.mark.store
def test_appends_verify_and_edits_are_refused_by_the_database(log):
    _fill(log)
    verdict = log.verify()
    assert verdict.ok and verdict.count == N_EVENTS and verdict.head_seq == N_EVENTS
    with pytest.raises(sa.exc.DBAPIError):
        with log.store.engine.begin() as conn:
            conn.execute(sa.text("UPDATE audit_events SET actor = 'mallory' WHERE seq = 3"))
    with pytest.raises(sa.exc.DBAPIError):
        with log.store.engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM audit_events WHERE seq = 3"))
    assert log.verify().ok


@pytest.mark.store
def test_concurrent_writers_make_one_unbroken_chain(log):
    """Regression guard: two writers must never both chain onto the same previous event."""
    threads = [threading.Thread(target=lambda t=t: [log.record("x", f"t{t}", i=i) for i in range(15)])
               for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    verdict = log.verify()
    assert verdict.ok and verdict.count == 60


@pytest.mark.store
def test_export_verifies_offline_and_a_changed_line_is_found(log):
    _fill(log)
    lines = list(export_lines(log))
    assert verify_export(lines).ok
    row = json.loads(lines[4])
    row["details"] = row["details"].replace('"n":4', '"n":40')
    tampered = lines[:4] + [json.dumps(row) + "\n"] + lines[5:]
    verdict = verify_export(tampered)
    assert not verdict.ok and verdict.broken_seq == 5
    swapped = lines[:2] + [lines[3], lines[2]] + lines[4:]
    assert verify_export(swapped).broken_seq == 3


@pytest.mark.store
def test_anchor_catches_a_rewritten_chain(log):
    _fill(log, 5)
    head = log.verify()
    assert log.verify((head.head_seq, head.head_hash)).ok
    assert not log.verify((head.head_seq, "0" * 64)).ok
    assert log.verify((9, "0" * 64)).broken_seq == 6


# -- random tampering of the stored chain (SQLite file copies, raw SQL as an attacker would) ---------

@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("audit") / "template.db"
    store = Store.open(f"sqlite:///{path}")
    store.upgrade()
    _fill(AuditLog(store))
    store.dispose()
    return path


COLUMNS = ["id", "ts", "actor", "action", "team_id", "details", "prev_hash", "hash"]


def _forge_row(con: sqlite3.Connection, seq: int, prev: str) -> tuple:
    row = {"seq": seq, "id": f"evt_forged{seq}", "ts": "2020-01-01T00:00:00.000000+00:00", "actor": "mallory",
           "action": "key.create", "team_id": None, "details": "{}"}
    return (seq, row["id"], row["ts"], row["actor"], row["action"], None, row["details"], prev,
            event_hash(prev, row))


def tamper(con: sqlite3.Connection, op: str, k: int, col: int) -> int:
    """Apply one tampering; return the seq where verification must report the first broken link."""
    con.execute("DROP TRIGGER audit_events_no_update")
    con.execute("DROP TRIGGER audit_events_no_delete")
    n = con.execute("SELECT max(seq) FROM audit_events").fetchone()[0]
    k = 1 + k % n
    if op == "change":
        column = COLUMNS[col % len(COLUMNS)]
        old = con.execute(f"SELECT {column} FROM audit_events WHERE seq = ?", (k,)).fetchone()[0]
        con.execute(f"UPDATE audit_events SET {column} = ? WHERE seq = ?", ((old or "") + "x", k))
        return k
    if op == "delete":
        con.execute("DELETE FROM audit_events WHERE seq = ?", (k,))
        return k
    if op == "reorder":
        j = k + 1 if k < n else k - 1
        a, b = sorted((k, j))
        con.execute("UPDATE audit_events SET seq = -1 WHERE seq = ?", (a,))
        con.execute("UPDATE audit_events SET seq = ? WHERE seq = ?", (a, b))
        con.execute("UPDATE audit_events SET seq = ? WHERE seq = -1", (b,))
        return a
    if op == "insert_end":  # a well-formed event appended behind Keel's back
        prev = con.execute("SELECT hash FROM audit_events WHERE seq = ?", (n,)).fetchone()[0]
        con.execute("INSERT INTO audit_events (seq, id, ts, actor, action, team_id, details, prev_hash, hash) "
                    "VALUES (?,?,?,?,?,?,?,?,?)", _forge_row(con, n + 1, prev))
        return n + 1
    if op == "insert_middle":  # shift the tail up and slip a forged, correctly hashed event in at k
        for s in range(n, k - 1, -1):
            con.execute("UPDATE audit_events SET seq = ? WHERE seq = ?", (s + 1, s))
        prev = con.execute("SELECT hash FROM audit_events WHERE seq = ?", (k - 1,)).fetchone()
        con.execute("INSERT INTO audit_events (seq, id, ts, actor, action, team_id, details, prev_hash, hash) "
                    "VALUES (?,?,?,?,?,?,?,?,?)", _forge_row(con, k, prev[0] if prev else "0" * 64))
        return k + 1
    if op == "head":
        con.execute("UPDATE audit_head SET seq = seq - 1")
        return n
    raise AssertionError(op)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(op=st.sampled_from(["change", "delete", "reorder", "insert_end", "insert_middle", "head"]),
       k=st.integers(min_value=0, max_value=10_000), col=st.integers(min_value=0, max_value=100))
def test_random_tampering_is_always_detected_at_the_first_broken_link(template, tmp_path_factory, op, k, col):
    copy = tmp_path_factory.mktemp("t") / "copy.db"
    shutil.copy(template, copy)
    con = sqlite3.connect(copy, isolation_level=None)
    expected = tamper(con, op, k, col)
    con.close()
    store = Store.open(f"sqlite:///{copy}")
    try:
        verdict = AuditLog(store).verify()
    finally:
        store.dispose()
    assert not verdict.ok, (op, k, col)
    assert verdict.broken_seq == expected, (op, verdict)


def test_cli_verifies_a_backup_offline_and_names_the_broken_event(template, tmp_path):
    from keel.governance.commands import audit_app

    backup = tmp_path / "backup.db"
    shutil.copy(template, backup)
    runner = CliRunner()
    ok = runner.invoke(audit_app, ["verify", "--database-url", f"sqlite:///{backup}"])
    assert ok.exit_code == 0 and f"{N_EVENTS} events" in ok.output
    con = sqlite3.connect(backup, isolation_level=None)
    tamper(con, "change", 6, 2)  # event 7's actor
    con.close()
    bad = runner.invoke(audit_app, ["verify", "--database-url", f"sqlite:///{backup}"])
    assert bad.exit_code == 1 and "BROKEN at event 7" in bad.output
