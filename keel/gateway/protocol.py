"""The provider protocol: what every model backend (local llama.cpp, OpenAI-compatible, Anthropic, …)
implements. Requests and results use the OpenAI chat wire shapes, so translation happens once,
inside the provider that needs it.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Protocol, runtime_checkable

from keel.core.errors import (
    UpstreamError, UpstreamRateLimited, UpstreamRefused, UpstreamRejected, UpstreamTimeout,
)
from keel.core.outbound import Outbound
from keel.core.settings import DeploymentConfig


@dataclass
class ChatRequest:
    """An OpenAI `/v1/chat/completions` request, parsed. `body` keeps the original JSON for pass-through."""

    model: str
    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] | None = None
    seed: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    stream: bool = False
    include_usage: bool = False
    body: dict[str, Any] = field(default_factory=dict)


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # of prompt_tokens, read from the provider's prompt cache (billed at its cached rate)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class ChatResult:
    """A finished completion: one choice's message, why it stopped, and the token usage."""

    content: str | None
    finish_reason: str
    usage: Usage
    tool_calls: list[dict[str, Any]] | None = None
    model: str = ""


@dataclass
class ChatDelta:
    """One streamed piece. `tool_calls` uses OpenAI's delta format (with `index`); the last delta
    carries `finish_reason`, and `usage` arrives on the last delta or on one of its own. `more` is a
    hint: the next delta arrived with this one, so a writer may send both at once."""

    content: str | None = None
    role: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    finish_reason: str | None = None
    usage: Usage | None = None
    more: bool = False


@dataclass
class EmbedResult:
    vectors: list[list[float]]
    prompt_tokens: int
    model: str = ""


@dataclass
class ProviderContext:
    """What a provider may use from Keel: vault secrets by name, and a few settings."""

    get_secret: Callable[[str], str]
    data_dir: str = ".keel"
    threads: int = 0
    outbound: Outbound = Outbound()  # CA bundle, client certificate and proxies for HTTP upstreams
    get_header_secret: Callable[[str], str] | None = None  # a global secret that serves `http_header`


@runtime_checkable
class Provider(Protocol):
    """A model backend for one deployment.

    Semantics every implementation keeps (checked by `tests/gateway/test_provider_conformance.py`):
    - `chat` returns one `ChatResult` with real token usage (from the upstream, or counted locally).
    - `stream` yields `ChatDelta`s; closing the iterator early (`aclose()`, a client that went away)
      stops the upstream work. The final delta has `finish_reason`; usage is always reported.
    - A request the backend cannot serve (tools, JSON mode, embeddings on a chat model) raises
      `NotSupported` *before* any upstream call; a prompt that does not fit raises `ContextOverflow`.
    - Upstream failures raise `UpstreamError` or a subclass (see `upstream_error`), never a foreign
      exception; the upstream status and message are kept. Input the backend cannot take (its template,
      tokenizer or grammar refused it) raises `InputRejected`: the caller's, never the deployment's.
    - Instances are long-lived and shared by concurrent requests; `close()` releases resources.
    """

    name: ClassVar[str]
    supports_tools: ClassVar[bool]
    supports_json_mode: ClassVar[bool]
    can_stream: ClassVar[bool]
    can_embed: ClassVar[bool]

    async def chat(self, req: ChatRequest) -> ChatResult: ...

    def stream(self, req: ChatRequest) -> AsyncIterator[ChatDelta]: ...

    async def embed(self, texts: list[str]) -> EmbedResult: ...

    def count_tokens(self, messages: list[dict[str, Any]]) -> int: ...

    async def close(self) -> None: ...


ProviderFactory = Callable[[DeploymentConfig, ProviderContext], Provider]


CALLER_STATUSES = frozenset({400, 404, 409, 413, 422})  # an upstream's answer that the request itself is wrong


def upstream_error(status: int | None, message: str, deployment: str, *, timeout: bool = False,
                   retry_after: float | None = None) -> UpstreamError:
    """Translate an upstream failure into the most specific Keel error, keeping status and message.

    Upstream 400/404/409/413/422 are the caller's request → `UpstreamRejected` with the same status;
    429 → `UpstreamRateLimited`; other 4xx (401/403: Keel's credential) → `UpstreamRefused` (502);
    5xx, connection and protocol errors → `UpstreamError` (502); timeouts → `UpstreamTimeout` (504).
    Each class says whether another try may succeed (`retryable`).
    """
    message = (message or "").strip()[:500]
    if timeout:
        return UpstreamTimeout(f"deployment {deployment} did not answer in time",
                               fix="retry, raise the deployment's timeout_s, or add a fallback", deployment=deployment)
    detail = f"deployment {deployment} failed" + (f" with HTTP {status}" if status else "") + (
        f": {message}" if message else "")
    kw: dict[str, Any] = {"fix": "check the upstream provider, its credential and the request", "deployment": deployment,
                          "upstream_status": status, "upstream_message": message or None, "retry_after": retry_after}
    if status in CALLER_STATUSES:
        return UpstreamRejected(detail, status=status, **{**kw, "fix": "correct the request as the message says"})
    if status == 429:
        headers = {"Retry-After": str(math.ceil(retry_after))} if retry_after is not None else None
        return UpstreamRateLimited(detail, headers=headers, **kw)
    if status is not None and status < 500:
        return UpstreamRefused(detail, **kw)
    return UpstreamError(detail, **kw)
