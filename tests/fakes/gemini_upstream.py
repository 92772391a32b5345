"""A fake Google Gemini API (Generative Language, v1beta): `models/{model}:generateContent`,
`:streamGenerateContent?alt=sse` and `:batchEmbedContents`, keyed by `x-goog-api-key`.

It validates requests the way the real API does (roles `user`/`model` only, non-empty parts, a function call
turn answered right after by as many `functionResponse` parts, each naming a declared function), answers with
`candidates`, `finishReason` and `usageMetadata`, and reports errors as `{"error": {code, message, status}}`;
a 429 carries `RetryInfo.retryDelay` in its details as Google's does. `base_url` is `url` (…/v1beta).
Faults: see `tests/fakes/__init__.py`.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from tests.fakes import FakeUpstream, estimate, sample_args, words_of
from tests.fakes.openai_upstream import vector

STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
          429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


def validate(body: dict[str, Any]) -> str | None:
    """The error message the real API would give, or None for a valid request."""
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        return "* GenerateContentRequest.contents: contents is not specified"
    declared = {d.get("name") for t in body.get("tools") or () for d in t.get("functionDeclarations") or ()}
    pending = 0
    for i, c in enumerate(contents):
        if c.get("role") not in ("user", "model"):
            return f"* GenerateContentRequest.contents[{i}].role: Please use a valid role: user, model."
        parts = c.get("parts")
        if not isinstance(parts, list) or not parts:
            return f"* GenerateContentRequest.contents[{i}].parts: contents.parts must not be empty."
        responses = [p["functionResponse"] for p in parts if "functionResponse" in p]
        if pending and len(responses) != pending:
            return ("Please ensure that the number of function response parts is equal to the number of function "
                    "call parts of the function call turn.")
        if responses and not pending:
            return "Please ensure that function response turn comes immediately after a function call turn."
        for r in responses:
            if not r.get("name") or not isinstance(r.get("response"), dict):
                return f"* GenerateContentRequest.contents[{i}].parts: functionResponse needs name and response"
        calls = [p["functionCall"] for p in parts if "functionCall" in p]
        for call in calls:
            if call.get("name") not in declared:
                return f"function {call.get('name')!r} is not declared in tools"
        pending = len(calls)
    if pending:
        return "Please ensure that function call turn comes immediately after a user turn or function response turn."
    return None


class FakeGemini(FakeUpstream):
    """Gemini API fake: `POST /v1beta/models/{model}:{action}` (base_url is `url`)."""

    base_path = "/v1beta"

    def routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/v1beta/models/{call}", self.call)

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        err: dict[str, Any] = {"code": status, "message": message, "status": STATUS.get(status, "UNKNOWN")}
        if status == 429:
            err["details"] = [{"@type": "type.googleapis.com/google.rpc.RetryInfo",
                               "retryDelay": f"{self.retry_after}s"}]
        return {"error": err}

    def error_response(self, status: int, message: str) -> web.Response:
        return self.json(self.error_body(status, message), status)  # Google sends RetryInfo, not Retry-After

    def error_event(self) -> bytes:
        return self.sse(self.error_body(503, "The model is overloaded. Please try again later."))

    def check_auth(self, request: web.Request) -> web.Response | None:
        if self.api_key and request.headers.get("x-goog-api-key") != self.api_key:
            return self.error_response(400, "API key not valid. Please pass a valid API key.")
        return None

    async def _early_fault(self, request: web.Request, fault: str | None, stream: bool) -> web.StreamResponse | None:
        return await super()._early_fault(request, fault, request.path.endswith(":streamGenerateContent"))

    @staticmethod
    def sse(doc: dict[str, Any]) -> bytes:
        return b"data: " + orjson.dumps(doc) + b"\r\n\r\n"

    async def call(self, request: web.Request) -> web.StreamResponse:
        model, _, action = request.match_info["call"].partition(":")
        if action not in ("generateContent", "streamGenerateContent", "batchEmbedContents"):
            return self.error_response(404, f"unknown action {action!r}")
        body, fault, early = await self.prelude(request)
        if early is not None:
            return early
        if action == "batchEmbedContents":
            texts = [r["content"]["parts"][0]["text"] for r in body.get("requests") or ()]
            if not texts:
                return self.error_response(400, "* BatchEmbedContentsRequest.requests: must not be empty")
            return self.json({"embeddings": [{"values": vector(t, 8)} for t in texts]})
        if problem := validate(body):
            return self.error_response(400, problem)
        prompt = estimate(body["contents"])
        if model == "blocked":  # a prompt the safety filters refuse: no candidates at all
            doc = {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"promptTokenCount": prompt,
                                                                                  "totalTokenCount": prompt}}
            if action == "generateContent":
                return self.json(doc)
            return await self.send_events(request, [self.sse(doc)], fault)
        parts, finish = self.answer(body)
        usage = {"promptTokenCount": prompt,
                 "candidatesTokenCount": sum(len(words_of(p["text"])) if "text" in p else 3 for p in parts)}
        if model.endswith("-thinking"):  # thinking models: a thought summary part and thoughtsTokenCount
            parts = [{"text": "Let me think about this.", "thought": True}, *parts]
            usage["thoughtsTokenCount"] = 7
        usage["totalTokenCount"] = usage["promptTokenCount"] + usage["candidatesTokenCount"] + usage.get(
            "thoughtsTokenCount", 0)
        if action == "generateContent":
            return self.json({"candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": finish,
                                              "index": 0}], "usageMetadata": usage, "modelVersion": model})
        if request.query.get("alt") != "sse":
            return self.error_response(400, "this fake streams only with alt=sse")
        events = []
        thoughts = [[p] for p in parts if p.get("thought")]
        parts = [p for p in parts if not p.get("thought")]
        pieces = thoughts + ([[p] for p in parts if "functionCall" in p]
                             or [[{"text": w}] for w in words_of(parts[0]["text"])])
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            cand: dict[str, Any] = {"content": {"role": "model", "parts": piece}, "index": 0}
            if last and fault != "no-done":
                cand["finishReason"] = finish
            partial = {**usage, "candidatesTokenCount": i + 1}  # usage grows chunk by chunk, as the real API's
            events.append(self.sse({"candidates": [cand], "usageMetadata": usage if last else partial,
                                    "modelVersion": model}))
        return await self.send_events(request, events, fault)

    def answer(self, body: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
        last = body["contents"][-1]["parts"]
        responses = [p["functionResponse"] for p in last if "functionResponse" in p]
        mode = ((body.get("toolConfig") or {}).get("functionCallingConfig") or {}).get("mode", "AUTO")
        declarations = [d for t in body.get("tools") or () for d in t.get("functionDeclarations") or ()]
        config = body.get("generationConfig") or {}
        if responses:
            words = words_of(f"The tool said: {orjson.dumps(responses[0]['response']).decode()}")
        elif declarations and mode != "NONE":
            allowed = ((body.get("toolConfig") or {}).get("functionCallingConfig") or {}).get("allowedFunctionNames")
            decl = next((d for d in declarations if not allowed or d["name"] in allowed), declarations[0])
            args = sample_args(decl.get("parametersJsonSchema") or decl.get("parameters"))
            return [{"functionCall": {"name": decl["name"], "args": args}}], "STOP"
        elif config.get("responseMimeType") == "application/json":
            words = ['{"answer": ', '"fake"}']
        else:
            words = self.words
        limit = config.get("maxOutputTokens")
        if isinstance(limit, int) and 0 < limit < len(words):
            return [{"text": "".join(words[:limit])}], "MAX_TOKENS"
        return [{"text": "".join(words)}], "STOP"


if __name__ == "__main__":
    FakeGemini.main()
