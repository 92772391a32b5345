"""Authenticate each request: bearer key → principal, cached briefly in memory.

Revocation through this process clears the cache at once; another replica's revocation is seen
within `auth_cache_ttl_s` (default 1 s) — the price of not hitting the store on every call. Keys used in
the last `keep_s` (five minutes) are re-verified in the background every half TTL, all in one store
query, so their requests never wait on the store — a client that pauses for a few seconds included —
while an entry past its TTL since its last successful check is never served.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from keel.core.db import Store
from keel.core.errors import Unauthorized
from keel.core.tasks import stop_task
from keel.identity.principal import Principal
from keel.identity.service import verify_key, verify_keys

log = logging.getLogger("keel.auth")

KEEP_S = 300.0  # a key unused for this long is forgotten (its next request looks it up again)


class Authenticator:
    """Verifies keys against the store with a small TTL cache, kept verified in the background."""

    def __init__(self, store: Store, ttl_s: float = 1.0, clock: Callable[[], float] = time.monotonic,
                 keep_s: float = KEEP_S) -> None:
        self.store = store
        self.ttl = ttl_s
        self.clock = clock
        self.keep_s = keep_s
        self._cache: dict[str, list[Any]] = {}  # key → [trusted until, principal, last used]
        self._inflight: dict[str, asyncio.Future[Principal]] = {}
        self._generation = 0  # bumped by invalidate(): a lookup begun before it must not refill the cache
        self._tasks: set[asyncio.Task[None]] = set()
        self._refresher: asyncio.Task[None] | None = None

    def invalidate(self) -> None:
        self._generation += 1
        self._cache.clear()

    async def authenticate(self, key: str) -> Principal:
        hit = self._cache.get(key)
        if hit is not None:
            now = self.clock()
            if hit[0] > now:
                hit[2] = now
                return hit[1]
        # One store lookup per key at a time, however many requests wait on it.
        return await asyncio.shield(self._inflight.get(key) or self._start_lookup(key))

    def _start_lookup(self, key: str) -> asyncio.Future[Principal]:
        """Register the key's lookup at once (so no second one starts), then run it in a task."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Principal] = loop.create_future()
        self._inflight[key] = fut
        task = loop.create_task(self._lookup(key, fut, self._generation))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return fut

    async def _lookup(self, key: str, fut: asyncio.Future[Principal], generation: int) -> None:
        checked = self.clock()
        try:
            principal = await run_in_threadpool(verify_key, self.store, key)
        except asyncio.CancelledError:
            fut.cancel()
            raise
        except Exception as exc:
            if isinstance(exc, Unauthorized):
                self._cache.pop(key, None)  # revoked, expired or gone: refused from now on
            fut.set_exception(exc)
            fut.exception()  # retrieved: waiters re-raise it themselves
            return
        finally:
            self._inflight.pop(key, None)
        if self.ttl > 0 and generation == self._generation:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[key] = [checked + self.ttl, principal, self.clock()]
            loop, refresher = asyncio.get_running_loop(), self._refresher
            if refresher is None or refresher.done() or refresher.get_loop() is not loop:
                self._refresher = loop.create_task(self._refresh_loop(), name="keel-auth")
        fut.set_result(principal)

    async def refresh(self) -> None:
        """Re-verify every cached key used within `keep_s` in one store query (forgetting the others): each
        stays trusted for a TTL from this check, or is dropped if it was revoked, expired or deleted."""
        now = self.clock()
        for key in [k for k, entry in self._cache.items() if now - entry[2] > self.keep_s]:
            del self._cache[key]
        if not self._cache:
            return
        generation = self._generation
        results = await run_in_threadpool(verify_keys, self.store, list(self._cache))
        if generation != self._generation:
            return  # invalidated meanwhile: what this check saw may predate the change
        for key, result in results.items():
            entry = self._cache.get(key)
            if entry is None:
                continue
            if isinstance(result, Principal):
                entry[0], entry[1] = max(entry[0], now + self.ttl), result
            else:
                del self._cache[key]

    async def _refresh_loop(self) -> None:
        while self._cache:
            await asyncio.sleep(self.ttl / 2)
            try:
                await self.refresh()
            except Exception:  # the store is down: entries expire on their own, requests then look up
                log.exception("re-verifying cached keys failed")

    async def close(self) -> None:
        await stop_task(self._refresher)


def bearer(request: Request) -> str:
    """The key from `Authorization: Bearer …`, else from `x-api-key` (the first of each counts). Read off
    the raw header list: building the framework's header mapping costs more than the lookup."""
    auth = api_key = None
    for name, value in request.scope["headers"]:
        if name == b"authorization" and auth is None:
            auth = value.decode("latin-1")
        elif name == b"x-api-key" and api_key is None:
            api_key = value.decode("latin-1")
    if auth:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    if api_key and api_key.strip():
        return api_key.strip()
    raise Unauthorized("no API key sent", fix="send `Authorization: Bearer <key>`")


async def principal(request: Request) -> Principal:
    """FastAPI dependency: the caller, or 401."""
    auth: Authenticator = request.app.state.authenticator
    p = await auth.authenticate(bearer(request))
    request.state.principal = p
    return p


async def admin(request: Request) -> Principal:
    """FastAPI dependency: an admin caller, or 401/403."""
    p = await principal(request)
    p.require("admin.manage")
    return p


