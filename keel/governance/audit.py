"""The audit trail: append-only events, each hash covering the previous hash and its canonical content.

`verify_rows` walks a chain (from the store, a backup, or an export) and names the first broken
link: a changed, deleted, inserted or reordered event. The `audit_head` row anchors the end of the
chain, so a deleted or appended last event is caught too.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from keel.core.clock import utcnow
from keel.core.db import Store
from keel.core.ids import new_id
from keel.governance.tables import audit_events, audit_head

log = logging.getLogger("keel.audit")

GENESIS = "0" * 64
_LOCK_KEY = 0x6B65656C  # pg advisory lock id serialising appends across replicas
COLUMNS = ("seq", "id", "ts", "actor", "action", "team_id", "details", "prev_hash", "hash")
_PG_LOCK = sa.text("SELECT pg_advisory_xact_lock(:k)")
_HEAD = sa.select(audit_head.c.seq, audit_head.c.hash).where(audit_head.c.id == 1)
_INSERT = audit_events.insert()
_MOVE_HEAD = audit_head.update().where(audit_head.c.id == 1).values(seq=sa.bindparam("new_seq"),
                                                                    hash=sa.bindparam("new_hash"))


def canonical(obj: Any) -> str:
    """The one JSON form that is hashed: sorted keys, no spaces, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def event_hash(prev_hash: str, row: dict[str, Any]) -> str:
    """sha256(prev_hash ‖ canonical(seq, id, ts, actor, action, team_id, details))."""
    body = canonical({k: row[k] for k in ("seq", "id", "ts", "actor", "action", "team_id", "details")})
    return hashlib.sha256((prev_hash + "\n" + body).encode()).hexdigest()


@dataclass
class Verdict:
    """The result of walking a chain; `broken_seq` is the first link that does not hold."""

    ok: bool
    count: int
    head_seq: int
    head_hash: str
    broken_seq: int | None = None
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ok": self.ok, "events": self.count,
                               "head": {"seq": self.head_seq, "hash": self.head_hash}}
        if not self.ok:
            out["first_broken"] = {"seq": self.broken_seq, "reason": self.reason}
        return out


def verify_rows(rows: Iterable[dict[str, Any]], head: dict[str, Any] | None,
                anchor: tuple[int, str] | None = None) -> Verdict:
    """Check a chain given in `seq` order against its head (and optionally a known `(seq, hash)`)."""
    prev, expected, count = GENESIS, 1, 0

    def broken(seq: int, reason: str) -> Verdict:
        return Verdict(False, count, expected - 1, prev, seq, reason)

    for row in rows:
        seq = int(row["seq"])
        if seq != expected:
            return broken(expected, f"event {expected} is missing (next stored event is {seq}): deleted or reordered")
        if row["prev_hash"] != prev:
            return broken(seq, f"event {seq} does not link to event {seq - 1}: inserted, deleted or reordered")
        if event_hash(prev, row) != row["hash"]:
            return broken(seq, f"event {seq} content does not match its hash: changed")
        if anchor is not None and anchor[0] == seq and anchor[1] != row["hash"]:
            return broken(seq, f"event {seq} differs from the anchor hash you recorded: the chain was rewritten")
        prev, expected, count = row["hash"], expected + 1, count + 1
    last = expected - 1
    if head is None:
        if count:
            return broken(last, "the chain head record is missing: deleted outside Keel")
    elif int(head["seq"]) != last or head["hash"] != prev:
        seq = min(int(head["seq"]), last) + 1 if int(head["seq"]) != last else last
        return broken(seq, f"the chain ends at event {last} but its head records event {head['seq']}: "
                           "events deleted from or appended to the end outside Keel")
    if anchor is not None and anchor[0] > last:
        return broken(last + 1, f"the anchor names event {anchor[0]} but the chain ends at {last}: events deleted")
    return Verdict(True, count, last, prev)


def _row_dict(r: Any) -> dict[str, Any]:
    return {k: getattr(r, k) for k in COLUMNS}


def public_event(row: dict[str, Any]) -> dict[str, Any]:
    """An event as the API shows it: details parsed, hashes kept for the auditor."""
    out = dict(row)
    out["details"] = json.loads(row["details"])
    return out


