"""Workflow rows shared by the API, the engine and its steps: versions (with a cache of parsed specs),
runs and their status, idempotent inserts, and the audit hook."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from keel.core.clock import utcnow
from keel.core.db import Store
from keel.core.errors import NotFound
from keel.identity.principal import Principal
from keel.workflows.access import definitions_visible
from keel.workflows.spec import WorkflowSpec, parse_spec
from keel.workflows.tables import workflow_runs, workflow_versions

log = logging.getLogger("keel.workflows")
FINAL = ("completed", "failed", "cancelled")
STATUSES = ("running", "waiting_approval", "waiting_provider", "completed", "failed", "cancelled")


class RunStore:
    """The store's workflow tables; `audit(action=…, actor=…, team_id=…, **details)` writes the audit trail."""

    def __init__(self, store: Store, audit: Callable[..., Any] | None = None) -> None:
        self.store = store
        self._audit = audit
        self._specs: dict[str, WorkflowSpec] = {}

    # -- versions -------------------------------------------------------------------------
    def latest(self, name: str, p: Principal | None = None) -> Any:
        """The newest version of workflow `name` (that `p` may see); NotFound if there is none."""
        q = sa.select(workflow_versions).where(workflow_versions.c.name == name)
        if p is not None:
            q = q.where(definitions_visible(p, workflow_versions.c.team_id))
        with self.store.read() as conn:
            row = conn.execute(q.order_by(workflow_versions.c.version.desc()).limit(1)).first()
        if row is None:
            raise NotFound(f"workflow {name!r} not found", fix="define it with POST /v1/workflows", workflow=name)
        return row

    def version(self, version_id: str) -> Any:
        with self.store.read() as conn:
            return conn.execute(sa.select(workflow_versions).where(workflow_versions.c.id == version_id)).one()

    def spec(self, version_id: str) -> WorkflowSpec:
        spec = self._specs.get(version_id)
        if spec is None:
            with self.store.read() as conn:
                src = conn.execute(sa.select(workflow_versions.c.source)
                                   .where(workflow_versions.c.id == version_id)).scalar_one()
            spec = self._specs[version_id] = parse_spec(src)
        return spec

    def remember(self, version_id: str, spec: WorkflowSpec) -> None:
        """Cache the spec just parsed for a new version (versions never change)."""
        self._specs[version_id] = spec

    def owner_team(self, version_id: str) -> str | None:
        """The team a workflow version belongs to (None: global); it never changes."""
        with self.store.read() as conn:
            return conn.execute(sa.select(workflow_versions.c.team_id)
                                .where(workflow_versions.c.id == version_id)).scalar_one()

    # -- runs -----------------------------------------------------------------------------
    async def insert_once(self, table: sa.Table, row: dict[str, Any], where: Any) -> str:
        """Insert `row` unless a row matching `where` exists; returns the id that is there."""
        def do() -> str:
            with self.store.engine.begin() as conn:
                found = conn.execute(sa.select(table.c.id).where(where)).scalar()
                if found is not None:
                    return str(found)
                try:
                    with conn.begin_nested():
                        conn.execute(table.insert().values(**row))
                except sa.exc.IntegrityError:  # a concurrent twin won
                    return str(conn.execute(sa.select(table.c.id).where(where)).scalar())
                return row["id"]
        return await asyncio.to_thread(do)

    def set_status(self, run_id: str, status: str, **fields: Any) -> None:
        """Move a run to `status` unless it already ended (a cancel wins over a late step)."""
        now = utcnow()
        values = dict(fields, status=status, updated_at=now)
        if status in FINAL:
            values["finished_at"] = now
        with self.store.engine.begin() as conn:
            conn.execute(workflow_runs.update().where(workflow_runs.c.id == run_id,
                                                      workflow_runs.c.status.not_in(FINAL)).values(**values))

    def load_run(self, run_id: str) -> dict[str, Any] | None:
        with self.store.read() as conn:
            row = conn.execute(sa.select(workflow_runs).where(workflow_runs.c.id == run_id)).mappings().first()
        return dict(row) if row else None

    def unfinished(self) -> list[str]:
        with self.store.read() as conn:
            return list(conn.execute(sa.select(workflow_runs.c.id)
                                     .where(workflow_runs.c.status.not_in(FINAL))).scalars().all())

    # -- audit ----------------------------------------------------------------------------
    def audit(self, action: str, actor: str, team_id: str | None, **details: Any) -> None:
        if self._audit is not None:
            self._audit(action=action, actor=actor, team_id=team_id, **details)

    def audit_run(self, action: str, run: dict[str, Any], **details: Any) -> None:
        """An event of a run, from inside it: a store hiccup is logged, never fails the run."""
        try:
            self.audit(action, run["principal"].get("key_id", "system"), run["team_id"], run_id=run["id"],
                       workflow=run["workflow"], **details)
        except sa.exc.SQLAlchemyError:
            log.exception("audit event not written", extra={"action": action})
