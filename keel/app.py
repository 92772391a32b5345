"""The ASGI app factory: open the store, build each capability's services, mount their routes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from fastapi import FastAPI, Request

from keel import __version__
from keel.core import apidocs
from keel.core import routes as core_routes
from keel.core.db import Store
from keel.core.http import RequestContext, install_error_handlers
from keel.core.notify import ChangeFeed
from keel.core.outbound import Outbound
from keel.core.datadir import prepare_data_dir
from keel.core.settings import Settings
from keel.gateway import routes as gateway_routes
from keel.gateway import service as gateway_service
from keel.gateway.ingress import completions as completions_ingress
from keel.gateway.ingress import responses as responses_ingress
from keel.gateway.ingress import messages as messages_ingress
from keel.gateway.ingress import moderations as moderations_ingress
from keel.gateway.ingress import rerank as rerank_ingress
from keel.governance.stages import PolicyGuards
from keel.governance import service as governance_service
from keel.knowledge import routes as knowledge_routes
from keel.knowledge import service as knowledge_service
from keel.governance import tables as governance_tables
from keel.knowledge import tables as knowledge_tables
from keel.observe import routes as observe_routes
from keel.observe import service as observe_service
from keel.observe import drift_routes, evals_routes, prompts_routes
from keel.observe.drift_watch import DriftWatch
from keel.observe.evals import EvalParts, Evals
from keel.observe.prompts import Prompts
from keel.observe.spans import TraceRequests, TracedAuthenticator
from keel.workflows import service as workflows_service
from keel.workflows import tables as workflow_tables
from keel.agents import service as agents_service
from keel.agents import mcp_server as agents_mcp_server
from keel.console import routes as console_routes
from keel.identity import routes as identity_routes
from keel.identity import service as identity
from keel.identity.auth import Authenticator, principal
from keel.identity.vault import Vault, load_master_key
from keel.identity import keycheck

log = logging.getLogger("keel.app")

Hook = Callable[[], Awaitable[None]]


@dataclass
class Lifecycle:
    """Background work each capability starts with the server and drains on graceful shutdown."""

    startup: list[Hook] = field(default_factory=list)
    shutdown: list[Hook] = field(default_factory=list)


PROBLEM = {
    "type": "object", "title": "Problem", "required": ["type", "title", "status", "detail", "code"],
    "description": "RFC 9457 problem details: a stable `code`, what was wrong, how to fix it, the ids involved",
    "properties": {"type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
                   "detail": {"type": "string"}, "code": {"type": "string"}, "fix": {"type": "string"},
                   "request_id": {"type": "string"},
                   "error": {"type": "object", "properties": {"message": {"type": "string"}}}},
}


class KeelAPI(FastAPI):
    """The framework app, whose OpenAPI document also states how to authenticate and how errors look. The
    framework's own public /openapi.json, /docs and /redoc are off: `keel.core.apidocs` serves them behind a key."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs, openapi_url=None, docs_url=None, redoc_url=None)

    def openapi(self) -> dict[str, Any]:
        schema = super().openapi()
        if "bearerAuth" not in schema.get("components", {}).get("securitySchemes", {}):
            describe_auth_and_problems(schema)
        return schema


def describe_auth_and_problems(schema: dict[str, Any]) -> None:
    """Every operation needs a bearer key unless its route says `security: []`; every error is a problem body
    (the framework's own 422 shape is never sent)."""
    components = schema.setdefault("components", {})
    components.setdefault("securitySchemes", {})["bearerAuth"] = {
        "type": "http", "scheme": "bearer", "description": "a Keel API key: `Authorization: Bearer sk-keel-…`"}
    schema["security"] = [{"bearerAuth": []}]
    schemas = components.setdefault("schemas", {})
    schemas["Problem"] = PROBLEM
    problem = {"content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            if "422" in responses:
                responses["422"] = {"description": "Validation failed", **problem}
            responses.setdefault("default", {"description": "Error", **problem})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)


async def docs_caller(request: Request, key: str | None) -> Any:
    """The API reference's caller: the key `request` sends in its headers, or (key given) that key."""
    if key is None:
        return await principal(request)
    authenticator: Authenticator = request.app.state.authenticator
    return await authenticator.authenticate(key)


