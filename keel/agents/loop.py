"""The agent loop on DBOS: a model call, then each tool call it asks for, until it answers. Each model call
and each tool call is one checkpointed step, so a restart resumes at the first action without one.

Before every action the step checks the kill switch (`AgentStore.paused`) and the run's budgets; before every tool
call the mandate decides (`policy.py`). A refused call is logged with its rule and told to the model, which
may try something else; a spent budget or the kill switch stops the run.

A model call told "not now" (an open circuit, a rate limit, a budget period that resets, an upstream 429,
503 or timeout) does not fail the run: as in workflows (`keel.workflows.waits`), the run waits durably
(status `waiting_provider`, the wait in the run row), bounded by what is left of the mandate's wall time
and by its `max_wait` budget (default `DEFAULT_MAX_WAIT_S`, as workflows), then tries again under a new
ledger request id; an operator's resume ends the wait early. Errors no wait can fix (policy denial, guard
block, bad request) fail the run at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC
from typing import Any

import sqlalchemy as sa

from keel.agents.mandate import Mandate
from keel.agents.policy import Decision, check_call
from keel.agents.store import AgentStore
from keel.agents.tools import EXECUTORS, ToolCall, ToolParts, as_text, mcp_headers
from keel.core.errors import KeelError
from keel.core.logs import redactor
from keel.gateway.pipeline import PROMPT_VERSION, Call
from keel.gateway.protocol import ChatRequest
from keel.identity.principal import Principal
from keel.observe.prompts import Prompts
from keel.observe.tracing import span
from keel.workflows import approvals, waits
from keel.workflows.durable import DBOS
from keel.workflows.spec_types import StepSpec
from keel.workflows.steps import StepEnv, StepParts

log = logging.getLogger("keel.agents")
RECV_CHUNK_S = 300.0
INLINE_ARGS = 4096  # a tool call's arguments (JSON text) checked on the event loop when no larger
SHOW = {"tool": "{{ call.tool }}", "arguments": "{{ call.arguments }}", "rule": "{{ call.rule }}"}

_registered: list[Any] = []


def agent_workflow() -> Any:
    """The one DBOS workflow of agent runs (registered before DBOS launches, so recovery finds it)."""
    if not _registered:
        from dbos import DBOS as dbos_cls

        @dbos_cls.workflow(name="keel.agent_run", max_recovery_attempts=50)
        async def run(run_id: str) -> dict[str, Any]:
            return await AgentEngine.current().traced(run_id)

        _registered.append(run)
    return _registered[0]


class Run:
    """One run's fixed facts, read once at the start of `execute`."""

    def __init__(self, row: dict[str, Any], mandate: Mandate, owner_team: str | None) -> None:
        self.id, self.agent, self.version = row["id"], row["agent"], row["version"]
        self.team_id, self.owner_team, self.mandate = row["team_id"], owner_team, mandate
        self.principal = Principal.from_dict(row["principal"])
        self.actor = self.principal.user_id or self.principal.key_id
        self.user_id: str | None = row.get("user_id")  # the end user the run is for (memory.thread: user)
        created = row["created_at"]
        self.started_at = (created if created.tzinfo else created.replace(tzinfo=UTC)).timestamp()


