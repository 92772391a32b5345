"""The cache stage: the last stage before the router. A hit answers from the store without an
upstream call; a miss calls on and stores the answer if it completed normally.

A hit is metered like the original call (same token usage) at zero cost, with the original cost
recorded as `saved_cost`, and comes back in the shape the request asked for: a `ChatResult`, or
for a streaming request a short replay of `ChatDelta`s ending with finish_reason and usage.
Only complete answers are stored (finish_reason stop or length; tool calls too when forced); a
stream is stored when it ran to its end, never when it was cut, failed, or the client left.

The cache never fails a request: when the store or the embedding model is unavailable the call
goes on uncached and a warning is logged.

Example (what `keel.gateway.service.build` does; `embed` is the gateway's own):
    >>> stage = CacheStage(settings, store, embed=gateway.embed)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import numpy as np
import sqlalchemy as sa

from keel.core.db import Store
from keel.core.errors import KeelError
from keel.core.settings import Settings
from keel.gateway.cache.keys import Plan, exact_key, plan_for, scope_of, semantic_key
from keel.gateway.cache.store import CacheStore, Entry
from keel.gateway.pipeline import Call, Next
from keel.gateway.protocol import ChatDelta, ChatResult, EmbedResult, Usage
from keel.identity.principal import Principal

log = logging.getLogger("keel.gateway.cache")

REPLAY_PIECES = 4


@dataclasses.dataclass
class Probe:
    """Where a call's answer is filed: an exact id, or a semantic partition and vector."""

    plan: Plan
    scope: str
    alias: str
    entry_id: str | None = None
    partition: str | None = None
    vector: np.ndarray | None = None
    generation: int = 0  # the alias's invalidation generation when the lookup missed


class CacheStage:
    """Exact and semantic response cache (see `keel.gateway.cache.keys` for what is cached when)."""

    changes_answer = False  # it files the answer `nxt` returned (or answers a hit itself), never alters one

    def __init__(self, settings: Settings, store: Store, embed: Callable[[Call], Awaitable[EmbedResult]]) -> None:
        self.embed = embed  # the gateway's own `embed`: the cache's vectors are metered and governed like any call
        self.settings = settings
        self.entries = CacheStore(store)

    async def handle(self, call: Call, nxt: Next) -> Any:
        if call.kind != "chat" or call.chat is None:
            return await nxt(call)
        plan = plan_for(call.alias, call.chat, self.settings)
        if plan is None:
            return await nxt(call)
        probe = await self._probe(call, plan)
        if probe is None:
            return await nxt(call)
        hit = await self._lookup(call, probe)
        if hit is not None:
            call.cache_hit = True
            call.saved_cost = hit.cost
            return replay(hit) if call.stream else hit.result()
        out = await nxt(call)
        if call.stream:
            return self._recording(call, probe, out)
        if out.finish_reason in plan.storable_finishes:
            await self._store(call, probe, out)
        return out

    # -- lookup ---------------------------------------------------------------------------
    async def _probe(self, call: Call, plan: Plan) -> Probe | None:
        assert call.chat is not None
        scope, alias = scope_of(call.principal), call.alias
        if plan.mode == "exact":
            return Probe(plan, scope, alias, entry_id=exact_key(scope, alias, call.chat))
        key = semantic_key(alias, call.chat)
        if key is None:
            return None
        vector = await self._embed(call, plan, key[1])
        return None if vector is None else Probe(plan, scope, alias, partition=key[0], vector=vector)

    async def _embed(self, call: Call, plan: Plan, text: str) -> np.ndarray | None:
        """The unit vector of `text`, made through the gateway itself (so it is metered and governed)."""
        alias = plan.embedding_alias
        sub = Call(request_id=f"{call.request_id}:cache", principal=_may_embed(call.principal, alias),
                   kind="embedding", alias=alias, texts=[text], metadata=dict(call.metadata),
                   annotations={"internal": "cache"})  # lets a stage tell the cache's own call apart
        try:
            result = await self.embed(sub)
        except KeelError as exc:
            log.warning("semantic cache skipped: embedding failed", extra={
                "alias": call.alias, "embedding_alias": alias, "error_code": exc.code, "error": exc.detail})
            return None
        vector = np.asarray(result.vectors[0], dtype=np.float32)
        norm = float(np.linalg.norm(vector))
        return vector / norm if norm > 0 else None

    async def _lookup(self, call: Call, probe: Probe) -> Entry | None:
        found: tuple[Entry | None, float] | None
        try:
            if probe.entry_id is not None:
                found = (await self.entries.get_exact(probe.entry_id, probe.alias), 1.0)
            else:
                assert probe.vector is not None and probe.partition is not None
                found = await self.entries.nearest((probe.scope, probe.alias, probe.partition), probe.vector,
                                                   probe.plan.threshold)
        except sa.exc.SQLAlchemyError as exc:
            log.warning("cache lookup failed; calling upstream", extra={"alias": call.alias, "error": repr(exc)})
            found = None
        probe.generation = self.entries.generation(probe.alias)  # answers made from here on may be stored
        if found is None or found[0] is None:
            return None
        call.annotations["cache_similarity"] = round(found[1], 4)
        return found[0]

    # -- store ----------------------------------------------------------------------------
    async def _store(self, call: Call, probe: Probe, result: ChatResult) -> None:
        entry = Entry(id=probe.entry_id or uuid.uuid4().hex, alias=probe.alias, payload=Entry.payload_of(result),
                      cost=call.cost(result.usage), expires_at=time.time() + probe.plan.ttl_s)
        try:
            await self.entries.put(entry, kind=probe.plan.mode, scope=probe.scope, partition=probe.partition,
                                   vector=probe.vector, generation=probe.generation)
        except sa.exc.SQLAlchemyError as exc:
            log.warning("cache store failed; answer not cached", extra={"alias": call.alias, "error": repr(exc)})

    async def _recording(self, call: Call, probe: Probe, inner: AsyncIterator[ChatDelta]) -> AsyncIterator[ChatDelta]:
        """Pass a stream through, and store it once it has run to its end."""
        parts: list[str] = []
        calls: dict[int, dict[str, Any]] = {}
        finish: str | None = None
        usage: Usage | None = None
        try:
            async for delta in inner:
                if delta.content:
                    parts.append(delta.content)
                if delta.tool_calls:
                    merge_tool_calls(calls, delta.tool_calls)
                if delta.finish_reason:
                    finish = delta.finish_reason
                if delta.usage is not None:
                    usage = delta.usage
                yield delta
        finally:
            close = getattr(inner, "aclose", None)
            if close is not None:
                await close()
        if finish not in probe.plan.storable_finishes:
            return
        content = "".join(parts)
        if usage is None or usage.total_tokens == 0:
            if call.provider is None or call.chat is None:
                return
            usage = Usage(call.provider.count_tokens(call.chat.messages),
                          call.provider.count_tokens([{"role": "assistant", "content": content}]) if content else 0)
        tool_calls = [calls[i] for i in sorted(calls)] or None
        await self._store(call, probe, ChatResult(content=content if (content or not tool_calls) else None,
                                                  finish_reason=finish or "stop", usage=usage,
                                                  tool_calls=tool_calls))


