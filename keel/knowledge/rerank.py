"""The optional rerank stage: a `Reranker` reorders a short list of hits by relevance to the query.

`ChatReranker` asks a chat model (through the governed gateway, so it is metered and policed)
which numbered passages answer the query; a cross-encoder would implement the same protocol.
"""

from __future__ import annotations

import re
from typing import Protocol

from keel.core.errors import Unavailable, UpstreamError
from keel.gateway.pipeline import Call, Gateway
from keel.gateway.protocol import ChatRequest
from keel.identity.principal import Principal
from keel.knowledge.hits import Hit


class Reranker(Protocol):
    """Reorders `hits` for `query`.

    Semantics: returns a permutation of `hits` (never adds, drops or alters one, so it cannot widen
    what the caller may see); when its model fails upstream it keeps the given order rather than
    failing the search; every model call goes through the gateway as `principal`.
    """

    async def rerank(self, query: str, hits: list[Hit], principal: Principal, request_id: str) -> list[Hit]: ...


class ChatReranker:
    """Ranks passages by asking a chat model for the relevant passage numbers, best first.

    Example:
        >>> # await ChatReranker(gateway, "local-chat").rerank("what is x?", hits, principal, "req_1")
    """

    def __init__(self, gateway: Gateway, alias: str) -> None:
        self.gateway = gateway
        self.alias = alias

    async def rerank(self, query: str, hits: list[Hit], principal: Principal, request_id: str) -> list[Hit]:
        listing = "\n".join(f"[{i}] {h.title} — {h.section}: {' '.join(h.text.split())[:400]}"
                            for i, h in enumerate(hits, 1))
        messages = [
            {"role": "system", "content": "You rank passages. Reply only with passage numbers, most relevant first, "
                                          "comma-separated."},
            {"role": "user", "content": f"Query: {query}\n\nPassages:\n{listing}\n\nMost relevant passage numbers:"}]
        call = Call(request_id=f"{request_id}/rerank", principal=principal, kind="chat", alias=self.alias,
                    chat=ChatRequest(model=self.alias, messages=messages, max_tokens=40, temperature=0.0),
                    metadata={"use_case": "knowledge.rerank", "task_id": request_id})
        try:
            result = await self.gateway.chat(call)
        except (UpstreamError, Unavailable):  # the model failed, not the caller: keep the fused order
            return hits
        order: list[int] = []
        for m in re.findall(r"\d+", result.content or ""):
            i = int(m) - 1
            if 0 <= i < len(hits) and i not in order:
                order.append(i)
        order += [i for i in range(len(hits)) if i not in order]
        return [hits[i] for i in order]
