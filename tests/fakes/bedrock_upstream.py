"""A fake AWS Bedrock runtime: the Converse API (`POST /model/{modelId}/converse` and `/converse-stream`).

Every request must carry a valid AWS Signature Version 4 for service `bedrock` — checked here with an
implementation written from AWS's published algorithm (canonical request, string to sign, HMAC key chain),
independent of the botocore signer Keel uses — or, when `api_key` is set, `Authorization: Bearer <api_key>`.
Streams use AWS's binary event stream framing (prelude, typed headers, payload, CRC32s) written here from
its specification; errors are JSON `{"message"}` with `x-amzn-ErrorType`, and in a stream an `exception`
message. It validates like the real API (alternating roles, each toolUse answered by a toolResult, tool
blocks only with a toolConfig). `base_url` is `url`. Faults: see `tests/fakes/__init__.py`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import struct
import zlib
from typing import Any
from urllib.parse import quote

import orjson
from aiohttp import web

from tests.fakes import FakeUpstream, estimate, sample_args, words_of

ERROR_TYPES = {400: "ValidationException", 403: "AccessDeniedException", 404: "ResourceNotFoundException",
               408: "ModelTimeoutException", 424: "ModelErrorException", 429: "ThrottlingException",
               500: "InternalServerException", 503: "ServiceUnavailableException"}


def frame(headers: dict[str, str], payload: bytes) -> bytes:
    """One event stream message: string headers (type 7), the payload, and the prelude and message CRC32s."""
    raw = b"".join(struct.pack(">B", len(k)) + k.encode() + b"\x07" + struct.pack(">H", len(v.encode())) + v.encode()
                   for k, v in headers.items())
    prelude = struct.pack(">II", 16 + len(raw) + len(payload), len(raw))
    head = prelude + struct.pack(">I", zlib.crc32(prelude))
    body = head + raw + payload
    return body + struct.pack(">I", zlib.crc32(body))


def event(kind: str, payload: dict[str, Any]) -> bytes:
    return frame({":event-type": kind, ":content-type": "application/json", ":message-type": "event"},
                 orjson.dumps({**payload, "p": "abcdefgh"}))  # Bedrock pads events with a `p` field


def exception(kind: str, message: str) -> bytes:
    return frame({":exception-type": kind, ":content-type": "application/json", ":message-type": "exception"},
                 orjson.dumps({"message": message}))


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def sigv4_problem(request: web.Request, body: bytes, access_key: str, secret_key: str,
                  service: str = "bedrock") -> str | None:
    """Why the request's SigV4 signature is not valid for these credentials, or None when it is."""
    auth = request.headers.get("Authorization", "")
    if not auth.startswith("AWS4-HMAC-SHA256 "):
        return "Authorization header requires AWS4-HMAC-SHA256"
    fields = dict(part.strip().split("=", 1) for part in auth[len("AWS4-HMAC-SHA256 "):].split(","))
    key_id, date, region, svc, term = fields["Credential"].split("/")
    if key_id != access_key:
        return "The security token included in the request is invalid."
    if svc != service or term != "aws4_request":
        return f"Credential should be scoped to correct service: '{service}'."
    amz_date = request.headers.get("X-Amz-Date", "")
    signed = fields["SignedHeaders"].split(";")
    if "host" not in signed or not amz_date.startswith(date):
        return "the host header and X-Amz-Date must be signed"
    canonical_headers = "".join(f"{name}:{' '.join(request.headers.get(name, '').split())}\n" for name in signed)
    canonical = "\n".join(["POST", quote(request.raw_path.split("?")[0], safe="/~"), request.query_string,
                           canonical_headers, fields["SignedHeaders"], hashlib.sha256(body).hexdigest()])
    scope = f"{date}/{region}/{service}/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = _hmac(_hmac(_hmac(_hmac(f"AWS4{secret_key}".encode(), date), region), service), "aws4_request")
    if not hmac.compare_digest(hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest(), fields["Signature"]):
        return ("The request signature we calculated does not match the signature you provided. Check your AWS "
                "Secret Access Key and signing method.")
    return None


