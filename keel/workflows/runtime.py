"""The interpreter DBOS drives: one run's spec version, step by step, each step one checkpoint
(`durable.py`), so a run continues after a crash at the first step without one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from yarl import URL

from keel.core.clock import utcnow
from keel.core.errors import KeelError
from keel.core.outbound import Outbound
from keel.core.settings import Settings
from keel.identity.principal import Principal
from keel.observe.tracing import span
from keel.workflows import approvals, templates, waits
from keel.workflows.durable import DBOS, Durable, retried_errors
from keel.workflows.effects import Egress, Mailer
from keel.workflows.spec import StepSpec, validate_inputs
from keel.workflows.steps import EXECUTORS, Executor, StepEnv, StepParts
from keel.workflows.store import RunStore
from keel.workflows.tables import workflow_runs

log = logging.getLogger("keel.workflows")
RECV_CHUNK_S = 300.0  # an approval wait re-checks its row this often (covers a decision whose message was lost)
MODEL_STEPS = ("llm", "answer")  # their model alias's outages are waits, bounded by timeout_s or max_wait
HOST_STEPS = ("http", "notify")  # their target's 429/503 with Retry-After are waits, bounded by max_wait


def _retryable(exc: BaseException) -> bool:
    """Whether a step's own retries may try again: the error's class says (a crash in Keel is never retried)."""
    return isinstance(exc, KeelError) and exc.retryable


class Engine:
    """Runs' interpreter, built from its parts: the run rows, the services steps use, and DBOS."""

    def __init__(self, settings: Settings, runs: RunStore, gateway: Any, knowledge: Any, vault: Any,
                 observe: Any, *, clock: Callable[[], float] = time.time) -> None:
        self.runs = runs
        self.clock = clock  # wall clock: a wait's next try is shown, and survives restarts, as a time of day
        pw = settings.smtp_password.get_secret_value() if settings.smtp_password else None
        mailer = Mailer(settings.smtp_host, settings.smtp_port, username=settings.smtp_username, password=pw,
                        starttls=settings.smtp_starttls, sender=settings.smtp_sender)
        egress = Egress(outbound=Outbound.from_settings(settings))
        self.parts = StepParts(runs=runs, gateway=gateway, knowledge=knowledge, vault=vault, egress=egress,
                               mailer=mailer, model_slots=asyncio.Semaphore(settings.workflow_model_concurrency),
                               flush_ledger=observe.ledger.flush)
        self.tracing = observe.tracing
        self.durable = Durable(runs.store.url, settings.workflow_executor_id, self._traced, role=settings.role,
                               concurrency=settings.worker_concurrency)

    async def close(self) -> None:
        await self.durable.close()
        await self.parts.egress.close()

    # -- the interpreter ------------------------------------------------------------------
    async def _traced(self, run_id: str) -> dict[str, Any]:
        """`execute` as one trace: a span for the run (each resumption after a crash its own), one per step."""
        with self.tracing.root("workflow run", **{"keel.run_id": run_id}):
            return await self.execute(run_id)

    async def execute(self, run_id: str) -> dict[str, Any]:
        run = await asyncio.to_thread(self.runs.load_run, run_id)
        if run is None:
            log.error("workflow run row missing", extra={"run_id": run_id})
            return {"status": "failed"}
        spec = await asyncio.to_thread(self.runs.spec, run["version_id"])
        owner_team = await asyncio.to_thread(self.runs.owner_team, run["version_id"])
        ctx: dict[str, Any] = {"inputs": run["inputs"], "vars": spec.vars, "steps": {},
                               "run": {"id": run_id, "workflow": spec.name, "version": run["version"]}}
        seed = run["seed"] or {}
        i, outcome, step = 0, "completed", None
        try:
            principal = Principal.from_dict(run["principal"])  # a row that does not load fails the run visibly
            while i < len(spec.steps):
                step = spec.steps[i]
                if step.id in seed:
                    ctx["steps"][step.id] = seed[step.id]
                    i += 1
                    continue
                env = StepEnv(parts=self.parts, run_id=run_id, workflow=spec.name, team_id=run["team_id"],
                              principal=principal, spec=spec, step=step, context=ctx, owner_team=owner_team)
                with span(f"workflow step {step.id}", {"keel.workflow": spec.name, "keel.run_id": run_id,
                                                       "keel.step": step.id, "keel.step_type": step.type}):
                    res = await self.run_step(env)
                ctx["steps"][step.id] = {"status": res["status"], "output": res.get("output")}
                if res.get("stop"):
                    outcome = res["stop"]
                    break
                i = spec.index(res["next"]) if res.get("next") else i + 1
        except Exception as exc:  # a step's error ends the run visibly as `failed`; cancellation is a BaseException
            error = _error_body(exc, step)
            if not isinstance(exc, KeelError) and retried_errors(exc) is None:
                log.exception("workflow step crashed", extra={"run_id": run_id, "step": step and step.id})
            await asyncio.to_thread(self.runs.set_status, run_id, "failed", error=error,
                                    current_step=step and step.id, waiting_for=None)
            await asyncio.to_thread(self.runs.audit_run, "workflow.run.failed", run, error=error)
            return {"status": "failed", "error": error}
        last = step.id if step else None
        outputs = {"outcome": outcome, "last_step": last,
                   "result": ctx["steps"].get(last, {}).get("output") if last else None}
        await asyncio.to_thread(self.runs.set_status, run_id, "completed", outputs=outputs, current_step=None,
                                waiting_for=None, wait=None)
        await asyncio.to_thread(self.runs.audit_run, "workflow.run.completed", run, outcome=outcome)
        return {"status": "completed", "outputs": outputs}

    async def run_step(self, env: StepEnv) -> dict[str, Any]:
        step = env.step
        if step.when is not None and not templates.truthy(env.render(step.when)):
            return await DBOS.run_step_async({"name": step.id}, _skipped)
        if step.type in EXECUTORS:
            execute = EXECUTORS[step.type]
            opts: dict[str, Any] = {"name": step.id}
            if step.retries > 1:
                opts.update(retries_allowed=True, max_attempts=step.retries, interval_seconds=step.backoff_s,
                            backoff_rate=2.0, should_retry=_retryable)
            if step.timeout_s and step.type not in HOST_STEPS:  # egress applies its own timeout
                opts["timeout_seconds"] = step.timeout_s
            if step.type in MODEL_STEPS or step.type in HOST_STEPS:
                return await waits.attempts(self._attempt(env, execute), opts)

            async def body() -> dict[str, Any]:
                out = await execute(env)
                return {"status": "completed", "output": out, "next": out.pop("next", None)}

            return await DBOS.run_step_async(opts, body)
        if step.type == "approval":
            return await self._approval(env)
        if step.type == "wait":
            return await self._wait(env)
        if step.type == "workflow":
            return await self._subworkflow(env)
        raise KeelError(f"step type {step.type!r} has no executor")  # the spec parser refuses these first

    def _attempt(self, env: StepEnv, execute: Executor) -> waits.Attempt:
        """One try of a step whose model or target may say "not now": its result, or (the run marked
        `waiting_provider`) the wait before try `n + 1`; errors no wait can fix are raised as they are."""
        step = env.step
        model = step.type in MODEL_STEPS
        bound = (step.timeout_s or env.spec.max_wait_s) if model else env.spec.max_wait_s

        async def attempt(n: int, since: float | None) -> dict[str, Any]:
            if n:  # back from a wait
                await asyncio.to_thread(self.runs.set_status, env.run_id, "running", current_step=step.id,
                                        waiting_for=None, wait=None)
            try:
                out = await execute(dataclasses.replace(env, attempt=n))
            except KeelError as exc:
                target = step.config["model"] if model else _host(env)
                wait = waits.hold(exc, target=target, kind="model" if model else "host", now=self.clock(),
                                  since=since, bound_s=bound, waits=n, topic=f"resume.{step.id}.{n}")
                log.info("workflow step waits for its provider", extra={
                    "run_id": env.run_id, "step": step.id, "for": target, "reason": wait["reason"],
                    "seconds": wait["seconds"]})
                await asyncio.to_thread(self.runs.set_status, env.run_id, waits.WAITING, current_step=step.id,
                                        waiting_for=target[:300], wait=wait)
                return {"status": waits.WAITING, "output": None, "wait": wait}
            return {"status": "completed", "output": out, "next": out.pop("next", None)}

        return attempt

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
        child_id = f"{env.run_id}.{env.step.id}"
        inputs = env.render(env.step.config.get("inputs") or {})
        await DBOS.run_step_async({"name": f"{env.step.id}.create"}, self._create_child, env, child_id, inputs)
        handle = await self.durable.start(child_id)
        result = await handle.get_result()
        if result.get("status") != "completed":
            raise KeelError(f"sub-workflow run {child_id} {result.get('status')}: {result.get('error')}",
                            fix=f"see GET /v1/workflows/{env.step.config['name']}/runs/{child_id}")
        return {"status": "completed", "output": result.get("outputs")}

    async def _approval(self, env: StepEnv) -> dict[str, Any]:
        """Open an approval, wait durably for a decision (days if need be), escalate or decide on timeout."""
        step = env.step
        opened = await DBOS.run_step_async({"name": f"{step.id}.open"}, approvals.open_approval, env)
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
                                                         env, approval_id)
                    escalated = True
                    continue
                verdict = "approved" if on_timeout == "approve" else "rejected"
                decision = {"decision": verdict, "by": "system:timeout", "reason": "no decision before the deadline",
                            "edits": {}}
                break
            decision = await DBOS.recv_async(topic=approval_id, timeout_seconds=min(remaining, RECV_CHUNK_S))
            if decision is None:  # a decision recorded while its message was lost (crash between the two)
                decision = await DBOS.run_step_async({"name": f"{step.id}.check"}, approvals.recorded_decision,
                                                     self.runs, approval_id)
        out = await DBOS.run_step_async({"name": step.id}, approvals.close_approval, env, approval_id, decision)
        if out["output"]["decision"] == "rejected":
            out["stop"] = "rejected"
        return out

    async def _create_child(self, env: StepEnv, child_id: str, inputs: Any) -> dict[str, Any]:
        """The row of a sub-workflow run (one DBOS step of the parent, so created once): the latest version the
        parent run's principal may see, in the parent's team."""
        ver = await asyncio.to_thread(self.runs.latest, env.step.config["name"], env.principal)
        spec = await asyncio.to_thread(self.runs.spec, ver.id)
        validate_inputs(spec, inputs)
        now = utcnow()
        row = {"id": child_id, "workflow": spec.name, "version": ver.version, "version_id": ver.id,
               "status": "running", "current_step": None, "inputs": inputs, "outputs": None, "error": None,
               "principal": env.principal.to_dict(), "team_id": env.team_id, "trigger": "workflow",
               "parent_run": env.run_id, "retry_of": None, "seed": None, "created_at": now, "updated_at": now,
               "finished_at": None}
        await self.runs.insert_once(workflow_runs, row, workflow_runs.c.id == child_id)
        return {"id": child_id}


async def _skipped() -> dict[str, Any]:
    return {"status": "skipped", "output": None}


async def _done(output: dict[str, Any]) -> dict[str, Any]:
    return {"status": "completed", "output": output}


def _host(env: StepEnv) -> str:
    """The host an http or notify step calls (what its run waits for when the host says "not now")."""
    c = env.step.config
    raw = c.get("url") if env.step.type == "http" else c.get("webhook")
    url = str(env.render(raw)).strip() if raw else ""
    try:
        return URL(url).host or url or env.step.id
    except ValueError:
        return url or env.step.id


def _error_body(exc: BaseException, step: StepSpec | None) -> dict[str, Any]:
    errors = retried_errors(exc)
    if errors:
        body = _error_body(errors[-1], step)
        body["attempts"] = len(errors)
        return body
    if isinstance(exc, KeelError):
        return {"code": exc.code, "detail": exc.detail, "fix": exc.fix, "step": step and step.id}
    return {"code": "internal_error", "detail": f"{type(exc).__name__}: {exc}"[:500], "step": step and step.id}