class AuditLog:
    """Appends to and reads the chain. Calling the instance records an event (the `app.state.audit` hook)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def __call__(self, *, action: str, actor: str, **details: Any) -> dict[str, Any]:
        return self.record(action, actor, details.get("team_id"), **details)

    def record(self, action: str, actor: str, team_id: str | None = None, /, **details: Any) -> dict[str, Any]:
        """Append one event (scoped to `team_id` for team-bound auditors) atomically; concurrent
        writers (threads, replicas) are serialised."""
        with self.store.engine.begin() as conn:
            return self.append(conn, action, actor, team_id, **details)

    def append(self, conn: sa.Connection, action: str, actor: str, team_id: str | None = None, /,
               **details: Any) -> dict[str, Any]:
        """`record` inside the caller's write transaction `conn`, so the event commits (or not) with the caller's
        own rows; the chain stays serialised until that transaction ends."""
        if self.store.dialect == "postgresql":
            conn.execute(_PG_LOCK, {"k": _LOCK_KEY})
        head = conn.execute(_HEAD).first()
        if head is None:
            head = conn.execute(sa.select(audit_events.c.seq, audit_events.c.hash)
                                .order_by(audit_events.c.seq.desc()).limit(1)).first()
        seq, prev = (int(head.seq) + 1, head.hash) if head else (1, GENESIS)
        row = {"seq": seq, "id": new_id("evt"), "ts": utcnow().isoformat(timespec="microseconds"),
               "actor": str(actor)[:100], "action": action[:100], "team_id": team_id, "details": canonical(details),
               "prev_hash": prev}
        row["hash"] = event_hash(prev, row)
        conn.execute(_INSERT, row)  # constant statements with parameters: compiled once, not per event
        if not conn.execute(_MOVE_HEAD, {"new_seq": seq, "new_hash": row["hash"]}).rowcount:
            conn.execute(audit_head.insert(), {"id": 1, "seq": seq, "hash": row["hash"]})
        return row

    def events(self, *, team_id: str | None = None, action: str | None = None, actor: str | None = None,
             before: int | None = None, after: int | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Newest first (or oldest first after `after`); `team_id` narrows to one team's events."""
        q = sa.select(audit_events)
        if team_id is not None:
            q = q.where(audit_events.c.team_id == team_id)
        if action:
            q = q.where(audit_events.c.action.like(action.replace("*", "%")))
        if actor:
            q = q.where(audit_events.c.actor == actor)
        if before is not None:
            q = q.where(audit_events.c.seq < before)
        if after is not None:
            q = q.where(audit_events.c.seq > after).order_by(audit_events.c.seq)
        else:
            q = q.order_by(audit_events.c.seq.desc())
        with self.store.engine.connect() as conn:
            return [_row_dict(r) for r in conn.execute(q.limit(max(1, min(limit, 1000))))]

    def iter_chain(self, batch: int = 2000) -> Iterator[dict[str, Any]]:
        """Every event in `seq` order, read in batches so a large chain never sits in memory."""
        last = 0
        while True:
            with self.store.engine.connect() as conn:
                rows = conn.execute(sa.select(audit_events).where(audit_events.c.seq > last)
                                    .order_by(audit_events.c.seq).limit(batch)).all()
            if not rows:
                return
            for r in rows:
                yield _row_dict(r)
            last = int(rows[-1].seq)

    def head(self) -> dict[str, Any] | None:
        with self.store.engine.connect() as conn:
            h = conn.execute(sa.select(audit_head.c.seq, audit_head.c.hash).where(audit_head.c.id == 1)).first()
        return {"seq": int(h.seq), "hash": h.hash} if h else None

    def verify(self, anchor: tuple[int, str] | None = None) -> Verdict:
        return verify_rows(self.iter_chain(), self.head(), anchor)


def verify_export(lines: Iterable[str], anchor: tuple[int, str] | None = None) -> Verdict:
    """Verify a JSON-lines export offline; its last line is `{"head": …}`."""
    rows: list[dict[str, Any]] = []
    head: dict[str, Any] | None = None
    for line in lines:
        if not line.strip():
            continue
        obj = json.loads(line)
        if "head" in obj and "seq" not in obj:
            head = obj["head"]
        else:
            rows.append(obj)
    return verify_rows(rows, head, anchor)


def export_lines(log_: AuditLog) -> Iterator[str]:
    """JSON lines: every event with its exact hashed fields, then the head."""
    for row in log_.iter_chain():
        yield json.dumps(row, ensure_ascii=False) + "\n"
    yield json.dumps({"head": log_.head()}) + "\n"