@dataclass
class Built:
    app: FastAPI  # the framework app (state, routes, OpenAPI)
    asgi: RequestContext | TraceRequests  # what the server runs: the server span if traced, request ids, body
    # limit, hot endpoints, then `app`
    bootstrap_key: str | None


def create_app(settings: Settings, *, store: Store | None = None) -> Built:
    """Build the app. Migrations run here, before any port is bound."""
    prepare_data_dir(settings.data_dir)
    store = store or Store.open(settings.resolved_database_url(),
                                statement_timeout_s=settings.database_statement_timeout_s)
    store.upgrade()
    master = load_master_key(settings.master_key.get_secret_value() if settings.master_key else None,
                             settings.data_dir)
    vault = Vault(store, master)
    keycheck.verify(store, vault.fingerprint)  # every replica holds one master key, or this one stops here
    vault.prime_redactor()
    with store.first_start_lock():  # replicas starting together on a fresh store make one admin key
        bootstrap_key = identity.bootstrap(
            store, settings.bootstrap_admin_key.get_secret_value() if settings.bootstrap_admin_key else None)
    lifecycle = Lifecycle()

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        for hook in lifecycle.startup:
            await hook()
        try:
            yield
        finally:
            for hook in reversed(lifecycle.shutdown):
                try:
                    await hook()
                except Exception:  # one failing drain must not stop the others
                    log.exception("shutdown hook failed")
            store.dispose()

    app = KeelAPI(title="Keel", version=__version__, lifespan=lifespan,
                  description="A self-hosted AI operating layer: governed, observed, costed.")
    app.state.settings = settings
    app.state.store = store
    app.state.vault = vault
    app.state.lifecycle = lifecycle
    app.state.authenticator = Authenticator(store, settings.auth_cache_ttl_s)
    lifecycle.shutdown.append(app.state.authenticator.close)
    changes = app.state.changes = ChangeFeed(store)  # what other replicas publish: caches refreshed at once
    changes.subscribe("keys", app.state.authenticator.invalidate)
    app.state.audit = None
    app.state.hot_routes = {}  # (method, path) → endpoint served ahead of the framework router

    install_error_handlers(app, authenticate=principal)
    app.include_router(core_routes.router)
    app.include_router(apidocs.router(docs_caller))
    app.include_router(identity_routes.router)
    _mount_capabilities(app, settings, store)
    app.include_router(console_routes.router())  # the web console at /console, over the capabilities' services
    asgi = RequestContext(app, max_body_bytes=settings.max_body_bytes, log_requests=settings.log_requests,
                          hot=app.state.hot_routes)
    if app.state.observe.tracing.enabled:  # outermost: the server span covers everything, hot endpoints too
        asgi = TraceRequests(asgi, app.state.observe.tracer, app.state.observe.tracing.stages)  # type: ignore[assignment]
    return Built(app=app, asgi=asgi, bootstrap_key=bootstrap_key)


def _eval_parts(gateway: Any, kn: Any) -> EvalParts:
    """What an eval run calls, as the principal who started it: knowledge search, a gateway chat, embeddings."""
    from keel.core.ids import new_id
    from keel.gateway.pipeline import PROMPT_VERSION, Call
    from keel.gateway.protocol import ChatRequest
    from keel.knowledge.search import Query, search

    async def find(p: Any, text: str, collections: list[str], top_k: int, mode: str, rerank: str | None) -> list:
        hits, _ = await search(kn, p, Query(text=text, collections=collections, top_k=top_k, mode=mode,
                                            rerank=rerank), new_id("req"))
        return [h.public() for h in hits]

    async def chat(p: Any, model: str, messages: list, prompt: str | None, task_id: str) -> str:
        call = Call(request_id=new_id("req"), principal=p, kind="chat", alias=model,
                    chat=ChatRequest(model=model, messages=messages, max_tokens=512, temperature=0.0),
                    metadata={"use_case": "eval", "task_id": task_id})
        if prompt is not None:
            call.annotations[PROMPT_VERSION] = prompt
        return (await gateway.chat(call)).content or ""

    async def embed(p: Any, model: str, texts: list[str]) -> list:
        return (await kn.embed(p, model, texts, task_id="eval", use_case="eval")).tolist()

    return EvalParts(search=find, chat=chat, embed=embed)


