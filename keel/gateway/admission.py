"""What the two admission stages, rate limits and budgets, share: definitions kept fresh (`Fresh`), a
supervised background loop (`Ticker`), cached alias and provider lookups (`Lookups`), the prompt size a
limit or budget reserves on (`prompt_tokens`), and settling once a call is over (`settled`, which
wraps streams in one `Observed`)."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from keel.core.settings import DeploymentConfig, Settings
from keel.gateway.deployments import Deployments
from keel.gateway.pipeline import Call
from keel.gateway.protocol import ChatDelta, ChatResult, EmbedResult, Provider, Usage
from keel.gateway.reranking import RerankResult

log = logging.getLogger("keel.gateway.admission")

STALE_S = 3.0  # definitions older than this (an idle replica) are re-read before a request goes on


class Fresh:
    """Definitions read through `load()`, re-read by a request that finds them older than STALE_S (an
    idle replica's); concurrent requests share one read."""

    def __init__(self, load: Callable[[], None], monotonic: Callable[[], float] = time.monotonic) -> None:
        self.load = load
        self.monotonic = monotonic
        self.at = 0.0
        self._lock: asyncio.Lock | None = None

    def stale(self) -> bool:
        return self.monotonic() - self.at > STALE_S

    async def refresh(self) -> None:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self.stale():
                await asyncio.get_running_loop().run_in_executor(None, self.load)


class Ticker:
    """A supervised background loop for a stage, started and stopped by the stage's `start`/`stop` (the
    app's lifecycle): it awaits `tick()` every `every_s` seconds and logs and survives its errors. `stop()`
    lets a tick in progress finish (a flush is never cut in half) and returns once the loop has ended, so
    the stage's final work comes after its last tick; a tick stuck past STOP_WAIT_S is cancelled."""

    STOP_WAIT_S = 10.0

    def __init__(self, name: str, every_s: float, tick: Callable[[], Awaitable[None]]) -> None:
        self.name = name
        self.every = every_s
        self.tick = tick
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._stopping = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping.set()
        _done, pending = await asyncio.wait([task], timeout=self.STOP_WAIT_S)
        if pending:
            log.error("background work did not stop in time; cancelled", extra={"task": self.name})
            task.cancel()
            await asyncio.wait([task])

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._stopping.wait(), self.every)
                return
            except TimeoutError:
                pass
            try:
                await self.tick()
            except Exception:  # the next tick retries; the loop must outlive a database hiccup
                log.exception("background work failed", extra={"task": self.name})


def prompt_tokens(call: Call, prov: Provider | None) -> int:
    """The call's prompt size as `prov` counts it (tool definitions included), cached on the call;
    about four characters a token when there is no provider to ask."""
    cache: dict[int, int] = call.annotations.setdefault("keel.prompt_tokens", {})
    key = id(prov)
    if key in cache:
        return cache[key]
    if call.kind == "embedding":
        messages = [{"role": "user", "content": t} for t in call.texts or []]
    elif call.kind == "rerank" and call.rerank is not None:  # each document is scored with the query
        q = call.rerank.query
        messages = [{"role": "user", "content": f"{q}\n{d}"} for d in call.rerank.documents]
    else:
        messages = call.chat.messages if call.chat else []
    n = prov.count_tokens(messages) if prov is not None else math.ceil(len(orjson.dumps(messages)) / 4)
    if call.chat is not None and call.chat.tools:
        n += math.ceil(len(orjson.dumps(call.chat.tools)) / 4)
    cache[key] = n
    return n


