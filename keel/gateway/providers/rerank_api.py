"""`rerank_api`: a reranker deployment served by an upstream's `/rerank` endpoint — the shape Cohere, Jina,
Voyage, vLLM, Infinity and TEI's OpenAI-style servers share (`{model, query, documents, top_n}` in,
`{results: [{index, relevance_score}]}` out) — through Keel's one outbound stack (proxies, CA bundle,
client certificates, vault credential), like every HTTP provider.

`base_url` is the API root (`https://api.cohere.com/v2`, `https://api.jina.ai/v1`, `http://vllm:8000/v1`);
`options.path` overrides the `/rerank` path.

Example:
    >>> p = RerankAPIProvider(DeploymentConfig(alias="rerank", provider="rerank_api", kind="rerank",
    ...     model="rerank-v3.5", base_url="https://api.cohere.com/v2", credential="cohere"), ctx)
    >>> (await p.rerank(RerankRequest("rerank", "what is x?", ["x is a letter", "y"]))).scores
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Any, ClassVar

from keel.core.errors import ConfigError, NotSupported
from keel.core.settings import DeploymentConfig
from keel.gateway.protocol import ChatDelta, ChatRequest, ChatResult, EmbedResult, ProviderContext
from keel.gateway.providers.openai_compatible import PARSE_ERRORS, HTTPProvider
from keel.gateway.reranking import RerankRequest, RerankResult


class RerankAPIProvider(HTTPProvider):
    """Scores documents with an upstream reranker; asks for every document's score (`top_n` = all) so the
    gateway can order, cut and meter one way for every reranker kind."""

    name: ClassVar[str] = "rerank_api"
    supports_tools: ClassVar[bool] = False
    supports_json_mode: ClassVar[bool] = False
    can_stream: ClassVar[bool] = False
    can_embed: ClassVar[bool] = False
    can_rerank: ClassVar[bool] = True

    def __init__(self, config: DeploymentConfig, ctx: ProviderContext) -> None:
        super().__init__(config, ctx)
        path = config.options.get("path") or "/rerank"
        self.rerank_url = f"{self.base_url}/{str(path).lstrip('/')}"

    @classmethod
    def check_options(cls, config: DeploymentConfig) -> None:
        """`options.path`, when given, is a URL path."""
        path = config.options.get("path")
        if path is not None and (not isinstance(path, str) or not path.strip() or "?" in path or " " in path):
            raise ConfigError(f"options.path: {str(path)[:100]!r} is not a URL path such as /rerank",
                              fix="set options.path to the rerank endpoint's path (e.g. /v1/rerank), or leave it out",
                              field="options.path")
        super().check_options(config)

    def auth_headers(self, secret: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {secret}"} if secret else {}

    async def rerank(self, req: RerankRequest) -> RerankResult:
        if not req.documents:
            return RerankResult(scores=[], tokens=0, model=self.config.model or req.model)
        body = {"model": self.config.model or req.model, "query": req.query, "documents": req.documents,
                "top_n": len(req.documents), "return_documents": False}
        data = await self._post_json(self.rerank_url, body)
        try:
            results = data["results"]
            scores = [math.nan] * len(req.documents)
            for item in results:
                i, score = int(item["index"]), float(item["relevance_score"])
                if not 0 <= i < len(scores):
                    raise IndexError(f"result index {i} outside 0..{len(scores) - 1}")
                scores[i] = score
        except PARSE_ERRORS as exc:
            raise self._malformed(f"{type(exc).__name__}: {exc}") from None
        missing = [i for i, s in enumerate(scores) if not math.isfinite(s)]
        if missing:
            raise self._malformed(f"no finite score for document(s) {missing[:5]}")
        return RerankResult(scores=scores, tokens=usage_tokens(data, req), model=data.get("model") or self.config.model)

    async def embed(self, texts: list[str]) -> EmbedResult:
        raise self._not_this("embedding", "/v1/embeddings")

    async def chat(self, req: ChatRequest) -> ChatResult:
        raise self._not_this("chat", "/v1/chat/completions")

    def stream(self, req: ChatRequest) -> AsyncIterator[ChatDelta]:
        raise self._not_this("chat", "/v1/chat/completions")

    def _not_this(self, what: str, endpoint: str) -> NotSupported:
        return NotSupported(f"deployment {self.deployment} is a reranker and cannot serve {what} requests",
                            fix=f"send {what} requests to another model; use this one with /v1/rerank",
                            deployment=self.deployment, endpoint=endpoint)


def usage_tokens(data: Any, req: RerankRequest) -> int:
    """Tokens the upstream reports (`usage.total_tokens`, Cohere v2's `meta.tokens.input_tokens`, Voyage's
    `usage.total_tokens`), else about four characters a token of the query once per document plus the documents."""
    if isinstance(data, dict):
        usage = data.get("usage")
        if isinstance(usage, dict):
            for key in ("total_tokens", "prompt_tokens", "input_tokens"):
                if isinstance(usage.get(key), (int, float)) and usage[key] > 0:
                    return int(usage[key])
        meta = data.get("meta")
        tokens = meta.get("tokens") if isinstance(meta, dict) else None
        if isinstance(tokens, dict) and isinstance(tokens.get("input_tokens"), (int, float)):
            return int(tokens["input_tokens"])
    chars = len(req.query) * len(req.documents) + sum(len(d) for d in req.documents)
    return math.ceil(chars / 4)
