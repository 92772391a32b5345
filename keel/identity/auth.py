"""Authenticate each request: bearer key → principal, cached briefly in memory.

Revocation through this process clears the cache at once; another replica's revocation is seen
within `auth_cache_ttl_s` (default 1 s) — the price of not hitting the store on every call. A key in
steady use is re-verified in the background once its entry is past half that time, so its requests
never wait on the store; an entry past the whole time is never served.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from keel.core.db import Store
from keel.core.errors import Unauthorized
from keel.identity.principal import Principal
from keel.identity.service import verify_key


class Authenticator:
    """Verifies keys against the store with a small TTL cache, refreshed ahead of expiry."""

    def __init__(self, store: Store, ttl_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.ttl = ttl_s
        self.clock = clock
        self._cache: dict[str, tuple[float, Principal]] = {}
        self._inflight: dict[str, asyncio.Future[Principal]] = {}
        self._generation = 0  # bumped by invalidate(): a lookup begun before it must not refill the cache
        self._tasks: set[asyncio.Task[None]] = set()

    def invalidate(self) -> None:
        self._generation += 1
        self._cache.clear()

    async def authenticate(self, key: str) -> Principal:
        hit = self._cache.get(key)
        if hit is not None:
            left = hit[0] - self.clock()
            if left > 0:
                if left < self.ttl / 2 and key not in self._inflight:
                    self._start_lookup(key)  # in the background: this request is served from the cache
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
        try:
            principal = await run_in_threadpool(verify_key, self.store, key)
        except asyncio.CancelledError:
            fut.cancel()
            raise
        except Exception as exc:
            if isinstance(exc, Unauthorized):
                self._cache.pop(key, None)  # revoked, expired or gone: refused from now on
            fut.set_exception(exc)
            fut.exception()  # retrieved: waiters re-raise it themselves, a background refresh drops it
            return
        finally:
            self._inflight.pop(key, None)
        if self.ttl > 0 and generation == self._generation:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[key] = (self.clock() + self.ttl, principal)
        fut.set_result(principal)


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