def _may_embed(p: Principal, alias: str) -> Principal:
    """The caller, allowed the cache's embedding alias even if its key is scoped to other models:
    the cache embeds on the operator's behalf, and the embedding is still metered to the caller."""
    if p.may_use_model(alias) or p.scopes.models is None:
        return p
    return dataclasses.replace(p, scopes=dataclasses.replace(p.scopes, models=(*p.scopes.models, alias)))


def merge_tool_calls(acc: dict[int, dict[str, Any]], deltas: list[dict[str, Any]]) -> None:
    """Fold OpenAI streaming tool-call deltas (with `index`) into whole tool calls."""
    for d in deltas:
        i = int(d.get("index", 0))
        cur = acc.setdefault(i, {"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
        if d.get("id"):
            cur["id"] = d["id"]
        if d.get("type"):
            cur["type"] = d["type"]
        fn = d.get("function") or {}
        if fn.get("name"):
            cur["function"]["name"] += fn["name"]
        if fn.get("arguments"):
            cur["function"]["arguments"] += fn["arguments"]


def split_pieces(text: str, n: int = REPLAY_PIECES) -> list[str]:
    """`text` in at most `n` pieces cut at word boundaries (joined, they give `text` back)."""
    words = re.findall(r"\s*\S+\s*", text) or ([text] if text else [])
    if len(words) <= n:
        return words
    size = -(-len(words) // n)
    return ["".join(words[i:i + size]) for i in range(0, len(words), size)]


async def replay(entry: Entry) -> AsyncIterator[ChatDelta]:
    """A cached answer as a stream: the role, the content in a few pieces, tool calls, then the
    finish reason with the original usage."""
    result = entry.result()
    yield ChatDelta(role="assistant", content="")
    for piece in split_pieces(result.content or ""):
        yield ChatDelta(content=piece)
    if result.tool_calls:
        yield ChatDelta(tool_calls=[{"index": i, **tc} for i, tc in enumerate(result.tool_calls)])
    yield ChatDelta(finish_reason=result.finish_reason, usage=result.usage)
