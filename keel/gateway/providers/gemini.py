"""Google Gemini (the Generative Language API): `models/{model}:generateContent`, `:streamGenerateContent?alt=sse`
and `:batchEmbedContents`, with the API key in `x-goog-api-key` from the vault; OpenAI shapes in and out.

Translation: system and developer messages become `systemInstruction`; assistant turns are role `model`
with `functionCall` parts; tool results are `functionResponse` parts (named after the call they answer);
tools are `functionDeclarations` with their JSON Schema as `parametersJsonSchema`; JSON mode is
`responseMimeType: application/json` (with `responseJsonSchema` for a schema). A 429's `RetryInfo.retryDelay`
is its Retry-After.

>>> p = GeminiProvider(DeploymentConfig(alias="gemini", provider="gemini", model="gemini-2.5-flash",
...     credential="google"), ProviderContext(get_secret=vault.get))
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Any, ClassVar
from urllib.parse import quote

import orjson

from keel.core.errors import BadRequest, KeelError, NotSupported
from keel.core.http1 import Response
from keel.core.settings import DeploymentConfig
from keel.gateway.protocol import ChatDelta, ChatRequest, ChatResult, EmbedResult, ProviderContext, Usage
from keel.gateway.providers.openai_compatible import (
    PARSE_ERRORS, HTTPProvider, error_message, estimate_tokens, parse_retry_after,
)

FINISH = {"STOP": "stop", "MAX_TOKENS": "length", "SAFETY": "content_filter", "RECITATION": "content_filter",
          "BLOCKLIST": "content_filter", "PROHIBITED_CONTENT": "content_filter", "SPII": "content_filter",
          "IMAGE_SAFETY": "content_filter"}
MODES = {"auto": "AUTO", "none": "NONE", "required": "ANY"}


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(p.get("text") or "" for p in content if isinstance(p, dict) and p.get("type") == "text")
    return content or ""


def _parts(content: Any) -> list[dict[str, Any]]:
    """OpenAI content → Gemini parts: text, and images given inline as data: URLs or by URI."""
    if not isinstance(content, list):
        return [{"text": content}] if content else []
    parts = []
    for part in content:
        kind = part.get("type")
        if kind == "text":
            if part.get("text"):
                parts.append({"text": part["text"]})
        elif kind == "image_url":
            url = part["image_url"]["url"]
            if url.startswith("data:"):
                header, _, data = url.partition(",")
                parts.append({"inlineData": {"mimeType": header[5:].split(";")[0], "data": data}})
            else:
                parts.append({"fileData": {"fileUri": url}})
        else:
            raise NotSupported(f"message part type {kind!r} is not supported by the gemini provider",
                               fix="send text or image_url parts")
    return parts


def _response(content: Any) -> dict[str, Any]:
    """A tool result as the object `functionResponse.response` must be: its JSON object, or {"result": text}."""
    text = _text(content)
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return {"result": text}
    return value if isinstance(value, dict) else {"result": value}


def translate_messages(messages: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """OpenAI messages → (system texts, Gemini `contents`); consecutive tool results share one turn."""
    system: list[str] = []
    contents: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # tool_call id → function name, which a functionResponse must carry
    for m in messages:
        role = m.get("role")
        if role in ("system", "developer"):
            system.append(_text(m.get("content")))
        elif role == "assistant":
            parts = _parts(m.get("content"))
            for call in m.get("tool_calls") or ():
                fn = call["function"]
                names[call.get("id") or ""] = fn["name"]
                raw = fn.get("arguments") or "{}"
                try:
                    args = raw if isinstance(raw, dict) else orjson.loads(raw)
                except orjson.JSONDecodeError:
                    raise BadRequest("an assistant tool_call has arguments that are not valid JSON",
                                     fix="send the function arguments as a JSON object string") from None
                parts.append({"functionCall": {"name": fn["name"], "args": args}})
            if parts:
                contents.append({"role": "model", "parts": parts})
        elif role == "tool":
            name = names.get(m.get("tool_call_id") or "")
            if name is None:
                raise BadRequest(f"a tool message answers tool_call_id {m.get('tool_call_id')!r}, which no "
                                 "assistant message called", fix="send the assistant message with its tool_calls")
            part = {"functionResponse": {"name": name, "response": _response(m.get("content"))}}
            if contents and contents[-1].get("tool"):
                contents[-1]["parts"].append(part)
            else:
                contents.append({"role": "user", "parts": [part], "tool": True})
        elif role == "user":
            parts = _parts(m.get("content"))
            if parts:
                contents.append({"role": "user", "parts": parts})
        else:
            raise BadRequest(f"message role {role!r} is not supported", fix="use system, user, assistant or tool")
    for c in contents:
        c.pop("tool", None)
    return system, contents


def translate_tool_choice(choice: Any) -> dict[str, Any] | None:
    if choice is None:
        return None
    if isinstance(choice, str):
        return {"functionCallingConfig": {"mode": MODES.get(choice, "AUTO")}}
    name = choice["function"]["name"]
    return {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": [name]}}


def usage_of(meta: dict[str, Any] | None) -> Usage | None:
    """`usageMetadata` → Usage; thinking tokens are billed as output, so they count as completion."""
    if not meta:
        return None
    return Usage(int(meta.get("promptTokenCount") or 0),
                 int(meta.get("candidatesTokenCount") or 0) + int(meta.get("thoughtsTokenCount") or 0))


def retry_delay(raw: bytes) -> float | None:
    """Seconds from a Google error's `RetryInfo.retryDelay` ("37s", "1.5s"), or None."""
    try:
        for detail in orjson.loads(raw)["error"].get("details") or ():
            if str(detail.get("@type", "")).endswith("google.rpc.RetryInfo"):
                return float(str(detail["retryDelay"]).removesuffix("s"))
    except (orjson.JSONDecodeError, *PARSE_ERRORS):
        return None
    return None


