"""Durable execution on DBOS: one generic workflow function interprets a run's spec version step
by step; each step's result is checkpointed in DBOS' system database (a SQLite file next to Keel's
in the embedded default, Keel's own PostgreSQL at scale), so after a crash or restart a run
continues at the first step without a checkpoint.

DBOS is a process-wide singleton, so the engine is too: `Engine.current()` is the one the app
factory built, and the DBOS workflow function reaches the services through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from keel.core.clock import utcnow
from keel.core.db import Store
from keel.core.errors import KeelError
from keel.core.settings import Settings
from keel.identity.principal import Principal
from keel.workflows import approvals, templates
from keel.workflows.effects import Egress, Mailer
from keel.workflows.spec import StepSpec, WorkflowSpec, parse_spec
from keel.workflows.steps import EXECUTORS, StepEnv
from keel.workflows.tables import workflow_runs, workflow_versions

log = logging.getLogger("keel.workflows")


class _LazyDBOS:
    """`DBOS` imported on first use: a process that never defines a workflow never loads it (~25 MB)."""

    def __getattr__(self, name: str) -> Any:
        from dbos import DBOS as real

        return getattr(real, name)


DBOS: Any = _LazyDBOS()


def SetWorkflowID(workflow_id: str) -> Any:  # noqa: N802 - DBOS' name
    from dbos import SetWorkflowID as real

    return real(workflow_id)
FINAL = ("completed", "failed", "cancelled")
APP_VERSION = "keel-workflows-1"  # pinned: runs recover across Keel upgrades; bump only if replay would diverge
RECV_CHUNK_S = 300.0  # an approval wait re-checks its row this often (covers a decision whose message was lost)


class _RelaxedSyncConnection(sqlite3.Connection):
    """DBOS' SQLite connections: WAL commits sync at checkpoints, not on every commit. A killed process
    loses nothing committed; only a power cut can lose the last checkpoints, whose steps then re-run
    (and their idempotency keys make the repeat harmless)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.execute("PRAGMA synchronous=NORMAL")


def _sqlite_tuning(url: str) -> dict[str, Any]:
    """WAL for DBOS' SQLite file (it keeps the rollback journal otherwise: a full sync per checkpoint, and
    readers blocking writers), measured by bench/workflows.py."""
    if not url.startswith("sqlite"):
        return {}
    path = url.split("///", 1)[1]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")  # persistent: stored in the file
    return {"db_engine_kwargs": {"connect_args": {"factory": _RelaxedSyncConnection}}}


def _retryable(exc: BaseException) -> bool:
    flag = getattr(exc, "retryable", None)
    if flag is not None:
        return bool(flag)
    return isinstance(exc, KeelError) and exc.status in (429, 502, 503, 504)


def system_database_url(store_url: str) -> str:
    """DBOS' system database: a sibling SQLite file, or the same PostgreSQL database (schema `dbos`)."""
    if store_url.startswith("sqlite"):
        path = Path(store_url.split("///", 1)[1])
        return f"sqlite:///{path.with_name(path.stem + '.dbos.sqlite')}"
    return store_url


