"""Durable execution on DBOS, behind one small object: launch, start a run by id, read its steps, cancel
it, send it a message. Each step's result is checkpointed in DBOS' system database (a SQLite file next to
Keel's in the embedded default, Keel's own PostgreSQL at scale), so after a crash or restart a run
continues at the first step without a checkpoint.

DBOS is a process-wide singleton, so one function is registered as its workflow and the `Durable` that
launched DBOS in this process is the one it hands each run to.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

RUNS_QUEUE = "keel_runs"  # runs queued by API replicas (role `api`) and handed over from dead workers
APP_VERSION = "keel-workflows-1"  # pinned: runs recover across Keel upgrades; bump only if replay would diverge
Interpret = Callable[[str], Awaitable[dict[str, Any]]]


class _LazyDBOS:
    """`DBOS` imported on first use: a process that never defines a workflow never loads it (nor holds its memory)."""

    # The class, once imported: an import statement per attribute cost a share of every agent step (measured in
    # bench/README.md).
    _real: Any = None

    def __getattr__(self, name: str) -> Any:
        real = _LazyDBOS._real
        if real is None:
            from dbos import DBOS as real

            _LazyDBOS._real = real
        return getattr(real, name)


DBOS: Any = _LazyDBOS()


def retried_errors(exc: BaseException) -> list[BaseException] | None:
    """Each attempt's error when `exc` is DBOS' "step retried too often" (public `dbos.error`), else None."""
    from dbos import error as dbos_error

    return exc.errors if isinstance(exc, dbos_error.DBOSMaxStepRetriesExceeded) else None


class _RelaxedSyncConnection(sqlite3.Connection):
    """DBOS' SQLite connections: WAL commits sync at checkpoints, not on every commit. A killed process
    loses nothing committed; only a power cut can lose the last checkpoints, whose steps then re-run
    (and their idempotency keys make the repeat harmless)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.execute("PRAGMA synchronous=NORMAL")


def sqlite_tuning(url: str) -> dict[str, Any]:
    """WAL for DBOS' SQLite file (it keeps the rollback journal otherwise: a full sync per checkpoint, and
    readers blocking writers), measured by bench/workflows.py."""
    if not url.startswith("sqlite"):
        return {}
    path = url.split("///", 1)[1]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")  # persistent: stored in the file
    return {"db_engine_kwargs": {"connect_args": {"factory": _RelaxedSyncConnection}}}


def system_database_url(store_url: str) -> str:
    """DBOS' system database: a sibling SQLite file, or the same PostgreSQL database (schema `dbos`)."""
    if store_url.startswith("sqlite"):
        path = Path(store_url.split("///", 1)[1])
        return f"sqlite:///{path.with_name(path.stem + '.dbos.sqlite')}"
    return store_url


_registered: list[Any] = []


def _workflow() -> Any:
    """The one DBOS workflow (registered on first use): hand run `run_id` to this process's `Durable`."""
    if not _registered:
        from dbos import DBOS as dbos_cls

        @dbos_cls.workflow(name="keel.workflow_run", max_recovery_attempts=50)
        async def run(run_id: str) -> dict[str, Any]:
            return await Durable.current().interpret(run_id)

        _registered.append(run)
    return _registered[0]


class Durable:
    """DBOS for this process: launched once, on the running event loop; `interpret(run_id)` runs a run."""

    _current: Durable | None = None

    def __init__(self, store_url: str, executor_id: str, interpret: Interpret, *, role: str = "all",
                 concurrency: int = 16) -> None:
        """`role` `api`: runs are queued for workers, never executed here; `worker`/`all`: executed here, and on
        PostgreSQL also taken from the shared queue (`concurrency` at once)."""
        self.store_url, self.executor_id, self.interpret = store_url, executor_id, interpret
        self.role, self.concurrency = role, concurrency
        self.launched = False
        self._launching = asyncio.Lock()

    @classmethod
    def current(cls) -> Durable:
        if cls._current is None:
            raise RuntimeError("the workflow engine is not running in this process")
        return cls._current

    async def ensure_launched(self) -> None:
        """Start DBOS on the running event loop (so recovered runs share the app's HTTP sessions), once:
        at start when workflows exist, else when the first one is defined or started."""
        if not self.launched:
            async with self._launching:
                if not self.launched:
                    self._launch()
                    if self.role != "api" and not self.store_url.startswith("sqlite"):
                        await DBOS.register_queue_async(RUNS_QUEUE, worker_concurrency=self.concurrency)

    def _launch(self) -> None:
        from dbos import DBOS as dbos_cls

        _workflow()  # registered before DBOS is built
        Durable._current = self
        url = system_database_url(self.store_url)
        dbos_cls(config={"name": "keel", "system_database_url": url, **sqlite_tuning(url),
                         "application_version": APP_VERSION, "log_level": "WARNING",
                         "executor_id": self.executor_id,  # a restart recovers its own runs
                         "notification_listener_polling_interval_sec": 0.2,
                         "scheduler_polling_interval_sec": 3600.0})
        if self.role == "api":
            DBOS.listen_queues([])  # takes nothing from the runs queue: workers do
        DBOS.launch()
        self.launched = True

    async def close(self) -> None:
        if self.launched:
            await asyncio.to_thread(DBOS.destroy)
            # DBOS made its (now shut down) pool the loop's default executor; later drains need a live one
            asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(thread_name_prefix="keel-drain"))
            self.launched = False
        if Durable._current is self:
            Durable._current = None

    async def start(self, run_id: str) -> Any:
        """Start run `run_id`'s workflow (idempotent: the id is the workflow's); returns its handle."""
        return await self.begin(_workflow(), run_id)

    async def begin(self, workflow: Any, run_id: str) -> Any:
        """Start DBOS workflow function `workflow` for `run_id` under that id: here, or (role `api`) queued for
        a worker; returns its handle."""
        from dbos import SetWorkflowID

        await self.ensure_launched()
        with SetWorkflowID(run_id):
            if self.role == "api":
                return await DBOS.enqueue_workflow_async(RUNS_QUEUE, workflow, run_id)
            return await DBOS.start_workflow_async(workflow, run_id)

    async def take_over(self, executor_id: str) -> int:
        """Hand the unfinished runs of dead process `executor_id` to the runs queue, where a live worker takes
        each exactly once (DBOS dequeues atomically); returns how many."""
        await self.ensure_launched()
        pending = await DBOS.list_workflows_async(status="PENDING", executor_id=executor_id, load_input=False,
                                                  load_output=False)
        for wf in pending:
            await DBOS.resume_workflow_async(wf.workflow_id, queue_name=RUNS_QUEUE)
        return len(pending)

    async def exists(self, run_id: str) -> bool:
        await self.ensure_launched()
        return await DBOS.get_workflow_status_async(run_id) is not None

    async def steps(self, run_id: str) -> list[dict[str, Any]]:
        """The checkpointed steps of a run, in order."""
        await self.ensure_launched()
        return await DBOS.list_workflow_steps_async(run_id)

    async def cancel(self, run_id: str) -> None:
        await self.ensure_launched()
        await DBOS.cancel_workflow_async(run_id)

    async def send(self, run_id: str, message: Any, *, topic: str, idempotency_key: str) -> None:
        """A durable message to a waiting run (delivered once per idempotency key)."""
        await self.ensure_launched()
        await DBOS.send_async(run_id, message, topic=topic, idempotency_key=idempotency_key)