def _mount_capabilities(app: FastAPI, settings: Settings, store: Store) -> None:
    """Capabilities above identity: observe, then governance's stages wrapped into the gateway."""
    lifecycle: Lifecycle = app.state.lifecycle
    obs = observe_service.build(settings, store)
    app.state.observe = obs
    lifecycle.startup.append(obs.start)
    lifecycle.shutdown.append(obs.stop)  # runs last: after the gateway drained its streams
    if obs.tracing.enabled:  # each key check an `auth` span
        app.state.authenticator = TracedAuthenticator(app.state.authenticator)
    app.include_router(observe_routes.router)
    app.state.prompts = Prompts(store)  # the prompt registry: callers, workflows and agents resolve through it
    app.include_router(prompts_routes.router)

    outbound = Outbound.from_settings(settings)  # one outbound HTTP stack: providers, budget alerts, review webhooks
    deployments = gateway_service.deployments(settings, store, app.state.vault, outbound)
    app.state.changes.subscribe("deployments", deployments.reload)
    lifecycle.startup.append(app.state.changes.start)
    lifecycle.shutdown.append(app.state.changes.stop)
    gov = governance_service.build(settings, store, deployments, outbound=outbound)  # a bad policy file fails here
    gateway = gateway_service.build(settings, store, deployments, obs, stages=gov.stages, allow=gov.allow,
                                    outbound=outbound)
    app.state.gateway = gateway
    gov.attach(app)  # audit hook, governance routes, policy reload and retention tasks
    drift = DriftWatch(obs.drift, settings.drift_interval_s, webhook_url=settings.drift_webhook_url,
                       outbound=outbound, audit=app.state.audit)  # alerts: the audit log and the webhook
    app.state.drift = drift
    lifecycle.startup.append(drift.start)
    lifecycle.shutdown.append(drift.stop)
    app.include_router(drift_routes.router)
    app.state.hot_routes.update(gateway_routes.hot_routes())
    app.state.hot_routes.update(messages_ingress.hot_routes())  # /v1/messages: Anthropic-shaped errors
    lifecycle.startup.append(gateway.start)  # deployments' watcher, then the stages' background work

    kn = knowledge_service.build(settings, store, gateway, on_retrieval=obs.drift.observe_retrieval)
    app.state.knowledge = kn
    lifecycle.startup.append(kn.start)
    app.include_router(knowledge_routes.router)
    # Shutdown hooks run in reverse order, all before the store closes: workflows and ingestion drain, then
    # the gateway's stages write what they hold (budgets' spend and alerts) and providers close, then
    # governance and the ledger flush.
    lifecycle.shutdown.append(gateway.stop)
    lifecycle.shutdown.append(kn.stop)
    workflows_service.attach(app, settings, store, gateway, kn)  # after knowledge: its runs use retrieval
    agents_service.attach(app, settings, store, gateway, kn)  # after workflows: shares its DBOS and approvals
    app.state.evals = Evals(store, _eval_parts(gateway, kn))  # eval runs search and answer on the governed paths
    app.include_router(evals_routes.router)
    agents_mcp_server.mount(app)  # /mcp: search, answer, workflows and agents for MCP clients, as the caller
    observe_service.watch(obs, settings, store, getattr(gateway.router, "snapshot", None), queues={
        # /metrics' queue depths: each queue's table and its unfinished statuses
        "ingest_jobs": (knowledge_tables.jobs, ("queued", "running")),
        "workflow_runs": (workflow_tables.workflow_runs, ("running", "waiting_approval", "waiting_provider")),
        "approvals": (workflow_tables.workflow_approvals, ("pending",)),
        "reviews": (governance_tables.reviews, ("pending",)),
    })
    if settings.preload_models:
        async def _preload() -> None:
            app.state.preload_task = asyncio.create_task(gateway_service.preload(gateway))
        lifecycle.startup.append(_preload)
    app.include_router(gateway_routes.router)
    responses_ingress.mount(app, store)  # /v1/responses and its stored responses
    completions_ingress.mount(app)  # /v1/completions
    app.include_router(messages_ingress.router)
    rerank_ingress.mount(app)  # /v1/rerank on reranker deployments
    moderation_guards = PolicyGuards()  # /v1/moderations: the current policy's guards, no model call
    moderations_ingress.mount(app, lambda: moderation_guards.for_engine(gov.policy.engine))
