"""A fake Anthropic Messages API: `/v1/messages` as JSON and as SSE events, with tools and usage.

It validates requests the way the real API does (required `max_tokens` and `anthropic-version`, no
`system` role, alternating roles, every `tool_use` answered by a `tool_result`), so translation bugs
show up as 400s. `python -m tests.fakes.anthropic_upstream --port N`; faults: see `tests/fakes/__init__.py`.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from tests.fakes import FakeUpstream, estimate, sample_args, words_of

MSG_ID = "msg_fake"
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 529: "overloaded_error"}
BLOCK_TYPES = ("text", "image", "tool_use", "tool_result")


def _blocks(content: Any) -> list[dict[str, Any]]:
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


def validate(body: dict[str, Any]) -> str | None:
    """The error message the real API would give, or None for a valid request."""
    if not isinstance(body.get("model"), str):
        return "model: Field required"
    if not isinstance(body.get("max_tokens"), int) or body["max_tokens"] < 1:
        return "max_tokens: Field required"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages: at least one message is required"
    expected_results: set[str] = set()
    for i, m in enumerate(messages):
        role = m.get("role")
        if role not in ("user", "assistant"):
            return (f'messages.{i}.role: Unexpected role "{role}". The Messages API accepts a top-level '
                    "`system` parameter, not \"system\" as an input message role.")
        if role != ("user" if i % 2 == 0 else "assistant"):
            return "messages: roles must alternate between \"user\" and \"assistant\", starting with \"user\""
        blocks = _blocks(m.get("content"))
        if not isinstance(blocks, list) or not blocks:
            return f"messages.{i}: all messages must have non-empty content"
        for b in blocks:
            if b.get("type") not in BLOCK_TYPES or (b["type"] == "text" and not b.get("text")):
                return f"messages.{i}.content: blocks must be non-empty text, image, tool_use or tool_result"
        results = {b.get("tool_use_id") for b in blocks if b["type"] == "tool_result"}
        if results != expected_results:
            return (f"messages.{i}: `tool_use` ids were found without `tool_result` blocks immediately after "
                    f"(expected {sorted(expected_results)}, got {sorted(results)})")
        expected_results = {b.get("id") for b in blocks if b["type"] == "tool_use"}
    if expected_results:
        return "messages: the last assistant `tool_use` has no `tool_result`"
    for tool in body.get("tools") or ():
        if not tool.get("name") or not isinstance(tool.get("input_schema"), dict):
            return "tools: each tool needs a name and an input_schema"
    if body.get("tool_choice") and body["tool_choice"].get("type") not in ("auto", "any", "tool", "none"):
        return "tool_choice.type: must be auto, any, tool or none"
    return None


class FakeAnthropic(FakeUpstream):
    """Anthropic Messages API fake: `POST /v1/messages` (base_url is the server root)."""

    def routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/v1/messages", self.messages)

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        return {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message}}

    def error_event(self) -> bytes:
        return self.sse({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})

    def check_auth(self, request: web.Request) -> web.Response | None:
        if self.api_key and request.headers.get("x-api-key") != self.api_key:
            return self.error_response(401, "invalid x-api-key")
        if not request.headers.get("anthropic-version"):
            return self.error_response(400, "anthropic-version: header is required")
        return None

    @staticmethod
    def sse(doc: dict[str, Any]) -> bytes:
        return b"event: " + doc["type"].encode() + b"\ndata: " + orjson.dumps(doc) + b"\n\n"

    def answer(self, body: dict[str, Any]) -> tuple[list[dict[str, Any]], str, str | None]:
        """(content blocks, stop_reason, stop_sequence) for a request."""
        last = _blocks(body["messages"][-1]["content"])
        results = [b for b in last if b["type"] == "tool_result"]
        tools, choice = body.get("tools"), body.get("tool_choice") or {}
        if results:
            content = results[0].get("content")
            text = content if isinstance(content, str) else "".join(b.get("text", "") for b in content or ())
            words = words_of(f"The tool said: {text}")
        elif tools and choice.get("type") != "none":
            tool = next((t for t in tools if t["name"] == choice.get("name")), tools[0])
            return [{"type": "text", "text": "Let me check."},
                    {"type": "tool_use", "id": "toolu_fake_1", "name": tool["name"],
                     "input": sample_args(tool["input_schema"])}], "tool_use", None
        else:
            words = self.words
        text = "".join(words)
        for stop in body.get("stop_sequences") or ():
            if stop in text:
                return [{"type": "text", "text": text[:text.index(stop)]}], "stop_sequence", stop
        if len(words) > body["max_tokens"]:
            return [{"type": "text", "text": "".join(words[:body["max_tokens"]])}], "max_tokens", None
        return [{"type": "text", "text": text}], "end_turn", None

    async def messages(self, request: web.Request) -> web.StreamResponse:
        body, fault, early = await self.prelude(request)
        if early is not None:
            return early
        if problem := validate(body):
            return self.error_response(400, problem)
        blocks, stop_reason, stop_sequence = self.answer(body)
        usage = {"input_tokens": estimate([body.get("system"), body["messages"]]),
                 "output_tokens": sum(len(words_of(b["text"])) if b["type"] == "text"
                                      else len(orjson.dumps(b["input"])) // 4 + 1 for b in blocks)}
        message = {"id": MSG_ID, "type": "message", "role": "assistant", "model": body["model"],
                   "content": blocks, "stop_reason": stop_reason, "stop_sequence": stop_sequence, "usage": usage}
        if not body.get("stream"):
            return self.json(message)
        return await self.send_events(request, self.events(message, fault), fault)

    def events(self, message: dict[str, Any], fault: str | None) -> list[bytes]:
        start = {**message, "content": [], "stop_reason": None, "stop_sequence": None,
                 "usage": {"input_tokens": message["usage"]["input_tokens"], "output_tokens": 1}}
        events = [self.sse({"type": "message_start", "message": start})]
        for i, block in enumerate(message["content"]):
            if block["type"] == "text":
                first = {"type": "text", "text": ""}
                deltas = [{"type": "text_delta", "text": w} for w in words_of(block["text"])]
            else:
                first = {**block, "input": {}}
                raw = orjson.dumps(block["input"]).decode()
                deltas = [{"type": "input_json_delta", "partial_json": part}
                          for part in (raw[:len(raw) // 2], raw[len(raw) // 2:])]
            events.append(self.sse({"type": "content_block_start", "index": i, "content_block": first}))
            if i == 0:
                events.append(self.sse({"type": "ping"}))
            events += [self.sse({"type": "content_block_delta", "index": i, "delta": d}) for d in deltas]
            events.append(self.sse({"type": "content_block_stop", "index": i}))
        if fault == "no-done":
            return events
        events.append(self.sse({"type": "message_delta", "delta": {"stop_reason": message["stop_reason"],
                                                                   "stop_sequence": message["stop_sequence"]},
                                "usage": {"output_tokens": message["usage"]["output_tokens"]}}))
        events.append(self.sse({"type": "message_stop"}))
        return events


if __name__ == "__main__":
    FakeAnthropic.main()
