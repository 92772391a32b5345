"""Build the gateway the app factory wires in: deployments, providers, the governed path."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

from keel.core.db import Store
from keel.core.outbound import Outbound
from keel.core.settings import DeploymentConfig, Settings
from keel.gateway.budgets import Budgets
from keel.gateway.cache import CacheStage
from keel.gateway.deployments import Deployments
from keel.gateway.limits import DeploymentLimits, RateLimiter
from keel.gateway.pipeline import Call, Gateway, Providers, Stage
from keel.gateway.protocol import EmbedResult, ProviderContext
from keel.gateway.router import Router
from keel.identity.vault import Vault
from keel.observe.service import Observe
from keel.observe.spans import TracedUpstream

log = logging.getLogger("keel.gateway")


def deployments(settings: Settings, store: Store, vault: Vault, outbound: Outbound | None = None) -> Deployments:
    """The deployments behind the model aliases (keel.yaml and the admin API), with their providers'
    credentials from the vault and `outbound`, the process's one outbound HTTP stack (by default made from
    `settings`); governance reads them too, so the app factory makes them first."""
    # llama.cpp's worker threads spin at barriers: on a busy machine more threads than free cores makes
    # decoding many times slower (the figures are in bench/README.md).
    # Default to half the cores, leaving the rest to the event loop and embeddings.
    threads = settings.local_threads or max(1, (os.cpu_count() or 2) // 2)
    ctx = ProviderContext(get_secret=vault.get, data_dir=str(settings.data_dir), threads=threads,
                          outbound=outbound or Outbound.from_settings(settings),
                          get_header_secret=lambda name: vault.resolve(name, None, "http_header"))
    return Deployments(store, settings, ctx)


def build(settings: Settings, store: Store, deployments: Deployments, observe: Observe,
          stages: list[Stage] | None = None, allow: Callable[[Call, DeploymentConfig], bool] | None = None,
          outbound: Outbound | None = None) -> Gateway:
    """The gateway, built from its parts: rate limits first, then `stages` from the capabilities above
    the gateway (policy, guards), then budgets and the cache; the router is the terminal step, and every
    attempt it makes goes through the deployments' own rate limits. `allow(call, deployment)` lets
    governance keep a call (fallbacks included) off forbidden deployments. Budget alerts go out through
    `outbound` (by default the deployments' providers' stack)."""
    limiter = RateLimiter(store, settings, deployments)
    upstream = DeploymentLimits(Providers(deployments), limiter)
    if observe.tracing.enabled:  # each attempt the router makes a client span with the GenAI attributes
        upstream = TracedUpstream(upstream)  # type: ignore[assignment]
    router = Router(upstream, settings, allow=allow)

    async def embed(call: Call) -> EmbedResult:
        return await gateway.embed(call)  # the cache embeds through the gateway it sits in

    budgets = Budgets(store, settings, deployments, outbound or deployments.ctx.outbound)
    gateway = Gateway(deployments, observe.ledger, observe.tracer, router=router, stages=[
        limiter, *(stages or ()), budgets, CacheStage(settings, store, embed)])
    return gateway


async def preload(gateway: Gateway) -> None:
    """Load local models in the background so the first request does not wait for them."""
    for cfg in gateway.deployments.all().values():
        if cfg.provider in ("local", "local_embed", "local_rerank"):
            prov = gateway.deployments.provider(cfg)
            load = getattr(prov, "load", None)
            if load is not None:
                try:
                    await asyncio.to_thread(load)
                    log.info("model loaded", extra={"deployment": cfg.deployment_id()})
                except Exception:  # a broken model file must not stop the server; requests will report it
                    log.exception("model preload failed", extra={"deployment": cfg.deployment_id()})
