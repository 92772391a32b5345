"""Provider for any OpenAI-compatible server: OpenAI, vLLM, Ollama, llama.cpp server, TGI.

`HTTPProvider` holds the upstream plumbing (a `keel.core.http1` client from `keel.core.outbound`, timeouts, SSE, error
mapping); the Anthropic provider reuses it and only translates the wire format.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar

import orjson
from yarl import URL

from keel.core.errors import ConfigError, KeelError
from keel.core.http1 import Client, MalformedAnswer, Proxy, Response, WireError, header_lines
from keel.core.outbound import USER_AGENT
from keel.core.settings import DeploymentConfig
from keel.gateway.protocol import (
    ChatDelta, ChatRequest, ChatResult, EmbedResult, ProviderContext, Usage, upstream_error,
)
from keel.gateway.providers.token_count import Encoder, estimate_tokens, load_tokenizer

MAX_LINE = 2**21  # one SSE line, at most
DRAIN_S = 1.0  # after the last event, how long to wait for the body's end so the connection can be reused
PARSE_ERRORS = (KeyError, IndexError, TypeError, ValueError, AttributeError)
_TYPED_FIELDS = ("max_tokens", "temperature", "top_p", "stop", "seed", "tools", "tool_choice", "response_format")


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from `retry-after-ms`, or `retry-after` as seconds or an HTTP date; None if absent."""
    try:
        if ms := headers.get("retry-after-ms"):
            return max(0.0, float(ms) / 1000)
        value = headers.get("retry-after")
        if not value:
            return None
        if value.strip().replace(".", "", 1).isdigit():
            return float(value)
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def error_message(raw: bytes) -> str:
    """The human message of an error body: OpenAI/Anthropic `{"error": {"message"}}`, other shapes, or raw text."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode(errors="replace")
    return message_of(data) or raw.decode(errors="replace")


def message_of(data: Any) -> str:
    """The message inside a decoded error document, or "" when it has none."""
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        for value in (err, data.get("message"), data.get("detail")):
            if isinstance(value, str) and value:
                return value
    return ""


def sse_data(line: bytes) -> bytes | None:
    """The payload of an SSE `data:` line; None for event names, comments and blank lines.

    OpenAI and Anthropic send one JSON document per `data:` line, so no multi-line joining is done.
    """
    return line[5:].strip() if line.startswith(b"data:") else None


async def sse_batches(content: Response, idle_s: float) -> AsyncIterator[list[bytes]]:
    """The `data:` payloads of an SSE body, in batches of those that arrived together (so a consumer can
    pass a burst on in one write); each wait for more is bounded by `idle_s`. A line longer than MAX_LINE
    is a malformed answer."""
    tail = b""
    while True:
        async with asyncio.timeout(idle_s):
            chunk = await content.read_some()
        if not chunk:
            break
        lines = (tail + chunk).split(b"\n") if tail else chunk.split(b"\n")
        tail = lines.pop()
        if len(tail) > MAX_LINE:
            raise ValueError(f"an SSE line is longer than {MAX_LINE} bytes")
        batch = [data for line in lines if (data := sse_data(line))]
        if batch:
            yield batch
    if tail and (data := sse_data(tail)):
        yield [data]


def usage_of(usage: dict[str, Any]) -> Usage:
    """The usage an OpenAI-shaped answer reports; the prompt tokens served from the provider's cache are
    OpenAI's `prompt_tokens_details.cached_tokens` or DeepSeek's `prompt_cache_hit_tokens`."""
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    cached = cached or usage.get("prompt_cache_hit_tokens")
    return Usage(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0), int(cached or 0))


class HTTPProvider:
    """Shared upstream plumbing: one HTTP client (keep-alive pool) per instance, made lazily in the running
    loop from Keel's outbound stack (`keel.core.outbound`: CA bundle, client certificate, proxy)."""

    default_base_url: ClassVar[str] = ""

    def __init__(self, config: DeploymentConfig, ctx: ProviderContext) -> None:
        self.config = config
        self.ctx = ctx
        self.deployment = config.deployment_id()
        self.base_url = (config.base_url or self.default_base_url).rstrip("/")
        where = f"deployment {self.deployment}"
        self.outbound = ctx.outbound.with_options(config.options, where)
        self._tls = self.outbound.ssl_context(where)  # a bad CA bundle or certificate fails here, not per call
        self._client: Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._proxy: Proxy | None = None
        self._headers: dict[str, str] | None = None
        self._head = b""  # the headers, encoded once
        self._secret: str | None = None
        self._hidden: tuple[str, ...] = ()  # header secrets' values, scrubbed from errors like the credential
        self._urls: dict[str, URL] = {}
        self._encode: Encoder | bool | None = None  # options.tokenizer's counter once loaded; False: none
        try:
            type(self).check_options(config)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc.detail}", fix=exc.fix, **{**exc.ids, "deployment": self.deployment}) \
                from None

    @classmethod
    def check_options(cls, config: DeploymentConfig) -> None:
        """Refuse a mistake in `config`'s provider fields when the deployment is defined (admin API: 422; keel.yaml:
        the start stops), not at its first call: a ConfigError whose `field` names it (`options.tokenizer`).
        Subclasses add their own checks and call this one."""
        path = config.options.get("tokenizer")
        if path is None:
            return
        if not isinstance(path, str) or not path.strip():
            raise ConfigError("options.tokenizer: must be the path of a tokenizer.json",
                              fix="set options.tokenizer to the model's tokenizer.json, or remove it",
                              field="options.tokenizer")
        if not os.path.isfile(path):
            raise ConfigError(f"options.tokenizer: {path} does not exist or is not a file",
                              fix=f"put the model's tokenizer.json at {path} on every Keel server, or correct "
                                  "options.tokenizer", field="options.tokenizer")
        try:
            load_tokenizer(path, "options.tokenizer")
        except ConfigError as exc:  # its detail ends with the tokenizers library's reason, in parentheses
            reason = exc.detail.rpartition(" cannot be loaded ")[2]
            raise ConfigError(f"options.tokenizer: {path} is not a tokenizer.json that loads {reason}", fix=exc.fix,
                              field="options.tokenizer") from None

    def auth_headers(self, secret: str | None) -> dict[str, str]:
        """Headers that carry the credential (and API version) for this upstream."""
        raise NotImplementedError

    def _get_client(self) -> Client:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self._client = self.outbound.client(limit=1000, keepalive_s=30, tls=self._tls)
            self._proxy = self.outbound.proxy_for(self.base_url)
            self._loop = loop
        return self._client

    def _url(self, url: str) -> URL:
        """One of this deployment's URLs, parsed once (a configured path may hold any character)."""
        parsed = self._urls.get(url)
        if parsed is None:
            parsed = self._urls[url] = URL(url)
        return parsed

    def _request_headers(self) -> dict[str, str]:
        if self._headers is None:
            self._secret = self._read_secret()
            extra = {**(self.config.options.get("headers") or {}), **self._secret_headers()}
            headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT, **extra,
                       **self.auth_headers(self._secret)}
            try:
                self._head = header_lines(headers)
            except ValueError as exc:
                raise ConfigError(f"deployment {self.deployment}: {exc}", fix="remove line breaks from its headers "
                                  "and credential, and the headers Keel writes itself (Host, Content-Length, "
                                  "Transfer-Encoding, Connection)", deployment=self.deployment) from None
            self._headers = headers
        return self._headers

    def _secret_headers(self) -> dict[str, str]:
        """`options.secret_headers` ({header: vault secret name}) with their values: global secrets that serve
        `http_header`, read like the credential; their values are scrubbed from every error like it."""
        named = self.config.options.get("secret_headers") or {}
        if not isinstance(named, dict) or not all(isinstance(v, str) and v for v in named.values()):
            raise ConfigError(f"deployment {self.deployment}: options.secret_headers must map header names to "
                              "vault secret names", fix="write secret_headers: {X-Header: secret-name}",
                              deployment=self.deployment)
        if named and self.ctx.get_header_secret is None:
            raise ConfigError(f"deployment {self.deployment}: this Keel has no vault for secret_headers",
                              fix="remove options.secret_headers", deployment=self.deployment)
        values = {}
        for header, name in named.items():
            try:
                values[header] = self.ctx.get_header_secret(name)  # type: ignore[misc]
            except KeelError as exc:  # missing, or not a global http_header secret: the deployment's mistake
                raise ConfigError(f"deployment {self.deployment}: header secret {name!r}: {exc.detail}",
                                  fix=exc.fix or f"keel secrets set {name} --use http_header",
                                  deployment=self.deployment) from None
            except Exception as exc:  # a foreign vault error becomes a config error, without its text
                raise ConfigError(f"header secret {name!r} of deployment {self.deployment} could not be read "
                                  f"({type(exc).__name__})", fix=f"store it: keel secrets set {name} --use "
                                  "http_header", deployment=self.deployment) from None
        self._hidden = tuple(v for v in values.values() if v)
        return values

    def _read_secret(self) -> str | None:
        name = self.config.credential
        if not name:
            return None
        try:
            return self.ctx.get_secret(name)
        except KeelError:
            raise
        except Exception as exc:  # a foreign vault error becomes a config error, without its text
            raise ConfigError(f"credential {name!r} of deployment {self.deployment} could not be read "
                              f"({type(exc).__name__})", fix=f"store it: keel secrets set {name}",
                              deployment=self.deployment) from None

    def _fail(self, status: int | None, message: str, *, timeout: bool = False,
              retry_after: float | None = None) -> KeelError:
        for hidden in (self._secret, *self._hidden):
            if hidden:
                message = message.replace(hidden, "***")
        return upstream_error(status, message, self.deployment, timeout=timeout, retry_after=retry_after)

    def _malformed(self, what: str) -> KeelError:
        return self._fail(None, f"malformed upstream response: {what}")

    def _status_error(self, resp: Response, raw: bytes) -> KeelError:
        return self._fail(resp.status, error_message(raw), retry_after=parse_retry_after(resp.headers))

    def _client_error(self, exc: WireError) -> KeelError:
        """The wire's error as the most specific upstream error: an answer that is not HTTP it can read is
        malformed, the rest (refused, reset, TLS, a proxy that said no, a body cut short) a connection error."""
        if isinstance(exc, MalformedAnswer):
            return self._malformed(str(exc))
        return self._fail(None, f"connection error ({type(exc).__name__}): {exc}")

    async def _send(self, url: str, body: dict[str, Any]) -> Response:
        client = self._get_client()
        self._request_headers()
        return await client.request("POST", self._url(url), head=self._head, body=orjson.dumps(body),
                                    proxy=self._proxy)

    async def _post_json(self, url: str, body: dict[str, Any]) -> Any:
        """POST a JSON body and return the decoded JSON answer; every failure becomes a Keel error."""
        try:
            async with asyncio.timeout(self.config.timeout_s):  # one bound on the whole call
                resp = await self._send(url, body)
                raw = await resp.read()
        except TimeoutError:
            raise self._fail(None, "", timeout=True) from None
        except WireError as exc:
            raise self._client_error(exc) from None
        if resp.status >= 400:
            raise self._status_error(resp, raw)
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise self._malformed(f"not JSON ({exc})") from None

    @asynccontextmanager
    async def _open_stream(self, url: str, body: dict[str, Any]) -> AsyncIterator[AsyncIterator[list[bytes]]]:
        """POST a streaming request and yield its SSE batches; errors raised while reading them inside the
        block are translated here.

        Leaving the block early (the consumer closed the stream) closes the connection, which stops
        the upstream's work; a stream read to its end returns the connection to the pool.
        """
        resp = batches = None
        try:
            # Connection and status within timeout_s; then the same bound on each silence, none on the whole.
            async with asyncio.timeout(self.config.timeout_s):
                resp = await self._send(url, body)
                if resp.status >= 400:
                    raise self._status_error(resp, await resp.read())
            batches = sse_batches(resp, self.config.timeout_s)
            yield batches
            await self._drain(resp)
        except TimeoutError:
            raise self._fail(None, "", timeout=True) from None
        except WireError as exc:
            raise self._client_error(exc) from None
        except PARSE_ERRORS as exc:
            raise self._malformed(f"{type(exc).__name__}: {exc}") from None
        finally:
            if batches is not None:
                await batches.aclose()
            if resp is not None:
                resp.close()  # a body not read to its end closes its connection; a whole one went back to the pool

    @staticmethod
    async def _drain(resp: Response) -> None:
        """Read to the end of the body (servers end it right after the last event) so keep-alive works."""
        try:
            async with asyncio.timeout(DRAIN_S):
                await resp.read()
        except (TimeoutError, WireError):
            return  # every event arrived; the caller's finally closes this connection instead of reusing it

    def count_tokens(self, messages: list[dict[str, Any]]) -> int:
        """The prompt's tokens (`keel.gateway.providers.token_count`): with `options.tokenizer`, the model's
        own tokenizer for text; media never count as zero."""
        if self._encode is None:
            path = self.config.options.get("tokenizer")
            self._encode = load_tokenizer(str(path), f"deployment {self.deployment}") if path else False
        return estimate_tokens(messages, self._encode) if self._encode else estimate_tokens(messages)

    async def close(self) -> None:
        """Close the client; safe to call twice. That of a finished event loop can only be dropped."""
        client, self._client = self._client, None
        if client is not None and self._loop is asyncio.get_running_loop():
            await client.close()


