"""A fake Azure OpenAI resource: `/openai/deployments/{deployment}/chat/completions` and `/embeddings`, each
requiring an `api-version` query and either an `api-key` header or an Entra bearer token, as Azure does.

It answers like the OpenAI fake, plus Azure's habits: a first stream chunk with no choices and
`prompt_filter_results`, `content_filter_results` on choices, and `retry-after-ms` next to `retry-after` on
a 429. `base_url` is the resource endpoint (`url`). Faults: see `tests/fakes/__init__.py`.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from tests.fakes.openai_upstream import CHAT_ID, CREATED, FakeOpenAI

FILTER = {"hate": {"filtered": False, "severity": "safe"}, "violence": {"filtered": False, "severity": "safe"}}


class FakeAzureOpenAI(FakeOpenAI):
    """Azure OpenAI fake; `deployments` are the names that exist, `token` the Entra token accepted."""

    base_path = ""

    def __init__(self, *, deployments: tuple[str, ...] = ("gpt-4o-prod", "embed-prod"), token: str | None = None,
                 **kw: Any) -> None:
        super().__init__(**kw)
        self.deployments = deployments
        self.token = token

    def routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/openai/deployments/{deployment}/chat/completions", self.azure_chat)
        router.add_post("/openai/deployments/{deployment}/embeddings", self.azure_embeddings)

    def error_response(self, status: int, message: str) -> web.Response:
        resp = super().error_response(status, message)
        if status == 429:
            resp.headers["retry-after-ms"] = str(int(float(self.retry_after) * 1000))
        return resp

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        return {"error": {"code": str(status), "message": message}}

    def check_auth(self, request: web.Request) -> web.Response | None:
        if not request.query.get("api-version"):
            return self.error_response(404, "Resource not found")  # what Azure answers without api-version
        bearer = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if self.token is not None and bearer == self.token:
            return None
        if self.api_key and request.headers.get("api-key") != self.api_key:
            return self.error_response(401, "Access denied due to invalid subscription key or wrong API endpoint.")
        return None

    def _missing(self, request: web.Request) -> web.Response | None:
        if request.match_info["deployment"] not in self.deployments:
            return self.error_response(404, "The API deployment for this resource does not exist.")
        return None

    async def azure_chat(self, request: web.Request) -> web.StreamResponse:
        return self._missing(request) or await self.chat(request)

    async def azure_embeddings(self, request: web.Request) -> web.StreamResponse:
        return self._missing(request) or await self.embeddings(request)

    def events(self, model: str, words: list[str], call: dict[str, Any] | None, finish: str,
               usage: dict[str, Any] | None, fault: str | None) -> list[bytes]:
        first = {"id": "", "object": "", "created": 0, "model": "", "choices": [],
                 "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": FILTER}]}
        return [b"data: " + orjson.dumps(first) + b"\n\n", *super().events(model, words, call, finish, usage, fault)]

    @staticmethod
    def json(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
        if isinstance(doc, dict) and doc.get("id") == CHAT_ID and doc.get("created") == CREATED:
            doc = {**doc, "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": FILTER}],
                   "choices": [{**c, "content_filter_results": FILTER} for c in doc["choices"]]}
        return FakeOpenAI.json(doc, status, headers)


if __name__ == "__main__":
    FakeAzureOpenAI.main()
