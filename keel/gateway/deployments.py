"""Which deployments serve which alias, and the long-lived provider instance for each.

Deployments come from `keel.yaml` (read-only at run time), the embedded defaults, and the
admin API (stored, so every replica sees them; replicas re-read the table every few seconds in the
background — a request never waits on that read — and keep the same objects while nothing changed).
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import threading
import time
from dataclasses import replace
from typing import Any

import sqlalchemy as sa
from pydantic import ValidationError

from keel.core.clock import utcnow
from keel.core.db import Store
from keel.core.errors import BadRequest, ConfigError, Conflict, NotFound, ValidationFailed
from keel.core.notify import publish
from keel.core.outbound import TLS_OPTIONS, Outbound
from keel.core.settings import DeploymentConfig, Settings
from keel.core.tasks import stop_task
from keel.gateway import registry
from keel.gateway.protocol import Provider, ProviderContext
from keel.gateway.tables import deployments as deployments_table

log = logging.getLogger("keel.gateway.deployments")

EMBEDDED = [
    DeploymentConfig(alias="local-chat", provider="local", model="SmolLM2-135M-Instruct", id="local-chat/local",
                     context_window=8192),
    DeploymentConfig(alias="local-embed", provider="local_embed", model="all-MiniLM-L6-v2", kind="embedding",
                     id="local-embed/local", context_window=256),
]


OPTIONS_DEPTH = 16  # far past any provider's options, far under what an answer can carry


def _depth(value: Any) -> int:
    """How deeply JSON objects and arrays nest in `value` (0 for a scalar), without recursion."""
    level, layer = 0, [value]
    while containers := [item for item in layer if isinstance(item, (dict, list))]:
        level += 1
        layer = [v for item in containers for v in (item.values() if isinstance(item, dict) else item)]
    return level


def tls_problem(options: dict[str, Any], outbound: Outbound, where: str) -> tuple[str, str, str] | None:
    """What is wrong with a deployment's own TLS files (`ca_bundle`, `client_cert`, `client_key` options, on
    top of the install-wide `outbound`), as (option, detail, fix); None when they load. Checked when the
    deployment is defined, so a mistake is reported to whoever made it, not to every later call."""
    given = {k: options[k] for k in TLS_OPTIONS if options.get(k) is not None}
    for key, value in given.items():
        if not isinstance(value, str) or not value.strip():
            return key, f"options.{key}: must be the path of a PEM file", f"set options.{key} to a PEM file's path"
        if not os.path.isfile(value):  # a folder, a device or a FIFO is refused here, never read
            return key, (f"options.{key}: {value} does not exist or is not a file"), (
                f"put the PEM file at {value} on every Keel server, or correct options.{key}")
        if not os.access(value, os.R_OK):
            return key, f"options.{key}: {value} cannot be read by Keel", f"let Keel's user read {value}"
    if "client_key" in given and "client_cert" not in given and not outbound.client_cert:
        return "client_key", f"options.client_key: {given['client_key']} is a key without a client certificate", (
            "set options.client_cert (or outbound_client_cert) too, or remove options.client_key")
    if "ca_bundle" in given:
        try:
            ssl.create_default_context(cafile=given["ca_bundle"])
        except (OSError, ssl.SSLError) as exc:
            return "ca_bundle", f"options.ca_bundle: {given['ca_bundle']} is not a PEM CA bundle ({exc})", (
                "point options.ca_bundle at a PEM file of the CA certificates to trust")
    if "client_cert" in given or "client_key" in given:
        key = "client_cert" if "client_cert" in given else "client_key"
        try:
            replace(outbound, **given).ssl_context(where)
        except ConfigError as exc:
            return key, f"options.{key}: {exc.detail}", (
                "point options.client_cert at the PEM certificate and options.client_key at its own key "
                "(or leave the key out when it is inside the certificate file)")
    return None


def options_problem(cfg: DeploymentConfig) -> ConfigError | None:
    """What its provider's own `check_options(config)` classmethod finds wrong with `cfg` (a bad `auth`, a missing
    tokenizer or model file, …) as a ConfigError whose `field` names it; None when it passes or the provider
    (a plugin) declares no check. Like `tls_problem`, run when the deployment is defined."""
    check = getattr(registry.get(cfg.provider), "check_options", None)
    if check is None:
        return None
    try:
        check(cfg)
    except ConfigError as exc:
        return exc
    return None


def public(cfg: DeploymentConfig, source: str) -> dict[str, Any]:
    """A deployment as the admin API shows it (credential by name only, never a value)."""
    data = cfg.model_dump(exclude={"options"})
    data["id"] = cfg.deployment_id()
    data["source"] = source
    return data


class Deployments:
    """Alias → deployments, plus one provider instance per deployment id."""

    RELOAD_EVERY_S = 5.0

    def __init__(self, store: Store, settings: Settings, ctx: ProviderContext) -> None:
        self.store = store
        self.ctx = ctx
        static = list(EMBEDDED) if settings.embedded_models else []
        static += list(settings.models)
        self._static = {c.deployment_id(): c for c in static}
        self._dynamic: dict[str, DeploymentConfig] = {}
        self._raw: dict[str, Any] = {}
        self._providers: dict[str, tuple[DeploymentConfig, Provider]] = {}
        self._by_alias: dict[str, list[DeploymentConfig]] = {}
        self.version = 0  # bumped whenever the stored deployments change: caches of resolutions key on it
        self._loaded_at = 0.0
        self._watcher: asyncio.Task[None] | None = None
        self._applying = threading.Lock()  # admin changes apply from worker threads, the watcher on the loop
        self._reads = self._applied = 0  # reads numbered as they begin: one that began earlier never wins
        for cfg in static:
            registry.get(cfg.provider)  # unknown provider names fail at start, and so do unusable TLS files
            where = f"deployment {cfg.deployment_id()}"
            if problem := tls_problem(cfg.options, ctx.outbound, where):
                option, detail, fix = problem
                raise ConfigError(f"{where} in keel.yaml: {detail}", fix=fix, deployment=cfg.deployment_id(),
                                  option=option)
            if exc := options_problem(cfg):
                raise ConfigError(f"{where} in keel.yaml: {exc.detail}", fix=exc.fix, deployment=cfg.deployment_id(),
                                  option=exc.ids.get("field"))
        self.reload()

    # -- reading ------------------------------------------------------------------------
    def reload(self) -> None:
        self._apply(*self._read())

    def _read(self) -> tuple[int, dict[str, Any]]:
        with self._applying:
            self._reads += 1
            seq = self._reads
        with self.store.engine.connect() as conn:
            return seq, {r.id: r.config
                         for r in conn.execute(sa.select(deployments_table.c.id, deployments_table.c.config))}

    def _apply(self, seq: int, raw: dict[str, Any]) -> None:
        with self._applying:
            if seq < self._applied:
                return  # a read that began before the one applied already: older news
            self._applied = seq
            if raw != self._raw:
                dynamic = {did: DeploymentConfig(**config) for did, config in raw.items()}
                # Replaced, never changed in place: a reader holding the old dicts sees a consistent old state.
                self._dynamic, self._by_alias, self._raw = dynamic, {}, raw
                self.version += 1
            self._loaded_at = time.monotonic()

    def maybe_reload(self) -> None:
        """Keep the stored deployments current: on an event loop, by a background task that re-reads them
        every RELOAD_EVERY_S (see `start`); elsewhere by reading them now if stale."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        watcher = self._watcher
        if loop is not None and watcher is not None and not watcher.done() and watcher.get_loop() is loop:
            return
        if time.monotonic() - self._loaded_at > self.RELOAD_EVERY_S:
            self.reload()
        if loop is not None:
            self._watcher = loop.create_task(self._watch(), name="keel-deployments")

    async def start(self) -> None:
        """Start the background re-reads with the server (the first request would, otherwise)."""
        self.maybe_reload()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.RELOAD_EVERY_S)
            try:
                self._apply(*await asyncio.to_thread(self._read))
            except Exception:  # a database hiccup: the next round retries, requests go on with what is known
                log.exception("re-reading the stored deployments failed")

    def all(self) -> dict[str, DeploymentConfig]:
        return {**self._static, **self._dynamic}

    def for_alias(self, alias: str) -> list[DeploymentConfig]:
        """The alias's deployments (a list shared until the next change: do not change it)."""
        cache = self._by_alias  # taken first: a reload meanwhile leaves this dict behind, never fills it
        found = cache.get(alias)
        if found is None:
            found = [c for c in self.all().values() if c.alias == alias]
            if len(cache) < 10_000:
                cache[alias] = found
        return found

    def aliases(self) -> dict[str, str]:
        """alias → kind."""
        return {c.alias: c.kind for c in self.all().values()}

    def listing(self) -> list[dict[str, Any]]:
        return [public(c, "config") for c in self._static.values()] + [
            public(c, "api") for c in self._dynamic.values()]

    def provider(self, cfg: DeploymentConfig) -> Provider:
        """The shared provider instance for `cfg`; a changed config gets a fresh instance."""
        did = cfg.deployment_id()
        held = self._providers.get(did)
        if held is not None and (held[0] is cfg or held[0] == cfg):
            return held[1]
        prov = registry.get(cfg.provider)(cfg, self.ctx)
        self._providers[did] = (cfg, prov)
        return prov

    async def close(self) -> None:
        await stop_task(self._watcher)
        for _cfg, prov in list(self._providers.values()):
            await prov.close()
        self._providers.clear()

    # -- admin changes ------------------------------------------------------------------
    def parse(self, data: dict[str, Any]) -> DeploymentConfig:
        """A deployment from the admin API, checked as far as it can be before its first call; a mistake is
        the caller's `ValidationFailed` (422) naming the field."""
        try:
            cfg = DeploymentConfig(**data)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ValidationFailed(f"invalid deployment: {problems}", fix="correct the named fields") from None
        for name, value, limit in (("id", cfg.deployment_id(), 300), ("alias", cfg.alias, 200)):
            if len(value) > limit:
                raise ValidationFailed(f"invalid deployment: {name}: longer than {limit} characters",
                                       fix=f"use a shorter {name}")
        if _depth(cfg.options) > OPTIONS_DEPTH:
            raise ValidationFailed(f"invalid deployment: options: nested more than {OPTIONS_DEPTH} levels deep",
                                   fix="pass the provider's options as a flat object")
        try:
            registry.get(cfg.provider)
        except ConfigError:  # a config file's mistake stops the start; an API caller's is the caller's
            raise ValidationFailed(f"invalid deployment: provider: unknown provider {cfg.provider[:100]!r}",
                                   fix=f"use one of: {', '.join(registry.names())}, or install its plugin",
                                   provider=cfg.provider[:100]) from None
        did = cfg.deployment_id()
        if problem := tls_problem(cfg.options, self.ctx.outbound, f"deployment {did}"):
            option, detail, fix = problem
            raise ValidationFailed(f"invalid deployment {did}: {detail}", fix=fix, deployment=did, option=option)
        if exc := options_problem(cfg):
            raise ValidationFailed(f"invalid deployment {did}: {exc.detail}", fix=exc.fix, deployment=did,
                                   option=exc.ids.get("field"))
        return cfg

    def check_new(self, did: str) -> None:
        """Conflict if deployment `did` exists (as the store holds it now). Called before a new deployment's key
        is stored too, so that a refused add changes no vault secret."""
        self.reload()
        if did in self.all():
            raise Conflict(f"deployment {did!r} already exists", fix="update it with PUT, or pick another id",
                           deployment=did)

    def add(self, cfg: DeploymentConfig) -> dict[str, Any]:
        did = cfg.deployment_id()
        self.check_new(did)
        now = utcnow()
        with self.store.engine.begin() as conn:
            conn.execute(deployments_table.insert().values(
                id=did, alias=cfg.alias, config=cfg.model_dump(mode="json"), created_at=now, updated_at=now))
        self.reload()
        publish(self.store, "deployments")  # every other replica re-reads them now
        return public(cfg, "api")

    def check_update(self, did: str, patch: dict[str, Any]) -> DeploymentConfig:
        """What `patch` makes of deployment `did`, checked as `update` checks it, changing nothing (called before a
        new key is stored too, so that a refused change changes no vault secret)."""
        if did in self._static:
            raise Conflict(f"deployment {did!r} is defined in keel.yaml", fix="change it in the config file",
                           deployment=did)
        self.reload()
        current = self._dynamic.get(did)
        if current is None:
            raise NotFound(f"deployment {did!r} does not exist", fix="list them at GET /admin/deployments",
                           deployment=did)
        merged = {**current.model_dump(), **patch, "id": did}
        cfg = self.parse(merged)
        if cfg.alias != current.alias and patch.get("alias") is None:
            raise BadRequest("alias cannot be cleared")
        return cfg

    def update(self, did: str, patch: dict[str, Any]) -> dict[str, Any]:
        cfg = self.check_update(did, patch)
        with self.store.engine.begin() as conn:
            conn.execute(deployments_table.update().where(deployments_table.c.id == did).values(
                alias=cfg.alias, config=cfg.model_dump(mode="json"), updated_at=utcnow()))
        self.reload()
        publish(self.store, "deployments")
        return public(cfg, "api")

    def delete(self, did: str) -> None:
        if did in self._static:
            raise Conflict(f"deployment {did!r} is defined in keel.yaml", fix="remove it from the config file",
                           deployment=did)
        with self.store.engine.begin() as conn:
            if not conn.execute(deployments_table.delete().where(deployments_table.c.id == did)).rowcount:
                raise NotFound(f"deployment {did!r} does not exist", deployment=did)
        self.reload()
        publish(self.store, "deployments")