class Engine:
    """The services a run's steps use, and the interpreter DBOS drives."""

    _current: "Engine | None" = None

    def __init__(self, settings: Settings, store: Store, gateway: Any, knowledge: Any, vault: Any,
                 observe: Any) -> None:
        self.settings, self.store, self.gateway, self.knowledge, self.vault = settings, store, gateway, knowledge, vault
        self.observe = observe
        self.audit: Any = None  # set when governance is attached
        self.egress = Egress()
        pw = settings.smtp_password.get_secret_value() if settings.smtp_password else None
        self.mailer = Mailer(settings.smtp_host, settings.smtp_port, username=settings.smtp_username, password=pw,
                             starttls=settings.smtp_starttls, sender=settings.smtp_sender)
        self._specs: dict[str, WorkflowSpec] = {}
        self.launched = False
        # Model steps of many runs queue here, not inside the deployment, so waiting for a turn on a
        # single local model never counts against its timeout or trips its circuit breaker.
        self.model_slots = asyncio.Semaphore(settings.workflow_model_concurrency)
        self._launching = asyncio.Lock()

    @classmethod
    def current(cls) -> "Engine":
        if cls._current is None:
            raise RuntimeError("the workflow engine is not running in this process")
        return cls._current

    # -- lifecycle ------------------------------------------------------------------------
    async def ensure_launched(self) -> None:
        """Start DBOS on the running event loop (so recovered runs share the app's HTTP sessions), once:
        at start when workflows exist, else when the first one is defined or started."""
        if not self.launched:
            async with self._launching:
                if not self.launched:
                    self._launch()

    def _launch(self) -> None:
        from dbos import DBOS as dbos_cls

        keel_run()  # registered before DBOS is built
        Engine._current = self
        url = system_database_url(self.store.url)
        dbos_cls(config={"name": "keel", "system_database_url": url, **_sqlite_tuning(url),
                      "application_version": APP_VERSION, "log_level": "WARNING",
                      "executor_id": self.settings.workflow_executor_id,  # a restart recovers its own runs
                      "notification_listener_polling_interval_sec": 0.2,
                      "scheduler_polling_interval_sec": 3600.0})
        DBOS.launch()
        self.launched = True

    async def close(self) -> None:
        if self.launched:
            await asyncio.to_thread(DBOS.destroy)
            # DBOS made its (now shut down) pool the loop's default executor; later drains need a live one
            asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(thread_name_prefix="keel-drain"))
            self.launched = False
        await self.egress.close()
        Engine._current = None

    # -- store helpers --------------------------------------------------------------------
    async def flush_ledger(self) -> None:
        await self.observe.ledger.flush()

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

    def spec(self, version_id: str) -> WorkflowSpec:
        spec = self._specs.get(version_id)
        if spec is None:
            with self.store.read() as conn:
                src = conn.execute(sa.select(workflow_versions.c.source)
                                   .where(workflow_versions.c.id == version_id)).scalar_one()
            spec = self._specs[version_id] = parse_spec(src)
        return spec

    def owner_team(self, version_id: str) -> str | None:
        """The team a workflow version belongs to (None: global); it never changes."""
        with self.store.read() as conn:
            return conn.execute(sa.select(workflow_versions.c.team_id)
                                .where(workflow_versions.c.id == version_id)).scalar_one()

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

    # -- the interpreter ------------------------------------------------------------------
    async def execute(self, run_id: str) -> dict[str, Any]:
        run = await asyncio.to_thread(self.load_run, run_id)
        if run is None:
            log.error("workflow run row missing", extra={"run_id": run_id})
            return {"status": "failed"}
        spec = await asyncio.to_thread(self.spec, run["version_id"])
        owner_team = await asyncio.to_thread(self.owner_team, run["version_id"])
        principal = Principal.from_dict(run["principal"])
        ctx: dict[str, Any] = {"inputs": run["inputs"], "vars": spec.vars, "steps": {},
                               "run": {"id": run_id, "workflow": spec.name, "version": run["version"]}}
        seed = run["seed"] or {}
        i, outcome, step = 0, "completed", None
        try:
            while i < len(spec.steps):
                step = spec.steps[i]
                if step.id in seed:
                    ctx["steps"][step.id] = seed[step.id]
                    i += 1
                    continue
                env = StepEnv(engine=self, run_id=run_id, workflow=spec.name, team_id=run["team_id"],
                              principal=principal, spec=spec, step=step, context=ctx, owner_team=owner_team)
                res = await self.run_step(env)
                ctx["steps"][step.id] = {"status": res["status"], "output": res.get("output")}
                if res.get("stop"):
                    outcome = res["stop"]
                    break
                i = spec.index(res["next"]) if res.get("next") else i + 1
        except Exception as exc:  # a step's error ends the run visibly as `failed`; cancellation is a BaseException
            error = _error_body(exc, step)
            if not isinstance(exc, KeelError) and _retried_errors(exc) is None:
                log.exception("workflow step crashed", extra={"run_id": run_id, "step": step and step.id})
            await asyncio.to_thread(self.set_status, run_id, "failed", error=error, current_step=step and step.id)
            await asyncio.to_thread(self._audit, "workflow.run.failed", run, error=error)
            return {"status": "failed", "error": error}
        last = step.id if step else None
        outputs = {"outcome": outcome, "last_step": last,
                   "result": ctx["steps"].get(last, {}).get("output") if last else None}
        await asyncio.to_thread(self.set_status, run_id, "completed", outputs=outputs, current_step=None)
        await asyncio.to_thread(self._audit, "workflow.run.completed", run, outcome=outcome)
        return {"status": "completed", "outputs": outputs}

    async def run_step(self, env: StepEnv) -> dict[str, Any]:
        step = env.step
        if step.when is not None and not templates.truthy(env.render(step.when)):
            return await DBOS.run_step_async({"name": step.id}, _skipped)
        if step.type in EXECUTORS:
            execute = EXECUTORS[step.type]

            async def body() -> dict[str, Any]:
                out = await execute(env)
                return {"status": "completed", "output": out, "next": out.pop("next", None)}

            opts: dict[str, Any] = {"name": step.id}
            if step.retries > 1:
                opts.update(retries_allowed=True, max_attempts=step.retries, interval_seconds=step.backoff_s,
                            backoff_rate=2.0, should_retry=_retryable)
            if step.timeout_s and step.type not in ("http", "notify"):  # egress applies its own timeout
                opts["timeout_seconds"] = step.timeout_s
            return await DBOS.run_step_async(opts, body)
        if step.type == "approval":
            return await self._approval(env)
        if step.type == "wait":
            return await self._wait(env)
        if step.type == "workflow":
            return await self._subworkflow(env)
        raise KeelError(f"step type {step.type!r} has no executor")  # the spec parser refuses these first

    async def _wait(self, env: StepEnv) -> dict[str, Any]:
        c = env.step.config
        if c.get("seconds") is not None:
            seconds = float(c["seconds"])
        else:
            from datetime import datetime
            until = datetime.fromisoformat(str(env.render(c["until"])))
            now = await DBOS.run_step_async({"name": f"{env.step.id}.clock"}, time.time)
            seconds = max(0.0, until.timestamp() - now)
        await DBOS.sleep_async(seconds)
        return await DBOS.run_step_async({"name": env.step.id}, _done, {"waited_s": seconds})

    async def _subworkflow(self, env: StepEnv) -> dict[str, Any]:
        from keel.workflows.service import create_child_run

        child_id = f"{env.run_id}.{env.step.id}"
        inputs = env.render(env.step.config.get("inputs") or {})
        await DBOS.run_step_async({"name": f"{env.step.id}.create"}, create_child_run, self, env, child_id, inputs)
        with SetWorkflowID(child_id):
            handle = await DBOS.start_workflow_async(keel_run(), child_id)
        result = await handle.get_result()
        if result.get("status") != "completed":
            raise KeelError(f"sub-workflow run {child_id} {result.get('status')}: {result.get('error')}",
                            fix=f"see GET /v1/workflows/{env.step.config['name']}/runs/{child_id}")
        return {"status": "completed", "output": result.get("outputs")}

    async def _approval(self, env: StepEnv) -> dict[str, Any]:
        """Open an approval, wait durably for a decision (days if need be), escalate or decide on timeout."""
        step = env.step
        opened = await DBOS.run_step_async({"name": f"{step.id}.open"}, approvals.open_approval, self, env)
        approval_id, deadline = opened["id"], opened["deadline"]
        escalated = False
        decision: dict[str, Any] | None = None
        while decision is None:
            now = await DBOS.run_step_async({"name": f"{step.id}.clock"}, time.time)
            remaining = deadline - now
            if remaining <= 0:
                on_timeout = step.config["on_timeout"]
                if on_timeout == "escalate" and not escalated:
                    deadline = await DBOS.run_step_async({"name": f"{step.id}.escalate"}, approvals.escalate,
                                                         self, env, approval_id)
                    escalated = True
                    continue
                verdict = "approved" if on_timeout == "approve" else "rejected"
                decision = {"decision": verdict, "by": "system:timeout", "reason": "no decision before the deadline",
                            "edits": {}}
                break
            decision = await DBOS.recv_async(topic=approval_id, timeout_seconds=min(remaining, RECV_CHUNK_S))
            if decision is None:  # a decision recorded while its message was lost (crash between the two)
                decision = await DBOS.run_step_async({"name": f"{step.id}.check"}, approvals.recorded_decision,
                                                     self, approval_id)
        out = await DBOS.run_step_async({"name": step.id}, approvals.close_approval, self, env, approval_id, decision)
        if out["output"]["decision"] == "rejected":
            out["stop"] = "rejected"
        return out

    def _audit(self, action: str, run: dict[str, Any], **details: Any) -> None:
        if self.audit is not None:
            try:
                self.audit(action=action, actor=run["principal"].get("key_id", "system"), team_id=run["team_id"],
                           run_id=run["id"], workflow=run["workflow"], **details)
            except sa.exc.SQLAlchemyError:
                log.exception("audit event not written", extra={"action": action})