class OpenAICompatibleProvider(HTTPProvider):
    """Calls `{base_url}/chat/completions` and `{base_url}/embeddings` with a bearer key from the vault.

    >>> p = OpenAICompatibleProvider(DeploymentConfig(alias="gpt", provider="openai_compatible",
    ...     model="gpt-4o-mini", credential="openai"), ProviderContext(get_secret=vault.get))
    """

    name: ClassVar[str] = "openai_compatible"
    supports_tools: ClassVar[bool] = True
    supports_json_mode: ClassVar[bool] = True
    can_stream: ClassVar[bool] = True
    can_embed: ClassVar[bool] = True
    default_base_url: ClassVar[str] = "https://api.openai.com/v1"

    def __init__(self, config: DeploymentConfig, ctx: ProviderContext) -> None:
        super().__init__(config, ctx)
        self.chat_url = f"{self.base_url}/chat/completions"  # a kind with other paths (Azure) sets its own
        self.embed_url = f"{self.base_url}/embeddings"

    def auth_headers(self, secret: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {secret}"} if secret else {}

    def _body(self, req: ChatRequest, stream: bool) -> dict[str, Any]:
        """The client's JSON (unknown params pass through), with our model and the typed fields on top."""
        body = dict(req.body)
        body.pop("keel", None)  # Keel-only options never go upstream
        body["model"] = self.config.model or req.model
        body["messages"] = req.messages
        for key in _TYPED_FIELDS:
            value = getattr(req, key)
            if value is not None:
                body["max_completion_tokens" if key == "max_tokens" and "max_completion_tokens" in body
                     else key] = value
        body["stream"] = stream
        if stream:
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        else:
            body.pop("stream_options", None)
        return body

    async def chat(self, req: ChatRequest) -> ChatResult:
        data = await self._post_json(self.chat_url, self._body(req, False))
        try:
            if isinstance(data, dict) and data.get("error"):
                raise self._fail(None, message_of(data))
            choice = data["choices"][0]
            msg = choice["message"]
            content = msg.get("content")
            usage = data.get("usage")
            if usage:
                counted = usage_of(usage)
            else:
                counted = Usage(estimate_tokens(req.messages), math.ceil(len(content or "") / 4))
            return ChatResult(content=content, finish_reason=choice.get("finish_reason") or "stop", usage=counted,
                              tool_calls=msg.get("tool_calls") or None, model=data.get("model") or self.config.model)
        except PARSE_ERRORS as exc:
            raise self._malformed(f"{type(exc).__name__}: {exc}") from None

    def stream(self, req: ChatRequest) -> AsyncIterator[ChatDelta]:
        return self._stream(self._body(req, True))

    async def _stream(self, body: dict[str, Any]) -> AsyncIterator[ChatDelta]:
        finished = done = False
        async with self._open_stream(self.chat_url, body) as batches:
            async for batch in batches:
                deltas, error = [], None
                for data in batch:
                    if data == b"[DONE]":
                        done = True
                        break
                    try:
                        delta = self._delta(orjson.loads(data))
                    except (KeelError, *PARSE_ERRORS) as exc:  # raised after the deltas before it
                        error = exc
                        break
                    if delta is not None:
                        finished = finished or delta.finish_reason is not None
                        deltas.append(delta)
                for delta in deltas[:-1]:
                    delta.more = True
                for delta in deltas:
                    yield delta
                if error is not None:
                    raise error
                if done:
                    break
            if not (done or finished):
                raise self._malformed("the stream ended before [DONE]")

    def _delta(self, chunk: dict[str, Any]) -> ChatDelta | None:
        if chunk.get("error"):
            raise self._fail(None, message_of(chunk) or "error event in the stream")
        usage = chunk.get("usage")
        out = ChatDelta(usage=usage_of(usage) if usage else None)
        if choices := chunk.get("choices"):
            delta = choices[0].get("delta") or {}
            out.content = delta.get("content")
            out.role = delta.get("role")
            out.tool_calls = delta.get("tool_calls") or None
            out.finish_reason = choices[0].get("finish_reason")
        if out.content or out.role or out.tool_calls or out.finish_reason or out.usage:
            return out
        return None

    async def embed(self, texts: list[str]) -> EmbedResult:
        data = await self._post_json(self.embed_url, {"model": self.config.model, "input": texts})
        try:
            items = sorted(data["data"], key=lambda item: item.get("index", 0))
            vectors = [item["embedding"] for item in items]
            if len(vectors) != len(texts) or not all(isinstance(v, list) for v in vectors):
                raise ValueError(f"expected {len(texts)} float vectors, got {len(vectors)}")
            usage = data.get("usage") or {}
            tokens = int(usage.get("prompt_tokens") or 0) or sum(math.ceil(len(t) / 4) for t in texts)
            return EmbedResult(vectors=vectors, prompt_tokens=tokens, model=data.get("model") or self.config.model)
        except PARSE_ERRORS as exc:
            raise self._malformed(f"{type(exc).__name__}: {exc}") from None
