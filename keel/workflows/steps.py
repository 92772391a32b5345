"""What each step type does. Every executor here runs inside one DBOS step, so its result is
checkpointed once it returns: a step with a side effect (`http`, `notify`, `record`) is never
repeated after that, and sends an idempotency key (run id + step id) so the target can drop the
one repeat that a crash between the call and the checkpoint may cause.

Approval, wait and sub-workflow steps need several durable operations and live in `runtime.py`
(approvals' own in `approvals.py`).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import jsonschema
import sqlalchemy as sa

from keel.core.clock import utcnow
from keel.core.errors import BadRequest, KeelError
from keel.core.ids import new_id
from keel.gateway.pipeline import PROMPT_VERSION, Call
from keel.gateway.protocol import ChatRequest
from keel.identity.principal import Principal
from keel.observe.prompts import Prompts, Rendered
from keel.workflows import templates
from keel.workflows.effects import Egress, Mailer
from keel.workflows.spec import StepSpec, WorkflowSpec
from keel.workflows.store import RunStore
from keel.workflows.tables import workflow_outbox, workflow_records


class StepFailed(KeelError):
    """A step could not do its work (bad model output, a rejected request); the run fails with this."""

    code, status, title = "workflow_step_failed", 422, "Workflow step failed"


@dataclass(frozen=True)
class StepParts:
    """The services steps use, built once by the engine."""

    runs: RunStore
    gateway: Any  # keel.gateway's service: `chat(call)` on the governed path
    knowledge: Any  # keel.knowledge's service, for retrieve and answer steps
    vault: Any  # keel.identity.vault.Vault: `resolve(name, team, use)`
    egress: Egress
    mailer: Mailer
    # Model steps of many runs queue here, not inside the deployment, so waiting for a turn on a
    # single local model never counts against its timeout or trips its circuit breaker.
    model_slots: asyncio.Semaphore
    flush_ledger: Callable[[], Awaitable[None]]


@dataclass
class StepEnv:
    """Everything one step execution may read: the engine's parts, the run and the template context."""

    parts: StepParts
    run_id: str
    workflow: str
    team_id: str | None  # the run's team (its records, mail and approvals belong to it)
    principal: Principal
    spec: WorkflowSpec
    step: StepSpec
    context: dict[str, Any]
    owner_team: str | None = None  # the workflow version's team (None: global): whose secrets it may use
    attempt: int = 0  # tries after a provider wait (`waits.py`) before this one

    @property
    def request_id(self) -> str:
        """The ledger's id for this try's model call: the same when a crash re-runs the try (so it is never
        metered twice), another after a wait (the failed try's row holds the first)."""
        base = f"{self.run_id}/{self.step.id}"
        return f"{base}~{self.attempt}" if self.attempt else base

    def render(self, value: Any) -> Any:
        return templates.render(value, self.context)

    @property
    def idempotency_key(self) -> str:
        return f"{self.run_id}.{self.step.id}"


Executor = Callable[[StepEnv], Awaitable[dict[str, Any]]]


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


async def _registry_prompt(env: StepEnv) -> Rendered:
    """The step's registry prompt (`prompt: {ref, variables}`), as the run's principal may read it."""
    c = env.step.config
    variables = {k: _text(env.render(v)) for k, v in (c.get("prompt_variables") or {}).items()}
    return await asyncio.to_thread(Prompts(env.parts.runs.store).resolve, env.principal, c["prompt_ref"], variables)


async def run_llm(env: StepEnv) -> dict[str, Any]:
    """A chat call through the governed gateway path, metered against the run (task id = run id)."""
    c = env.step.config
    messages = []
    if c.get("system"):
        messages.append({"role": "system", "content": _text(env.render(c["system"]))})
    prompt = await _registry_prompt(env) if c.get("prompt_ref") else None
    if prompt is not None:
        messages = prompt.messages
    else:
        messages.append({"role": "user", "content": _text(env.render(c["prompt"]))})
    schema = c.get("output_schema")
    fmt = {"type": "json_schema", "json_schema": {"name": env.step.id, "schema": schema}} if schema else None
    call = Call(request_id=env.request_id, principal=env.principal, kind="chat", alias=c["model"],
                chat=ChatRequest(model=c["model"], messages=messages, max_tokens=c["max_tokens"],
                                 temperature=c["temperature"], response_format=fmt),
                metadata={"use_case": f"workflow:{env.workflow}", "task_id": env.run_id})
    if prompt is not None:
        call.annotations[PROMPT_VERSION] = prompt.ref
    async with env.parts.model_slots:
        call.started = time.perf_counter()
        result = await env.parts.gateway.chat(call)
    # The ledger row must be durable before this step's checkpoint: a crash in between re-runs the
    # step under the same request id, which the ledger's primary key then refuses to count twice.
    await env.parts.flush_ledger()
    out: dict[str, Any] = {"text": result.content or "", "model": c["model"], "finish_reason": result.finish_reason,
                           "usage": {"prompt_tokens": result.usage.prompt_tokens,
                                     "completion_tokens": result.usage.completion_tokens},
                           "cost": call.cost()}
    if schema:
        try:
            out["json"] = json.loads(out["text"])
            jsonschema.validate(out["json"], schema)
        except (ValueError, jsonschema.ValidationError) as exc:
            msg = exc.message if isinstance(exc, jsonschema.ValidationError) else str(exc)
            raise StepFailed(f"step {env.step.id!r}: the model's output does not match output_schema: {msg}",
                             fix="loosen output_schema, raise max_tokens, or use a stronger model",
                             step=env.step.id) from None
    return out


