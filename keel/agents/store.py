"""Agent rows shared by the API and the loop: mandate versions (parsed once), the kill switch, runs, the
action log (one row per run and position, so a replayed step never logs twice) and the audit hook."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import sqlalchemy as sa

from keel.agents.access import definitions_visible
from keel.agents.mandate import Mandate, parse_mandate
from keel.agents.tables import agent_actions, agent_effects, agent_notes, agent_runs, agent_switches, agent_versions
from keel.core.clock import iso, utcnow
from keel.core.db import Store
from keel.core.errors import NotFound
from keel.core.ids import new_id
from keel.governance.audit import AuditLog
from keel.identity.principal import Principal

log = logging.getLogger("keel.agents")
FINAL = ("completed", "failed", "stopped")
THREAD_TURNS = 10  # earlier runs of the end user's thread the model sees
RECALL_SCAN = 500  # newest notes `recall` ranks
STATUSES = ("running", "waiting_approval", "waiting_provider", *FINAL)
# How long a replica trusts a read that found an agent running (saves two store reads and a thread hop of every agent
# step: measured in bench/README.md); a pause is acknowledged only this long after it commits (`Agents.set_paused`)
SWITCH_TTL_S = 0.25
# The per-action statements, built once and executed with parameters (building one with literal values cost
# more than running it: bench/agents.py)
_PAUSED = sa.select(agent_switches.c.paused).where(agent_switches.c.name == sa.bindparam("name"))
_LOG_ACTION = agent_actions.insert()
_EFFECT = agent_effects.insert()


class AgentStore:
    """The store's agent tables; `audit(action=…, actor=…, team_id=…, **details)` writes the audit trail."""

    def __init__(self, store: Store, audit: Callable[..., Any] | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self._audit = audit
        self._mandates: dict[str, Mandate] = {}
        self._clock = clock
        self._running: dict[str, float] = {}  # agent → when the read that found it running began

    # -- versions -----------------------------------------------------------------------------
    def latest(self, name: str, p: Principal | None = None) -> Any:
        q = sa.select(agent_versions).where(agent_versions.c.name == name)
        if p is not None:
            q = q.where(definitions_visible(p, agent_versions.c.team_id))
        with self.store.read() as conn:
            row = conn.execute(q.order_by(agent_versions.c.version.desc()).limit(1)).first()
        if row is None or (p is not None and not p.may_use_agent(name)):
            raise NotFound(f"agent {name!r} not found", fix="define it with POST /v1/agents", agent=name)
        return row

    def mandate(self, version_id: str) -> Mandate:
        m = self._mandates.get(version_id)
        if m is None:
            with self.store.read() as conn:
                src = conn.execute(sa.select(agent_versions.c.source)
                                   .where(agent_versions.c.id == version_id)).scalar_one()
            m = self._mandates[version_id] = parse_mandate(src)
        return m

    def remember(self, version_id: str, mandate: Mandate) -> None:
        self._mandates[version_id] = mandate

    def owner_team(self, version_id: str) -> str | None:
        with self.store.read() as conn:
            q = sa.select(agent_versions.c.team_id).where(agent_versions.c.id == version_id)
            return conn.execute(q).scalar_one()

    # -- kill switch --------------------------------------------------------------------------
    def paused(self, name: str) -> bool:
        """The kill switch. A store read that found the agent running, begun less than `SWITCH_TTL_S` ago, is trusted;
        "paused" is read every time, so a resume counts at once. A pause is acknowledged `SWITCH_TTL_S` after it
        commits (`Agents.set_paused`): a "running" trusted after that began after the pause, on every replica."""
        if self.trusts_running(name):
            return False
        began = self._clock()  # before the read: the stamp is never later than what the read saw
        with self.store.read() as conn:
            value = bool(conn.execute(_PAUSED, {"name": name}).scalar())
        if value:
            self._running.pop(name, None)
        else:
            self._running[name] = began
        return value

    def trusts_running(self, name: str) -> bool:
        """Whether a read that found `name` running is still trusted: no need to read the store to act now."""
        began = self._running.get(name)
        return began is not None and self._clock() - began < SWITCH_TTL_S

    def set_paused(self, name: str, paused: bool, by: str, reason: str | None) -> None:
        values = {"paused": paused, "changed_by": by, "reason": reason, "changed_at": utcnow()}
        with self.store.engine.begin() as conn:
            update = agent_switches.update().where(agent_switches.c.name == name).values(**values)
            if conn.execute(update).rowcount == 0:
                conn.execute(agent_switches.insert().values(name=name, **values))
        # nothing trusted from this write: another replica's pause may commit between it and any stamp taken here
        self._running.pop(name, None)

    # -- runs ---------------------------------------------------------------------------------
    def insert_run(self, row: dict[str, Any]) -> None:
        with self.store.engine.begin() as conn:
            if conn.execute(sa.select(agent_runs.c.id).where(agent_runs.c.id == row["id"])).first() is None:
                conn.execute(agent_runs.insert().values(**row))

    def load_run(self, run_id: str) -> dict[str, Any] | None:
        with self.store.read() as conn:
            row = conn.execute(sa.select(agent_runs).where(agent_runs.c.id == run_id)).mappings().first()
        return dict(row) if row else None

    def set_status(self, run_id: str, status: str, **fields: Any) -> None:
        now = utcnow()
        values = dict(fields, status=status, updated_at=now)
        if status in FINAL:
            values["finished_at"] = now
        with self.store.engine.begin() as conn:
            conn.execute(agent_runs.update().where(agent_runs.c.id == run_id, agent_runs.c.status.not_in(FINAL))
                         .values(**values))

    def unfinished(self) -> list[str]:
        with self.store.read() as conn:
            return list(conn.execute(sa.select(agent_runs.c.id).where(agent_runs.c.status.not_in(FINAL))).scalars())

    # -- action log ---------------------------------------------------------------------------
    def log_action(self, row: dict[str, Any], event: tuple[str, str, str | None, dict[str, Any]] | None = None) -> bool:
        """Write one action unless the run already has one at this position; True when written now. `event`
        (action, actor, team id, details): its audit event, written only with the row, in the same transaction."""
        row = {"id": new_id("act"), "created_at": utcnow(), **row}
        twin = False
        try:  # the (run, position) key refuses a replay's twin: no read first, one transaction per action
            with self.store.engine.begin() as conn:
                try:
                    conn.execute(_LOG_ACTION, row)
                except sa.exc.IntegrityError:  # a replayed step, or a concurrent twin (a recovered run elsewhere)
                    twin = True
                    raise
                if event is not None and isinstance(self._audit, AuditLog):
                    action, actor, team_id, details = event
                    self._audit.append(conn, action, actor, team_id, team_id=team_id, **details)
                    event = None
        except sa.exc.SQLAlchemyError:
            if twin:
                return False
            # the audit write failed (or the store hiccupped): the row on its own, the event as a hiccup allows
            try:
                with self.store.engine.begin() as conn:
                    conn.execute(_LOG_ACTION, row)
            except sa.exc.IntegrityError:
                return False
        if event is not None:
            self.audit_quietly(event[0], event[1], event[2], **event[3])
        return True

    def actions(self, run_id: str) -> list[dict[str, Any]]:
        with self.store.read() as conn:
            rows = conn.execute(sa.select(agent_actions).where(agent_actions.c.run_id == run_id)
                                .order_by(agent_actions.c.seq)).mappings().all()
        return [dict(r) for r in rows]

    def calls_today(self, agent: str, tool: str) -> int:
        """Allowed calls of `tool` by any run of `agent` in the last 24 hours."""
        since = utcnow() - timedelta(days=1)
        with self.store.read() as conn:
            return int(conn.execute(sa.select(sa.func.count()).where(
                agent_actions.c.agent == agent, agent_actions.c.tool == tool, agent_actions.c.kind == "tool",
                agent_actions.c.decision == "allowed", agent_actions.c.created_at >= since)).scalar() or 0)

    def cost_today(self, agent: str) -> float:
        """What all runs of `agent` spent on model calls in the last 24 hours."""
        since = utcnow() - timedelta(days=1)
        with self.store.read() as conn:
            return float(conn.execute(sa.select(sa.func.coalesce(sa.func.sum(agent_actions.c.cost), 0.0)).where(
                agent_actions.c.agent == agent, agent_actions.c.created_at >= since)).scalar() or 0.0)

    def effect(self, row: dict[str, Any]) -> str:
        """Insert a tool effect once per idempotency key; returns the id that is there."""
        row = {"id": new_id("eff"), "created_at": utcnow(), **row}
        try:  # the key's unique index refuses a repeat: read only then
            with self.store.engine.begin() as conn:
                conn.execute(_EFFECT, row)
        except sa.exc.IntegrityError:
            with self.store.read() as conn:
                return str(conn.execute(sa.select(agent_effects.c.id)
                                        .where(agent_effects.c.idempotency_key == row["idempotency_key"])).scalar())
        return row["id"]

    # -- memory -------------------------------------------------------------------------------
    def thread(self, run: dict[str, Any], turns: int = THREAD_TURNS) -> list[dict[str, Any]]:
        """The end user's conversation before this run: the tasks and answers of their earlier completed runs of
        the same agent in the same team (never another user's or team's), oldest first."""
        if not run.get("user_id"):
            return []
        c = agent_runs.c
        q = (sa.select(c.task, c.answer).where(c.agent == run["agent"], c.user_id == run["user_id"],
                                                c.status == "completed", c.created_at < run["created_at"],
                                                c.id != run["id"],
                                                c.team_id.is_(None) if run["team_id"] is None
                                                else c.team_id == run["team_id"])
             .order_by(c.created_at.desc()).limit(turns))
        with self.store.read() as conn:
            rows = conn.execute(q).all()
        return [m for r in reversed(rows) for m in ({"role": "user", "content": r.task},
                                                     {"role": "assistant", "content": r.answer or ""})]

    def add_note(self, row: dict[str, Any]) -> str:
        """Keep a `remember` note once per idempotency key; returns the note's id."""
        row = {"id": new_id("note"), "created_at": utcnow(), **row}
        with self.store.engine.begin() as conn:
            found = conn.execute(sa.select(agent_notes.c.id)
                                 .where(agent_notes.c.idempotency_key == row["idempotency_key"])).scalar()
            if found is not None:
                return str(found)
            conn.execute(agent_notes.insert().values(**row))
        return row["id"]

    def recall(self, agent: str, team_id: str | None, query: str, limit: int = 5,
               user_id: str | None = None) -> list[dict[str, Any]]:
        """Up to `limit` notes of `agent` in `team_id` (only), ranked by how many of the query's words they hold,
        newer first among equals; notes sharing no word are left out. A note kept in a run for an end user is
        that user's: recalled only in runs for the same `user_id` (notes kept for no user are the team's)."""
        c = agent_notes.c
        mine = c.user_id.is_(None) if user_id is None else sa.or_(c.user_id.is_(None), c.user_id == user_id)
        q = (sa.select(c.id, c.text, c.created_at).where(c.agent == agent, c.team_id.is_(None) if team_id is None
                                                          else c.team_id == team_id, mine)
             .order_by(c.created_at.desc()).limit(RECALL_SCAN))
        with self.store.read() as conn:
            rows = conn.execute(q).all()
        words = {w for w in re.findall(r"\w+", query.lower()) if len(w) > 2}
        scored = [(len(words & set(re.findall(r"\w+", r.text.lower()))), i, r) for i, r in enumerate(rows)]
        best = sorted((s for s in scored if s[0] > 0), key=lambda s: (-s[0], s[1]))[:limit]
        return [{"id": r.id, "note": r.text, "at": iso(r.created_at)} for _, _, r in best]

    # -- audit --------------------------------------------------------------------------------
    def audit(self, action: str, actor: str, team_id: str | None, **details: Any) -> None:
        if self._audit is not None:
            self._audit(action=action, actor=actor, team_id=team_id, **details)

    def audit_quietly(self, action: str, actor: str, team_id: str | None, **details: Any) -> None:
        """An event from inside a run: a store hiccup is logged, never fails the run."""
        try:
            self.audit(action, actor, team_id, **details)
        except sa.exc.SQLAlchemyError:
            log.exception("audit event not written", extra={"action": action})