class AgentEngine:
    """Runs' interpreter, built from its parts; `current()` is the one DBOS hands runs to in this process."""

    _current: AgentEngine | None = None

    def __init__(self, store: AgentStore, gateway: Any, parts: ToolParts, approval_parts: StepParts,
                 flush_ledger: Callable[[], Any], *, model_slots: int = 2,
                 clock: Callable[[], float] = time.time, tracing: Any = None) -> None:
        self.store, self.gateway, self.parts = store, gateway, parts
        self.tracing = tracing  # keel.observe's: each run one trace, each model call and tool call a span
        self.approval_parts, self.flush_ledger, self.clock = approval_parts, flush_ledger, clock
        self.model_slots = asyncio.Semaphore(model_slots)
        agent_workflow()
        AgentEngine._current = self

    @classmethod
    def current(cls) -> AgentEngine:
        if cls._current is None:
            raise RuntimeError("the agent engine is not running in this process")
        return cls._current

    # -- the loop ---------------------------------------------------------------------------------
    async def traced(self, run_id: str) -> dict[str, Any]:
        """`execute` as one trace (each resumption after a crash its own) when tracing is on."""
        if self.tracing is None:
            return await self.execute(run_id)
        with self.tracing.root("agent run", **{"keel.agent_run_id": run_id}):
            return await self.execute(run_id)

    async def execute(self, run_id: str) -> dict[str, Any]:
        row = await asyncio.to_thread(self.store.load_run, run_id)
        if row is None:
            log.error("agent run row missing", extra={"run_id": run_id})
            return {"status": "failed"}
        try:
            owner = await asyncio.to_thread(self.store.owner_team, row["version_id"])
            mandate = await asyncio.to_thread(self.store.mandate, row["version_id"])
            if self.parts.mcp is not None:  # MCP tools' schemas from their servers' listings (mcp_client.py)
                mandate = await self.parts.mcp.resolve(mandate, mcp_headers(self.parts, owner))
            run = Run(row, mandate, owner)
            m = run.mandate
            system = m.goal + ("\n\n" + m.instructions if m.instructions else "")
            thread: list[dict[str, Any]] = []
            if m.thread == "user" and run.user_id:  # read once, checkpointed: a replay sees the same thread
                thread = await DBOS.run_step_async({"name": "thread"}, self.store.thread, row)
            head: list[dict[str, Any]] = [{"role": "system", "content": system}]
            state: dict[str, Any] = {"steps": 0, "tokens": 0, "cost": 0.0, "calls": {}}
            if m.prompt:  # the registry prompt, resolved once as the run's principal and checkpointed
                rendered = await DBOS.run_step_async({"name": "prompt"}, self._prompt, run, row["task"])
                head, state["prompt_version"] = rendered["messages"], rendered["ref"]
            messages: list[dict[str, Any]] = [*head, *thread, {"role": "user", "content": row["task"]}]
            seq = 0
            while True:
                seq += 1
                with span("agent model", {"keel.agent": run.agent, "keel.agent.seq": seq}):
                    out = await waits.attempts(self._model_attempt(run, messages, state, seq),
                                               {"name": f"model.{seq}"})
                if "stop" in out:
                    return await self._finish(run, "stopped", error=out["stop"])
                state["steps"] += 1
                state["tokens"] += out["tokens"]
                state["cost"] += out["cost"]
                msg = out["message"]
                messages.append(msg)
                if not msg.get("tool_calls"):
                    return await self._finish(run, "completed", answer=msg.get("content") or "")
                for call in msg["tool_calls"]:
                    seq += 1
                    tool = str((call.get("function") or {}).get("name") or "")
                    with span(f"agent tool {tool}", {"keel.agent": run.agent, "keel.agent.seq": seq}):
                        res = await self.tool_call(run, call, state, seq)
                    messages.append({"role": "tool", "tool_call_id": call.get("id") or f"call_{seq}",
                                     "content": res["content"]})
                    if "stop" in res:
                        return await self._finish(run, "stopped", error=res["stop"])
        except Exception as exc:  # an error ends the run visibly as `failed`; cancellation is a BaseException
            error = ({"code": exc.code, "detail": exc.detail, "fix": exc.fix} if isinstance(exc, KeelError)
                     else {"code": "internal_error", "detail": f"{type(exc).__name__}: {exc}"[:500]})
            if history := await asyncio.to_thread(self._waits, run_id):
                error["waits"] = history
            if not isinstance(exc, KeelError):
                log.exception("agent run crashed", extra={"run_id": run_id})
            await asyncio.to_thread(self.store.set_status, run_id, "failed", error=error)
            await asyncio.to_thread(self.store.audit_quietly, "agent.run.failed", "system", row["team_id"],
                                    run_id=run_id, agent=row["agent"], error=error)
            return {"status": "failed", "error": error}

    async def _finish(self, run: Run, status: str, *, answer: str | None = None,
                      error: dict[str, Any] | None = None) -> dict[str, Any]:
        try:  # the run's model calls are in the usage ledger once it reads as ended
            await self.flush_ledger()
        except sa.exc.SQLAlchemyError:  # the rows stay spooled and queued: the ledger's next flush writes them
            log.warning("usage ledger not flushed at the end of an agent run", extra={"run_id": run.id})
        history = await asyncio.to_thread(self._waits, run.id)
        kept = dict(error or {}, waits=history) if history else error  # the provider waits stay in the run's record
        await asyncio.to_thread(self.store.set_status, run.id, status, answer=answer, error=kept)
        await asyncio.to_thread(self.store.audit_quietly, f"agent.run.{status}", run.actor, run.team_id,
                                run_id=run.id, agent=run.agent, version=run.version, **({"error": error} if error else {}))
        return {"status": status, "answer": answer, "error": error}

    # -- actions (each one DBOS step) -------------------------------------------------------------
    def _log(self, run: Run, seq: int, kind: str, decision: str, *, tool: str | None = None, args: Any = None,
             rule: str | None = None, detail: str = "", result: str | None = None, tokens: int = 0,
             cost: float = 0.0) -> None:
        self.store.log_action({  # the row and its audit event in one transaction, neither for a replay's twin
            "run_id": run.id, "seq": seq, "agent": run.agent, "version": run.version, "principal": run.actor,
            "team_id": run.team_id, "kind": kind, "tool": tool, "arguments": args, "decision": decision,
            "rule": rule if rule is None or len(rule) <= 300 else rule[:299] + "…",  # the column's size
            "detail": redactor.scrub(detail[:2000]),
            "result": None if result is None else redactor.scrub(result[:1000]),  # vault values and keys: ***
            "tokens": tokens, "cost": cost},
            (f"agent.action.{decision}", run.actor, run.team_id,
             {"run_id": run.id, "agent": run.agent, "version": run.version, "seq": seq, "kind": kind, "tool": tool,
              "rule": rule, "tokens": tokens, "cost": cost}))

    def _gate(self, run: Run, state: dict[str, Any], *, model: bool,
              paused: bool | None = None) -> tuple[str, str] | None:
        """The kill switch (`paused`: False when a trusted read found the agent running, else read) and the run's budgets:
        (rule, detail) when the run must stop."""
        if self.store.paused(run.agent) if paused is None else paused:
            return "kill_switch", f"agent {run.agent!r} is paused"
        b = run.mandate.budgets
        elapsed = self.clock() - run.started_at
        if elapsed > b.wall_time_s:
            return "budget.wall_time", f"the run has taken {elapsed:.0f} s (budget {b.wall_time_s:g} s)"
        if model:
            if state["steps"] >= b.steps:
                return "budget.steps", f"the run made {state['steps']} model calls (budget {b.steps})"
            if state["tokens"] >= b.tokens:
                return "budget.tokens", f"the run used {state['tokens']} tokens (budget {b.tokens})"
            if b.cost is not None and state["cost"] >= b.cost:
                return "budget.cost", f"the run cost {state['cost']:.6f} (budget {b.cost:g})"
            if b.cost_per_day is not None and (spent := self.store.cost_today(run.agent)) >= b.cost_per_day:
                return "budget.cost_per_day", f"the agent's runs cost {spent:.6f} in 24 hours (budget {b.cost_per_day:g})"
        return None

    # -- provider waits: the run row's `error` holds them while the run is not failed ---------------
    def _waits(self, run_id: str) -> list[dict[str, Any]]:
        row = self.store.load_run(run_id) or {}
        held = row.get("error")
        return list(held.get("waits") or []) if isinstance(held, dict) else []

    def _model_attempt(self, run: Run, messages: list[dict[str, Any]], state: dict[str, Any],
                       seq: int) -> waits.Attempt:
        """Try `n` of model call `seq` (one DBOS step): its result, or (the run marked `waiting_provider`) the wait
        before try `n + 1`; past the bound, or on an error no wait can fix, the error ends the run."""
        m = run.mandate

        async def attempt(n: int, since: float | None) -> dict[str, Any]:
            if n:  # back from a wait
                await asyncio.to_thread(self.store.set_status, run.id, "running",
                                        error={"waits": await asyncio.to_thread(self._waits, run.id)})
            try:
                return await self.model_step(run, messages, state, seq, n)
            except KeelError as exc:
                now = self.clock()
                first = now if since is None else since
                most = m.budgets.max_wait_s or waits.DEFAULT_MAX_WAIT_S
                bound = max(0.0, min(most, run.started_at + m.budgets.wall_time_s - first))
                try:
                    wait = waits.hold(exc, target=m.model, kind="model", now=now, since=since, bound_s=bound,
                                      waits=n, topic=f"resume.model.{seq}.{n}")
                except waits.ProviderUnavailable as gave_up:
                    raise AgentProviderUnavailable(gave_up.detail, fix=(
                        "raise the mandate's wall_time or max_wait budget, add a fallback to the model's alias, "
                        "or run the task again when the provider is back"), **gave_up.ids) from None
            log.info("agent model call waits for its provider", extra={
                "run_id": run.id, "seq": seq, "for": m.model, "reason": wait["reason"], "seconds": wait["seconds"]})
            history = [*await asyncio.to_thread(self._waits, run.id), dict(waits.public(wait) or {}, seq=seq)]
            await asyncio.to_thread(self.store.set_status, run.id, waits.WAITING,
                                    error={"waiting": wait, "waits": history})
            await asyncio.to_thread(self.store.audit_quietly, "agent.run.waiting", run.actor, run.team_id,
                                    run_id=run.id, agent=run.agent, seq=seq, waiting=waits.public(wait))
            return {"status": waits.WAITING, "wait": wait}

        return attempt

    async def _prompt(self, run: Run, task: str) -> dict[str, Any]:
        """The mandate's `prompt` with variables goal, instructions and task: its messages and `name@version`."""
        m = run.mandate
        r = await asyncio.to_thread(Prompts(self.store.store).resolve, run.principal, m.prompt,
                                    {"goal": m.goal, "instructions": m.instructions, "task": task})
        return {"messages": r.messages, "ref": r.ref}

    async def model_step(self, run: Run, messages: list[dict[str, Any]], state: dict[str, Any],
                         seq: int, attempt: int = 0) -> dict[str, Any]:
        m = run.mandate
        max_tokens = max(1, min(m.budgets.max_tokens_per_call, m.budgets.tokens - state["tokens"]))
        # the ledger's id: the same when a crash re-runs this try (never metered twice), another after a wait
        call = Call(request_id=f"{run.id}/{seq}" + (f"~{attempt}" if attempt else ""), principal=run.principal,
                    kind="chat", alias=m.model,
                    chat=ChatRequest(model=m.model, messages=messages, max_tokens=max_tokens,
                                     tools=[t.openai() for t in m.tools.values()] or None),
                    metadata={"use_case": f"agent:{run.agent}", "task_id": run.id})
        if state.get("prompt_version"):
            call.annotations[PROMPT_VERSION] = state["prompt_version"]
        async with self.model_slots:  # the gate once the call holds its slot: the call goes out right after it
            if self.store.trusts_running(run.agent) and m.budgets.cost_per_day is None:  # nothing to read: no hop
                stop = self._gate(run, state, model=True, paused=False)
            else:
                stop = await asyncio.to_thread(self._gate, run, state, model=True)
            if stop is None:
                call.started = time.perf_counter()
                result = await self.gateway.chat(call)
        if stop is not None:
            await asyncio.to_thread(self._log, run, seq, "model", "refused", rule=stop[0], detail=stop[1])
            return {"stop": {"code": "agent_stopped", "rule": stop[0], "detail": stop[1]}}
        # no flush here: the ledger spooled the row to the data dir before `chat` returned (a killed process's rows
        # are written by the next one on it), and its request id dedupes a crash's repeat; `_finish` flushes
        tokens, cost = result.usage.total_tokens, call.cost()
        msg: dict[str, Any] = {"role": "assistant", "content": result.content}
        if result.tool_calls:
            msg["tool_calls"] = result.tool_calls
        summary = result.content or ", ".join(str((c.get("function") or {}).get("name")) for c in result.tool_calls or [])
        await asyncio.to_thread(self._log, run, seq, "model", "allowed", detail=m.model, result=summary or "",
                                tokens=tokens, cost=cost)
        return {"message": msg, "tokens": tokens, "cost": cost}

    async def tool_call(self, run: Run, call: dict[str, Any], state: dict[str, Any], seq: int) -> dict[str, Any]:
        fn = call.get("function") or {}
        name, raw = str(fn.get("name") or ""), fn.get("arguments")
        out = await DBOS.run_step_async({"name": f"tool.{seq}"}, self.tool_step, run, name, raw, state, seq, False)
        if "approval" in out:
            decision = await self._wait_for_person(run, seq, name, out["args"], out["approval"])
            if decision["decision"] != "approved":
                content = f"A person rejected this call ({decision.get('reason') or 'no reason given'})."
                await DBOS.run_step_async({"name": f"tool.{seq}.rejected"}, self._rejected, run, seq, name,
                                          out["args"], decision)
                return {"content": content}
            fields = decision.get("fields") or {}
            if out["approval"]["ask"]:
                return await DBOS.run_step_async({"name": f"tool.{seq}.answer"}, self._answered, run, seq, name,
                                                 out["args"], fields)
            args = fields.get("arguments", out["args"])
            out = await DBOS.run_step_async({"name": f"tool.{seq}.approved"}, self.tool_step, run, name, args,
                                            state, seq, True)
        if out.get("allowed"):
            state["calls"][name] = state["calls"].get(name, 0) + 1
        return out

    async def tool_step(self, run: Run, name: str, raw: Any, state: dict[str, Any], seq: int,
                        approved: bool) -> dict[str, Any]:
        """Check, then (allowed) run one tool call; logged either way."""
        def checked(switch: bool | None = None) -> tuple[tuple[str, str] | None, Decision, Any]:
            stop = self._gate(run, state, model=False, paused=switch)  # the gate, then the mandate
            if stop is not None:
                return stop, Decision(False), raw
            return (None, *check_call(run.mandate, name, raw, calls_in_run=state["calls"].get(name, 0),
                                      calls_today=lambda: self.store.calls_today(run.agent, name), approved=approved,
                                      run={"cost": state["cost"], "tokens": state["tokens"], "steps": state["steps"]}))

        if self._checks_inline(run, name, raw):
            stop, decision, args = checked(False)  # a short call's check is cheaper than the thread hop
        else:
            stop, decision, args = await asyncio.to_thread(checked)
        if stop is not None:
            await asyncio.to_thread(self._log, run, seq, "tool", "refused", tool=name[:64], args=_loggable(raw),
                                    rule=stop[0], detail=stop[1])
            return {"content": f"Refused: {stop[1]}.", "stop": {"code": "agent_stopped", "rule": stop[0],
                                                                 "detail": stop[1]}}
        if not decision.allowed:
            await asyncio.to_thread(self._log, run, seq, "tool", "refused", tool=name[:64], args=_loggable(args),
                                    rule=decision.rule, detail=decision.detail)
            return {"content": f"Refused by the agent's mandate ({decision.rule}): {decision.detail}"}
        if decision.approval is not None:
            return {"approval": _approval_config(decision), "args": args}
        tool = run.mandate.tools[name]
        c = ToolCall(run_id=run.id, seq=seq, agent=run.agent, team_id=run.team_id, owner_team=run.owner_team,
                     principal=run.principal, mandate=run.mandate, tool=tool, args=args, user_id=run.user_id)
        try:
            result = as_text(await EXECUTORS[tool.kind](self.parts, c))
        except KeelError as exc:  # the tool failed (after being allowed): the model hears why
            await asyncio.to_thread(self._log, run, seq, "tool", "failed", tool=name, args=args, rule=exc.code,
                                    detail=exc.detail)
            return {"content": f"The tool failed: {exc.detail}", "allowed": True}
        await asyncio.to_thread(self._log, run, seq, "tool", "allowed", tool=name, args=args,
                                rule="approved" if approved else None, result=result)
        return {"content": result, "allowed": True}

    def _checks_inline(self, run: Run, name: str, raw: Any) -> bool:
        """Whether a tool call's check may run on the event loop: the kill switch trusted and nothing else to read
        (no per-day count), and work bounded by short arguments (no `uniqueItems`)."""
        if not self.store.trusts_running(run.agent):
            return False
        tool = run.mandate.tools.get(name)
        if tool is not None and (tool.max_calls_per_day is not None or not tool.quick_to_check):
            return False
        return raw is None or (isinstance(raw, str) and len(raw) <= INLINE_ARGS)

    async def _rejected(self, run: Run, seq: int, name: str, args: Any, decision: dict[str, Any]) -> dict[str, Any]:
        await asyncio.to_thread(self._log, run, seq, "tool", "refused", tool=name, args=args, rule="approval",
                                detail=f"rejected by {decision.get('by')}: {decision.get('reason') or ''}")
        return {}

    async def _answered(self, run: Run, seq: int, name: str, args: Any, fields: dict[str, Any]) -> dict[str, Any]:
        answer = str(fields.get("answer") or "")
        await asyncio.to_thread(self._log, run, seq, "tool", "allowed", tool=name, args=args, rule="approved",
                                result=answer)
        return {"content": answer or "(no answer)", "allowed": True}

    # -- approvals: the workflow approvals' rows, roles and audit ---------------------------------
    def _env(self, run: Run, seq: int, config: dict[str, Any], show: dict[str, Any]) -> StepEnv:
        step = StepSpec(id=f"call_{seq}", type="approval", when=None, retries=1, backoff_s=1.0,
                        timeout_s=config["timeout_s"], config=config, line=0)
        return StepEnv(parts=self.approval_parts, run_id=run.id, workflow=f"agent:{run.agent}", team_id=run.team_id,
                       principal=run.principal, spec=None, step=step, context={"call": show},  # type: ignore[arg-type]
                       owner_team=run.owner_team)

    async def _wait_for_person(self, run: Run, seq: int, name: str, args: Any,
                               config: dict[str, Any]) -> dict[str, Any]:
        """Open an approval (once), wait durably for its decision; a timeout rejects."""
        if config["ask"]:
            show = {"tool": name, "arguments": args, "rule": config["rule"]}
            config = dict(config, show={"question": "{{ call.arguments.question }}", "answer": ""},
                          editable=["answer"])
        else:
            show = {"tool": name, "arguments": args, "rule": config["rule"]}
        env = self._env(run, seq, config, show)
        opened = await DBOS.run_step_async({"name": f"tool.{seq}.open"}, self._open, env, run)
        approval_id, deadline = opened["id"], opened["deadline"]
        decision: dict[str, Any] | None = None
        while decision is None:
            now = await DBOS.run_step_async({"name": f"tool.{seq}.clock"}, time.time)
            if deadline - now <= 0:
                decision = {"decision": "rejected", "by": "system:timeout", "reason": "no decision before the deadline"}
                break
            decision = await DBOS.recv_async(topic=approval_id, timeout_seconds=min(deadline - now, RECV_CHUNK_S))
            if decision is None:
                decision = await DBOS.run_step_async({"name": f"tool.{seq}.check"}, approvals.recorded_decision,
                                                     self.approval_parts.runs, approval_id)
        closed = await DBOS.run_step_async({"name": f"tool.{seq}.close"}, self._close, env, run, approval_id, decision)
        return dict(decision, fields=closed["output"]["fields"])

    async def _open(self, env: StepEnv, run: Run) -> dict[str, Any]:
        out = await approvals.open_approval(env)
        await asyncio.to_thread(self.store.set_status, run.id, "waiting_approval")
        return out

    async def _close(self, env: StepEnv, run: Run, approval_id: str, decision: dict[str, Any]) -> dict[str, Any]:
        out = await approvals.close_approval(env, approval_id, decision)
        await asyncio.to_thread(self.store.set_status, run.id, "running")
        return out


class AgentProviderUnavailable(waits.ProviderUnavailable):
    """A model call's provider stayed unavailable past what the run may wait (its wall time, or
    `DEFAULT_MAX_WAIT_S`)."""

    code = "agent_provider_unavailable"


def _approval_config(d: Decision) -> dict[str, Any]:
    a = d.approval
    assert a is not None
    return {"approvers": list(a.approvers), "show": SHOW, "editable": ["arguments"], "instructions":
            f"The agent asks to make this call; the mandate's {d.approval_rule} needs a person's approval.",
            "timeout_s": a.timeout_s, "on_timeout": "reject", "escalate_to": [], "escalation_timeout_s": a.timeout_s,
            "rule": d.approval_rule, "ask": a.tool == "ask_human" and d.approval_rule == "ask_human"}


def _loggable(args: Any) -> Any:
    if isinstance(args, (dict, list)) or args is None:
        return args
    return str(args)[:2000]