async def run_retrieve(env: StepEnv) -> dict[str, Any]:
    """A permission-filtered collection search as the run's principal."""
    from keel.knowledge.search import Query, search

    c = env.step.config
    q = Query(text=_text(env.render(c["query"])), collections=list(c["collections"]), top_k=c["top_k"])
    hits, _ = await search(env.parts.knowledge, env.principal, q, f"{env.run_id}/{env.step.id}")
    return {"hits": [{"document_id": h.document_id, "title": h.title, "section": h.section, "source": h.source,
                      "text": h.text, "score": round(h.score, 6)} for h in hits],
            "text": "\n\n".join(h.text for h in hits)}


async def run_answer(env: StepEnv) -> dict[str, Any]:
    """An answer with citations over collections, through the same path as `/v1/answer`."""
    from keel.knowledge.answer import AnswerRequest, answer

    c = env.step.config
    req = AnswerRequest(question=_text(env.render(c["question"])), collections=list(c["collections"]),
                        model=c["model"], max_tokens=c["max_tokens"])
    async with env.parts.model_slots:
        out = await answer(env.parts.knowledge, env.principal, req, env.request_id)
    await env.parts.flush_ledger()
    return {"text": out["answer"], "found": out["found"], "citations": out["citations"], "usage": out["usage"]}


async def run_http(env: StepEnv) -> dict[str, Any]:
    """An outbound HTTP call through the SSRF-safe egress; secrets come from the vault by reference."""
    c = env.step.config
    secrets = _SecretView(env)
    header_ctx = dict(env.context, secrets=secrets)
    headers = {str(k): _text(templates.render(v, header_ctx)) for k, v in (c.get("headers") or {}).items()}
    body = env.render(c.get("body")) if c.get("body") is not None else None
    return await env.parts.egress.request(
        c["method"], _text(env.render(c["url"])), headers=headers, body=body, allow_hosts=env.spec.allow_hosts,
        idempotency_key=env.idempotency_key, timeout_s=env.step.timeout_s, expect_status=c.get("expect_status"))


class _SecretView:
    """`{{ secrets.NAME }}` in http headers: read from the vault when rendered, never stored in outputs, and
    only a secret the workflow's owner may use as a header (checked again on every run: a revoked grant
    fails the step with `secret_not_allowed` before anything is sent)."""

    def __init__(self, env: StepEnv) -> None:
        self._env = env

    def __getattr__(self, name: str) -> str:
        return self._env.parts.vault.resolve(name, self._env.owner_team, "http_header")

    __getitem__ = __getattr__


async def run_transform(env: StepEnv) -> dict[str, Any]:
    """Sandboxed templates shaping data; no code runs."""
    return {"value": env.render(env.step.config["output"])}


async def run_condition(env: StepEnv) -> dict[str, Any]:
    """Evaluate `if` and say which step runs next (None: the following one)."""
    c = env.step.config
    value = templates.truthy(env.render(c["if"]))
    return {"value": value, "next": c.get("then") if value else c.get("else")}


async def run_notify(env: StepEnv) -> dict[str, Any]:
    """A webhook POST and/or an email (SMTP when configured, else Keel's outbox)."""
    c = env.step.config
    subject = _text(env.render(c.get("subject") or ""))
    body = env.render(c.get("body")) if c.get("body") is not None else {}
    out: dict[str, Any] = {}
    url = _text(env.render(c["webhook"])).strip() if c.get("webhook") else ""
    if url:
        payload = {"workflow": env.workflow, "run_id": env.run_id, "step": env.step.id, "subject": subject,
                   "body": body}
        out["webhook"] = await env.parts.egress.webhook(url, payload, allow_hosts=env.spec.allow_hosts,
                                                         idempotency_key=env.idempotency_key,
                                                         timeout_s=env.step.timeout_s)
    to = _text(env.render(c["email"])).strip() if c.get("email") else ""
    if to:
        out["email"] = await send_email(env, to, subject, _text(body))
    if not out:
        out["skipped"] = "no webhook or email address after rendering"
    return out


async def send_email(env: StepEnv, to: str, subject: str, body: str) -> dict[str, Any]:
    mailer = env.parts.mailer
    key = f"{env.idempotency_key}.email"
    if mailer.configured:
        return await mailer.send(to, subject, body, idempotency_key=key)
    if "\n" in to or "\r" in to or "@" not in to:
        raise BadRequest(f"step {env.step.id!r}: {to!r} is not an email address", fix="render one address")
    row = {"id": new_id("mail"), "idempotency_key": key, "run_id": env.run_id, "step_id": env.step.id,
           "team_id": env.team_id, "to": to[:320], "subject": subject, "body": body, "created_at": utcnow()}
    await env.parts.runs.insert_once(workflow_outbox, row, workflow_outbox.c.idempotency_key == key)
    return {"to": to, "status": "outbox", "message_id": f"<{key}@keel>"}


async def run_record(env: StepEnv) -> dict[str, Any]:
    """Write a row into one of Keel's record tables (e.g. the lead-intake CRM); one per run and step."""
    c = env.step.config
    data = env.render(c["data"])
    key = _text(env.render(c["key"])) if c.get("key") else None
    row = {"id": new_id("rec"), "table_name": c["table"], "key": key, "data": data, "team_id": env.team_id,
           "run_id": env.run_id, "step_id": env.step.id, "created_at": utcnow()}
    rec_id = await env.parts.runs.insert_once(workflow_records, row, sa.and_(workflow_records.c.run_id == env.run_id,
                                                                         workflow_records.c.step_id == env.step.id))
    return {"id": rec_id, "table": c["table"], "key": key, "data": data}


EXECUTORS: dict[str, Executor] = {
    "llm": run_llm, "retrieve": run_retrieve, "answer": run_answer, "http": run_http,
    "transform": run_transform, "condition": run_condition, "notify": run_notify, "record": run_record,
}
