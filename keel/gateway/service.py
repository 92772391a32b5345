"""Build the gateway the app factory wires in: deployments, providers, the governed path."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

from keel.core.db import Store
from keel.core.settings import DeploymentConfig, Settings
from keel.gateway.budgets import Budgets
from keel.gateway.cache import CacheStage
from keel.gateway.deployments import Deployments
from keel.gateway.limits import RateLimiter
from keel.gateway.pipeline import Call, Gateway, Stage
from keel.gateway.protocol import ProviderContext
from keel.gateway.router import Router
from keel.identity.vault import Vault
from keel.observe.service import Observe

log = logging.getLogger("keel.gateway")


def build(settings: Settings, store: Store, vault: Vault, observe: Observe,
          stages: list[Stage] | None = None, allow: Callable[[Call, DeploymentConfig], bool] | None = None,
          ) -> Gateway:
    """`stages` come from capabilities above the gateway (policy, guards); the gateway adds its own.
    `allow(call, deployment)` lets governance keep a call (fallbacks included) off forbidden deployments."""
    # llama.cpp's worker threads spin at barriers: on a busy machine more threads than free cores makes
    # decoding dozens of times slower (measured here: 1.9 s vs 89 s for 32 tokens on 2 loaded cores).
    # Default to half the cores, leaving the rest to the event loop and embeddings.
    threads = settings.local_threads or max(1, (os.cpu_count() or 2) // 2)
    ctx = ProviderContext(get_secret=vault.get, data_dir=str(settings.data_dir), threads=threads)
    deployments = Deployments(store, settings, ctx)
    gateway = Gateway(deployments, observe.ledger, observe.tracer)
    gateway.stages = admission_stages(gateway, settings, store) + list(stages or []) + spend_stages(
        gateway, settings, store)
    router = Router(gateway, settings, allow=allow)
    gateway.router = router  # type: ignore[attr-defined]
    gateway.call_deployment = router.call
    return gateway


def admission_stages(gateway: Gateway, settings: Settings, store: Store) -> list[Stage]:
    """Stages that run before policy and guards: rate limits (keys and teams here; each deployment's own
    `rpm`/`tpm` guard every `Gateway.invoke`, the one call the router makes per attempt)."""
    limiter = RateLimiter(store, settings, gateway)
    gateway.invoke = limiter.wrap_invoke(gateway.invoke)  # type: ignore[method-assign]
    return [limiter]


def spend_stages(gateway: Gateway, settings: Settings, store: Store) -> list[Stage]:
    """Stages that run after policy and guards, just before the router: budgets, then the cache."""
    return [Budgets(store, settings, gateway), CacheStage(gateway, settings, store)]


async def preload(gateway: Gateway) -> None:
    """Load local models in the background so the first request does not wait for them."""
    for cfg in gateway.deployments.all().values():
        if cfg.provider in ("local", "local_embed"):
            prov = gateway.deployments.provider(cfg)
            load = getattr(prov, "load", None)
            if load is not None:
                try:
                    await asyncio.to_thread(load)
                    log.info("model loaded", extra={"deployment": cfg.deployment_id()})
                except Exception:  # a broken model file must not stop the server; requests will report it
                    log.exception("model preload failed", extra={"deployment": cfg.deployment_id()})
