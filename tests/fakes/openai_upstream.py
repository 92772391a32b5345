"""A fast fake OpenAI-compatible upstream: chat completions (JSON and SSE, tools, usage), embeddings, models.

`python -m tests.fakes.openai_upstream --port 9100 --latency-ms 20` serves `http://127.0.0.1:9100/v1`.
Faults and control endpoints are described in `tests/fakes/__init__.py`.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import orjson
from aiohttp import web

from tests.fakes import FakeUpstream, estimate, sample_args, words_of

CHAT_ID = "chatcmpl-fake"
CREATED = 1700000000
ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
               429: "requests"}


def vector(text: str, dims: int) -> list[float]:
    """A deterministic unit vector for a text, so equal texts embed equally."""
    raw = hashlib.shake_128(text.encode()).digest(dims)
    values = [b / 255 - 0.5 for b in raw]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


class FakeOpenAI(FakeUpstream):
    """OpenAI-compatible fake: `/v1/chat/completions`, `/v1/embeddings`, `/v1/models`."""

    base_path = "/v1"

    def __init__(self, *, dims: int = 8, **kw: Any) -> None:
        super().__init__(**kw)
        self.dims = dims
        self._chunks: dict[tuple[str, str], bytes] = {}

    def routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/v1/chat/completions", self.chat)
        router.add_post("/v1/embeddings", self.embeddings)
        router.add_get("/v1/models", self.models)

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"),
                          "param": None, "code": None}}

    def error_event(self) -> bytes:
        return b'data: {"error": {"message": "fake upstream failed mid-stream", "type": "server_error"}}\n\n'

    def check_auth(self, request: web.Request) -> web.Response | None:
        given = request.headers.get("Authorization", "")
        if self.api_key and given != f"Bearer {self.api_key}":
            # Like OpenAI, the message echoes the key it got: the provider must scrub it.
            return self.error_response(401, f"Incorrect API key provided: {given.removeprefix('Bearer ')}")
        return None

    def answer(self, body: dict[str, Any]) -> tuple[list[str], dict[str, Any] | None, str]:
        """(text pieces, tool call or None, finish_reason) for a request."""
        messages = body["messages"]
        last = messages[-1] if isinstance(messages[-1], dict) else {}
        tools, choice = body.get("tools"), body.get("tool_choice")
        fmt = (body.get("response_format") or {}).get("type")
        if last.get("role") == "tool":
            words = words_of(f"The tool said: {last.get('content')}")
        elif tools and choice != "none":
            name = choice["function"]["name"] if isinstance(choice, dict) else tools[0]["function"]["name"]
            schema = next((t["function"].get("parameters") for t in tools if t["function"]["name"] == name), None)
            arguments = orjson.dumps(sample_args(schema)).decode()
            call = {"id": "call_fake_1", "type": "function", "function": {"name": name, "arguments": arguments}}
            return [], call, "tool_calls"
        elif fmt in ("json_object", "json_schema"):
            words = ['{"answer": ', '"fake"}']
        else:
            words = self.words
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        if isinstance(limit, int) and 0 < limit < len(words):
            return words[:limit], None, "length"
        return words, None, "stop"

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body, fault, early = await self.prelude(request)
        if early is not None:
            return early
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            return self.error_response(400, "'messages' is a required property and must not be empty")
        model = str(body.get("model") or "fake-model")
        words, call, finish = self.answer(body)
        completion = len(words) if call is None else max(1, len(call["function"]["arguments"]) // 4)
        prompt = estimate(body["messages"])
        usage = None if fault == "no-usage" else {
            "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        if body.get("stream"):
            include_usage = (body.get("stream_options") or {}).get("include_usage")
            events = self.events(model, words, call, finish, usage if include_usage else None, fault)
            return await self.send_events(request, events, fault)
        message = {"role": "assistant", "content": None if call else "".join(words), "refusal": None}
        if call:
            message["tool_calls"] = [call]
        doc: dict[str, Any] = {"id": CHAT_ID, "object": "chat.completion", "created": CREATED, "model": model,
                               "choices": [{"index": 0, "message": message, "logprobs": None,
                                            "finish_reason": finish}], "system_fingerprint": "fake"}
        if usage:
            doc["usage"] = usage
        return self.json(doc)

    def chunk(self, model: str, delta: dict[str, Any] | None = None, finish: str | None = None,
              usage: dict[str, Any] | None = None) -> bytes:
        choices = [] if usage else [{"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}]
        doc = {"id": CHAT_ID, "object": "chat.completion.chunk", "created": CREATED, "model": model,
               "choices": choices}
        if usage:
            doc["usage"] = usage
        return b"data: " + orjson.dumps(doc) + b"\n\n"

    def text_chunk(self, model: str, piece: str) -> bytes:
        """A content chunk, cached: the benchmark's stream is the same bytes every time."""
        out = self._chunks.get((model, piece))
        if out is None:
            out = self.chunk(model, {"content": piece})
            if len(self._chunks) < 10_000:
                self._chunks[(model, piece)] = out
        return out

    def events(self, model: str, words: list[str], call: dict[str, Any] | None, finish: str,
               usage: dict[str, Any] | None, fault: str | None) -> list[bytes]:
        events = [self.chunk(model, {"role": "assistant", "content": ""})]
        if call:
            args = call["function"]["arguments"]
            half = len(args) // 2
            events.append(self.chunk(model, {"tool_calls": [{"index": 0, "id": call["id"], "type": "function",
                                                             "function": {"name": call["function"]["name"],
                                                                          "arguments": ""}}]}))
            events += [self.chunk(model, {"tool_calls": [{"index": 0, "function": {"arguments": part}}]})
                       for part in (args[:half], args[half:])]
        else:
            events += [self.text_chunk(model, w) for w in words]
        if fault == "no-done":
            return events
        events.append(self.chunk(model, {}, finish))
        if usage:
            events.append(self.chunk(model, usage=usage))
        events.append(b"data: [DONE]\n\n")
        return events

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        body, _fault, early = await self.prelude(request)
        if early is not None:
            return early
        inputs = body.get("input")
        inputs = [inputs] if isinstance(inputs, str) else inputs
        if not isinstance(inputs, list) or not inputs or not all(isinstance(t, str) for t in inputs):
            return self.error_response(400, "'input' must be a string or a non-empty list of strings")
        tokens = sum(max(1, len(t) // 4) for t in inputs)
        return self.json({"object": "list", "model": body.get("model") or "fake-embed",
                          "data": [{"object": "embedding", "index": i, "embedding": vector(t, self.dims)}
                                   for i, t in enumerate(inputs)],
                          "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def models(self, _request: web.Request) -> web.Response:
        return self.json({"object": "list", "data": [{"id": "fake-model", "object": "model", "created": CREATED,
                                                      "owned_by": "fake"}]})


if __name__ == "__main__":
    FakeOpenAI.main()