class GeminiProvider(HTTPProvider):
    """Calls `{base_url}/models/{model}:generateContent` (and the streaming and embedding actions)."""

    name: ClassVar[str] = "gemini"
    supports_tools: ClassVar[bool] = True
    supports_json_mode: ClassVar[bool] = True
    can_stream: ClassVar[bool] = True
    can_embed: ClassVar[bool] = True
    default_base_url: ClassVar[str] = "https://generativelanguage.googleapis.com/v1beta"

    def __init__(self, config: DeploymentConfig, ctx: ProviderContext) -> None:
        super().__init__(config, ctx)
        self.model = (config.model or "gemini-2.5-flash").removeprefix("models/")
        root = f"{self.base_url}/models/{quote(self.model, safe='')}"
        self.chat_url = f"{root}:generateContent"
        self.stream_url = f"{root}:streamGenerateContent?alt=sse"
        self.embed_url = f"{root}:batchEmbedContents"

    def auth_headers(self, secret: str | None) -> dict[str, str]:
        return {"x-goog-api-key": secret} if secret else {}

    def _status_error(self, resp: Response, raw: bytes) -> KeelError:
        wait = parse_retry_after(resp.headers)
        return self._fail(resp.status, error_message(raw), retry_after=retry_delay(raw) if wait is None else wait)

    def _body(self, req: ChatRequest) -> dict[str, Any]:
        try:
            return self._translate(req)
        except PARSE_ERRORS as exc:
            raise BadRequest(f"the request cannot be translated for Gemini ({type(exc).__name__}: {exc})",
                             fix="send OpenAI-shaped messages, tools and tool_choice",
                             deployment=self.deployment) from None

    def _translate(self, req: ChatRequest) -> dict[str, Any]:
        if (req.body.get("n") or 1) > 1:
            raise NotSupported(f"deployment {self.deployment} (gemini) returns one choice only",
                               fix="send n=1 and repeat the request", deployment=self.deployment)
        system, contents = translate_messages(req.messages)
        body: dict[str, Any] = {"contents": contents}
        if system:
            body["systemInstruction"] = {"parts": [{"text": "\n\n".join(system)}]}
        config: dict[str, Any] = {}
        limit = req.max_tokens or req.body.get("max_completion_tokens")
        for key, value in (("maxOutputTokens", limit), ("temperature", req.temperature), ("topP", req.top_p),
                           ("seed", req.seed)):
            if value is not None:
                config[key] = value
        if req.stop:
            config["stopSequences"] = [req.stop] if isinstance(req.stop, str) else list(req.stop)
        fmt = req.response_format or {}
        if fmt.get("type") in ("json_object", "json_schema"):
            config["responseMimeType"] = "application/json"
            if schema := (fmt.get("json_schema") or {}).get("schema"):
                config["responseJsonSchema"] = schema
        if config:
            body["generationConfig"] = config
        if req.tools:
            body["tools"] = [{"functionDeclarations": [
                {k: v for k, v in (("name", t["function"]["name"]), ("description", t["function"].get("description")),
                                   ("parametersJsonSchema", t["function"].get("parameters"))) if v}
                for t in req.tools]}]
        if choice := translate_tool_choice(req.tool_choice):
            body["toolConfig"] = choice
        return body

    def _candidate(self, data: dict[str, Any], calls: int) -> tuple[str, list[dict[str, Any]], str | None]:
        """(text, tool calls, finish_reason or None) of a response's first candidate; `calls` numbers the ids."""
        if data.get("error"):
            err = data["error"]
            raise self._fail(int(err.get("code") or 500), str(err.get("message") or "error event in the stream"))
        candidates = data.get("candidates") or []
        if not candidates:
            blocked = (data.get("promptFeedback") or {}).get("blockReason")
            return "", [], "content_filter" if blocked else None
        cand = candidates[0]
        text, tool_calls = [], []
        for part in (cand.get("content") or {}).get("parts") or ():
            if "text" in part and not part.get("thought"):
                text.append(part["text"])
            elif fc := part.get("functionCall"):
                tool_calls.append({"id": fc.get("id") or f"call_{calls + len(tool_calls)}", "type": "function",
                                   "function": {"name": fc["name"],
                                                "arguments": orjson.dumps(fc.get("args") or {}).decode()}})
        reason = cand.get("finishReason")
        finish = None if reason is None else FINISH.get(reason, "stop")
        return "".join(text), tool_calls, finish

    async def chat(self, req: ChatRequest) -> ChatResult:
        data = await self._post_json(self.chat_url, self._body(req))
        try:
            text, calls, finish = self._candidate(data, 0)
            usage = usage_of(data.get("usageMetadata")) or Usage(estimate_tokens(req.messages),
                                                                 math.ceil(len(text) / 4))
        except PARSE_ERRORS as exc:
            raise self._malformed(f"{type(exc).__name__}: {exc}") from None
        finish = "tool_calls" if calls and finish in (None, "stop") else (finish or "stop")
        return ChatResult(content=text or (None if calls else ""), finish_reason=finish, usage=usage,
                          tool_calls=calls or None, model=data.get("modelVersion") or self.model)

    def stream(self, req: ChatRequest) -> AsyncIterator[ChatDelta]:
        return self._stream(self._body(req))

    async def _stream(self, body: dict[str, Any]) -> AsyncIterator[ChatDelta]:
        calls, usage, finished, first = 0, None, False, True
        async with self._open_stream(self.stream_url, body) as batches:
            async for batch in batches:
                for data in batch:
                    doc = orjson.loads(data)
                    text, tool_calls, finish = self._candidate(doc, calls)
                    usage = usage_of(doc.get("usageMetadata")) or usage
                    delta = ChatDelta(content=text or None, role="assistant" if first else None)
                    if tool_calls:
                        delta.tool_calls = [{"index": calls + i, **c} for i, c in enumerate(tool_calls)]
                        calls += len(tool_calls)
                    if finish is not None:
                        finished = True
                        delta.finish_reason = "tool_calls" if calls and finish == "stop" else finish
                        delta.usage = usage
                    if delta.content or delta.tool_calls or delta.finish_reason or delta.role:
                        first = False
                        yield delta
                    if finished:
                        break
                if finished:
                    break
            if not finished:
                raise self._malformed("the stream ended before a finishReason")

    async def embed(self, texts: list[str]) -> EmbedResult:
        model = f"models/{self.model}"
        data = await self._post_json(self.embed_url, {"requests": [
            {"model": model, "content": {"parts": [{"text": t}]}} for t in texts]})
        try:
            vectors = [item["values"] for item in data["embeddings"]]
            if len(vectors) != len(texts) or not all(isinstance(v, list) for v in vectors):
                raise ValueError(f"expected {len(texts)} float vectors, got {len(vectors)}")
        except PARSE_ERRORS as exc:
            raise self._malformed(f"{type(exc).__name__}: {exc}") from None
        return EmbedResult(vectors=vectors, prompt_tokens=sum(max(1, math.ceil(len(t) / 4)) for t in texts),
                           model=self.model)
