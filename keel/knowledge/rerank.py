"""The optional rerank stage: a `Reranker` reorders a short list of hits by relevance to the query.

`DeploymentReranker` scores the passages with a reranker deployment (`kind: rerank`: a `local_rerank`
cross-encoder in process, or a `rerank_api` upstream such as Cohere, Jina or vLLM) through the governed
gateway, so it is metered and policed like `/v1/rerank`. `ChatReranker` asks a chat model which numbered
passages answer the query (kept for explicit requests; on the bundled 135M chat model it is noise).
`for_alias` picks one by the alias's deployment kind; `collection_reranker` reads a collection's choice.
"""

from __future__ import annotations

import re
from typing import Protocol

from collections.abc import Sequence
from typing import Any

from keel.core.errors import Unavailable, UpstreamError
from keel.gateway.pipeline import Call, Gateway
from keel.gateway.protocol import ChatRequest
from keel.gateway.reranking import RerankRequest
from keel.identity.principal import Principal
from keel.knowledge.hits import Hit


class Reranker(Protocol):
    """Reorders `hits` for `query`.

    Semantics: returns a permutation of `hits` (never adds, drops or alters one, so it cannot widen
    what the caller may see); when its model fails upstream it keeps the given order rather than
    failing the search; every model call goes through the gateway as `principal`.
    """

    depth: int  # how many of the fused hits it is given, at least

    async def rerank(self, query: str, hits: list[Hit], principal: Principal, request_id: str) -> list[Hit]: ...


OFF = "off"
SETTING = "reranker"  # the collection metadata key that names its reranker


def collection_reranker(collections: Sequence[Any]) -> str | None:
    """The reranker the searched collections ask for in their metadata (`"reranker": "<alias>"` or `"off"`):
    the first that names one, by collection name; None when none does."""
    for c in sorted(collections, key=lambda c: c.name):
        value = (c.meta or {}).get(SETTING)
        if isinstance(value, str) and value:
            return value
    return None


def for_alias(gateway: Gateway, alias: str) -> Reranker:
    """The reranker for a model alias: a reranker deployment's scores, or a chat model's ordering."""
    if gateway.deployments.aliases().get(alias) == "rerank":
        return DeploymentReranker(gateway, alias)
    return ChatReranker(gateway, alias)


class DeploymentReranker:
    """Orders passages by a reranker deployment's relevance scores (a cross-encoder), best first.

    Each passage is scored as `title — section` and its text; ties keep the fused order.

    Example:
        >>> # await DeploymentReranker(gateway, "rerank").rerank("what is x?", hits, principal, "req_1")
    """

    depth = 30

    def __init__(self, gateway: Gateway, alias: str) -> None:
        self.gateway = gateway
        self.alias = alias

    async def rerank(self, query: str, hits: list[Hit], principal: Principal, request_id: str) -> list[Hit]:
        if not hits:
            return hits
        docs = [f"{h.title} — {h.section}\n{h.text}" if h.section else f"{h.title}\n{h.text}" for h in hits]
        call = Call(request_id=f"{request_id}/rerank", principal=principal, kind="rerank", alias=self.alias,
                    rerank=RerankRequest(model=self.alias, query=query, documents=docs),
                    metadata={"use_case": "knowledge.rerank", "task_id": request_id})
        try:
            result = await self.gateway.rerank(call)
        except (UpstreamError, Unavailable):  # the model failed, not the caller: keep the fused order
            return hits
        return [hits[i] for i, _score in result.ranked()]


class ChatReranker:
    """Ranks passages by asking a chat model for the relevant passage numbers, best first.

    Example:
        >>> # await ChatReranker(gateway, "local-chat").rerank("what is x?", hits, principal, "req_1")
    """

    depth = 10

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