async def _skipped() -> dict[str, Any]:
    return {"status": "skipped", "output": None}


async def _done(output: dict[str, Any]) -> dict[str, Any]:
    return {"status": "completed", "output": output}


def _retried_errors(exc: BaseException) -> list[BaseException] | None:
    """Each attempt's error when `exc` is DBOS' "step retried too often" (public `dbos.error`), else None."""
    from dbos import error as dbos_error

    return exc.errors if isinstance(exc, dbos_error.DBOSMaxStepRetriesExceeded) else None


def _error_body(exc: BaseException, step: StepSpec | None) -> dict[str, Any]:
    errors = _retried_errors(exc)
    if errors:
        body = _error_body(errors[-1], step)
        body["attempts"] = len(errors)
        return body
    if isinstance(exc, KeelError):
        return {"code": exc.code, "detail": exc.detail, "fix": exc.fix, "step": step and step.id}
    return {"code": "internal_error", "detail": f"{type(exc).__name__}: {exc}"[:500], "step": step and step.id}


_registered: list[Any] = []


def keel_run() -> Any:
    """The one DBOS workflow (registered on first use): interpret run `run_id`, whose spec version and
    inputs are in the store."""
    if not _registered:
        from dbos import DBOS as dbos_cls

        @dbos_cls.workflow(name="keel.workflow_run", max_recovery_attempts=50)
        async def run(run_id: str) -> dict[str, Any]:
            return await Engine.current().execute(run_id)

        _registered.append(run)
    return _registered[0]