class Lookups:
    """The deployments behind an alias (optionally with its fallbacks, transitively) and each deployment's
    provider, cached until the deployments change, so the request path skips `Deployments`' merging and
    config comparisons."""

    def __init__(self, deployments: Deployments, settings: Settings) -> None:
        self.source = deployments
        self.settings = settings
        self._aliases: dict[tuple[str, str, bool], tuple[int, list[DeploymentConfig]]] = {}
        self._providers: dict[int, tuple[DeploymentConfig, Provider]] = {}

    def deployments(self, alias: str, kind: str, fallbacks: bool = False) -> list[DeploymentConfig]:
        deployments = self.source
        deployments.maybe_reload()
        hit = self._aliases.get((alias, kind, fallbacks))
        if hit is not None and hit[0] == deployments.version:
            return hit[1]
        seen: set[str] = set()
        todo, out = [alias], []
        while todo:
            name = todo.pop(0)
            if name in seen:
                continue
            seen.add(name)
            out += [c for c in deployments.for_alias(name) if c.kind == kind]
            conf = self.settings.aliases.get(name)
            if fallbacks and conf is not None:
                todo += conf.fallbacks
        if len(self._aliases) > 1000:
            self._aliases.clear()
        self._aliases[(alias, kind, fallbacks)] = (deployments.version, out)
        return out

    def provider(self, cfg: DeploymentConfig) -> Provider:
        hit = self._providers.get(id(cfg))
        if hit is not None and hit[0] is cfg:
            return hit[1]
        prov = self.source.provider(cfg)
        if len(self._providers) > 1000:
            self._providers.clear()
        self._providers[id(cfg)] = (cfg, prov)
        return prov


def _estimate_usage(call: Call, texts: list[str]) -> Usage:
    """What the Gateway bills for a stream that ended without reporting usage (the same count)."""
    prov, req = call.provider, call.chat
    if prov is None or req is None:
        return Usage()
    text = "".join(texts)
    out = prov.count_tokens([{"role": "assistant", "content": text}]) if text else 0
    return Usage(prompt_tokens=prov.count_tokens(req.messages), completion_tokens=out)


Done = Callable[[Usage | None], None]


class Observed:
    """A stream passed through unchanged that calls each `done(usage)` exactly once, when it ends, fails
    or is closed (a client that went away); usage the stream never reported is estimated from its text.
    Stages that observe the same stream share one Observed (`watch`), not one layer each per delta."""

    def __init__(self, call: Call, inner: Any, done: Done) -> None:
        self._call = call
        self._inner = inner
        self._done: list[Done] = [done]
        self._usage: Usage | None = None
        self._texts: list[str] = []

    def watch(self, done: Done) -> None:
        self._done.append(done)

    def __aiter__(self) -> Observed:
        return self

    async def __anext__(self) -> ChatDelta:
        try:
            delta: ChatDelta = await self._inner.__anext__()
        except BaseException:
            self._finish()
            raise
        if delta.usage is not None:
            self._usage = delta.usage
        if delta.content:
            self._texts.append(delta.content)
        return delta

    async def aclose(self) -> None:
        self._finish()
        aclose = getattr(self._inner, "aclose", None)
        if aclose is not None:
            await aclose()

    def _finish(self) -> None:
        dones, self._done = self._done, []
        if dones:
            usage = self._usage if self._usage is not None else _estimate_usage(self._call, self._texts)
            for done in dones:
                done(usage)

    def __del__(self) -> None:
        # Safety net: a stream dropped without being closed must still release what it holds.
        self._finish()


def settled(call: Call, out: Any, done: Done) -> Any:
    """`out`, what the rest of the path returned for `call`, with `done(usage)` called once the call is
    over: at once for an answer, at the end or close of a stream. A stage awaits the rest of the path
    itself and calls `done(None)` when it raises (no usage known), so no coroutine layer is added here:
    every layer is resumed again when the upstream answers.

    >>> try:
    ...     out = await nxt(call)
    ... except BaseException:
    ...     done(None)
    ...     raise
    >>> return settled(call, out, done)
    """
    if isinstance(out, ChatResult):
        done(out.usage)
    elif isinstance(out, EmbedResult):
        done(Usage(prompt_tokens=out.prompt_tokens))
    elif isinstance(out, RerankResult):
        done(Usage(prompt_tokens=out.tokens))
    elif type(out) is Observed and out._call is call:
        out.watch(done)
    elif hasattr(out, "__anext__"):
        return Observed(call, out, done)
    else:
        done(None)
    return out