def validate(body: dict[str, Any]) -> str | None:
    """The ValidationException message the real API would give, or None for a valid request."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "The model returned the following errors: messages: at least one message is required"
    pending: set[str] = set()
    has_tools = bool((body.get("toolConfig") or {}).get("tools"))
    for i, m in enumerate(messages):
        if m.get("role") != ("user" if i % 2 == 0 else "assistant"):
            return "A conversation must alternate between user and assistant roles."
        content = m.get("content")
        if not isinstance(content, list) or not content:
            return f"messages.{i}.content: must not be empty"
        results = {b["toolResult"]["toolUseId"] for b in content if "toolResult" in b}
        if results != pending:
            return ("Expected toolResult blocks at messages.%d.content for the following Ids: %s"
                    % (i, ", ".join(sorted(pending))))
        pending = {b["toolUse"]["toolUseId"] for b in content if "toolUse" in b}
        if (pending or results) and not has_tools:
            return "The toolConfig field must be defined when using toolUse and toolResult content blocks."
    if pending:
        return "the last assistant toolUse has no toolResult"
    for tool in (body.get("toolConfig") or {}).get("tools") or ():
        spec = tool.get("toolSpec") or {}
        if not spec.get("name") or not isinstance((spec.get("inputSchema") or {}).get("json"), dict):
            return "toolConfig.tools: each toolSpec needs a name and inputSchema.json"
    return None


class FakeBedrock(FakeUpstream):
    """Bedrock runtime fake for the Converse API; `access_key`/`secret_key` are the credentials it accepts."""

    def __init__(self, *, access_key: str = "AKIAFAKE", secret_key: str = "fake-secret", region: str = "us-east-1",
                 **kw: Any) -> None:
        super().__init__(**kw)
        self.access_key, self.secret_key, self.region = access_key, secret_key, region

    def routes(self, router: web.UrlDispatcher) -> None:
        # A model id may be an ARN with "/" in it, sent percent-encoded: matched on the decoded path.
        router.add_post("/model/{model:.+}/converse", self.converse)
        router.add_post("/model/{model:.+}/converse-stream", self.converse)

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        return {"message": message}

    def error_response(self, status: int, message: str) -> web.Response:
        kind = ERROR_TYPES.get(status, "InternalServerException")
        return self.json(self.error_body(status, message), status, {"x-amzn-ErrorType": f"{kind}:http://internal"})

    def error_event(self) -> bytes:
        return exception("serviceUnavailableException", "Bedrock is unable to process your request.")

    def check_auth(self, request: web.Request) -> web.Response | None:
        return None  # checked in `converse`, which has the raw body the signature covers

    async def _early_fault(self, request: web.Request, fault: str | None, stream: bool) -> web.StreamResponse | None:
        return await super()._early_fault(request, fault, request.path.endswith("/converse-stream"))

    async def converse(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        if self.api_key and request.headers.get("Authorization") == f"Bearer {self.api_key}":
            problem = None
        else:
            problem = sigv4_problem(request, raw, self.access_key, self.secret_key)
        body, fault, early = await self.prelude(request)
        if problem:
            return self.json({"message": problem}, 403, {"x-amzn-ErrorType": "UnrecognizedClientException:"})
        if early is not None:
            return early
        if problem := validate(body):
            return self.error_response(400, problem)
        blocks, stop = self.answer(body)
        usage = {"inputTokens": estimate([body.get("system"), body["messages"]]),
                 "outputTokens": sum(len(words_of(b["text"])) if "text" in b else 3 for b in blocks)}
        usage["totalTokens"] = usage["inputTokens"] + usage["outputTokens"]
        if not request.path.endswith("/converse-stream"):
            return self.json({"output": {"message": {"role": "assistant", "content": blocks}}, "stopReason": stop,
                              "usage": usage, "metrics": {"latencyMs": 12}})
        return await self.send_stream(request, self.events(blocks, stop, usage, fault), fault)

    def answer(self, body: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
        last = body["messages"][-1]["content"]
        results = [b["toolResult"] for b in last if "toolResult" in b]
        config = body.get("toolConfig") or {}
        choice = config.get("toolChoice") or {}
        if results:
            first = results[0]["content"][0]
            words = words_of(f"The tool said: {first.get('text') or orjson.dumps(first.get('json')).decode()}")
        elif config.get("tools"):
            specs = [t["toolSpec"] for t in config["tools"]]
            spec = next((s for s in specs if s["name"] == (choice.get("tool") or {}).get("name")), specs[0])
            return [{"text": "Let me check."}, {"toolUse": {"toolUseId": "tooluse_fake_1", "name": spec["name"],
                                                            "input": sample_args(spec["inputSchema"]["json"])}}], \
                "tool_use"
        else:
            words = self.words
        text = "".join(words)
        for stop in (body.get("inferenceConfig") or {}).get("stopSequences") or ():
            if stop in text:
                return [{"text": text[:text.index(stop)]}], "stop_sequence"
        limit = (body.get("inferenceConfig") or {}).get("maxTokens")
        if isinstance(limit, int) and limit < len(words):
            return [{"text": "".join(words[:limit])}], "max_tokens"
        return [{"text": text}], "end_turn"

    @staticmethod
    def events(blocks: list[dict[str, Any]], stop: str, usage: dict[str, Any], fault: str | None) -> list[bytes]:
        events = [event("messageStart", {"role": "assistant"})]
        for i, block in enumerate(blocks):
            if "text" in block:
                events += [event("contentBlockDelta", {"contentBlockIndex": i, "delta": {"text": w}})
                           for w in words_of(block["text"])]
            else:
                use = block["toolUse"]
                events.append(event("contentBlockStart", {"contentBlockIndex": i, "start": {"toolUse": {
                    "toolUseId": use["toolUseId"], "name": use["name"]}}}))
                raw = orjson.dumps(use["input"]).decode()
                events += [event("contentBlockDelta", {"contentBlockIndex": i, "delta": {"toolUse": {"input": part}}})
                           for part in (raw[:len(raw) // 2], raw[len(raw) // 2:])]
            events.append(event("contentBlockStop", {"contentBlockIndex": i}))
        if fault == "no-done":
            return events
        events.append(event("messageStop", {"stopReason": stop}))
        events.append(event("metadata", {"usage": usage, "metrics": {"latencyMs": 12}}))
        return events

    async def send_stream(self, request: web.Request, events: list[bytes], fault: str | None) -> web.StreamResponse:
        """Write event stream messages one by one, playing a mid-stream fault after the second."""
        resp = web.StreamResponse(headers={"Content-Type": "application/vnd.amazon.eventstream"})
        await resp.prepare(request)
        try:
            for i, message in enumerate(events):
                if i == 2 and fault in ("reset", "hang-mid", "malformed", "error-event"):
                    if fault == "reset":
                        request.transport.abort()
                        return resp
                    if fault == "hang-mid":
                        await self.hang()
                    bad = message[:-4] + b"\0\0\0\0"  # a message whose CRC does not match
                    await resp.write(bad if fault == "malformed" else self.error_event())
                    break
                await resp.write(message)
                if self.chunk_delay:
                    await asyncio.sleep(self.chunk_delay)
            await resp.write_eof()
        except ConnectionResetError:
            self.disconnects += 1
        return resp


if __name__ == "__main__":
    FakeBedrock.main()
