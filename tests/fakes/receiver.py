"""A loopback receiver: "the outside world" that workflow side effects (http steps, webhooks) reach in tests.

`python -m tests.fakes.receiver --port 9200` serves `http://127.0.0.1:9200`; in a thread,
`with Receiver() as r: … r.url …`. Every request on any path (but the control endpoints) is counted;
one with an `Idempotency-Key` is "applied" the first time it succeeds and a "repeat" after that, so a
test can prove a retried step had its effect once. The answer is `{"ok": true, "applied", "key"}`.

Query options on any recorded request:
  `fail=500` (any status; `429` adds `retry-after: 1`)   answer that status instead; not applied
  `fail_times=N`     with `fail`: fail only the first N requests with this key (or path), then succeed
  `delay_ms=N`       wait before answering
  `redirect=URL`     answer 302 with `Location: URL`
  `pad=N`            add `"pad": "x" * N` to the answer (an oversized response)

Control: `GET /_stats` → `{"raw", "applied", "repeats", "by_key": {key: count}, "requests": [last 200
{method, path, key, body, status}]}`; `POST /_reset` clears. `GET /enrich?domain=x` answers deterministic
fake company data `{"domain", "name", "employees", "industry"}` (counted in `raw`/`by_key`, a read
is never "applied").
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter, deque
from typing import Any

import orjson
from aiohttp import web

from tests.fakes import FakeUpstream

CONTROL_PATHS = ("/_stats", "/_reset", "/_control")
INDUSTRIES = ("software", "manufacturing", "retail", "healthcare", "finance", "logistics")


def company(domain: str) -> dict[str, Any]:
    """Deterministic fake company data for a domain."""
    digest = hashlib.sha256(domain.encode()).digest()
    stem = domain.split(".")[0] or "unknown"
    return {"domain": domain, "name": stem.replace("-", " ").title() + " Inc.",
            "employees": 10 + int.from_bytes(digest[:2], "big") % 5000,
            "industry": INDUSTRIES[digest[2] % len(INDUSTRIES)]}


class Receiver(FakeUpstream):
    """Records, dedupes by `Idempotency-Key` and answers every request; fails on command (`?fail=500`)."""

    def reset(self) -> None:
        super().reset()
        self.raw = 0
        self.applied_keys: set[str] = set()
        self.applied = 0
        self.repeats = 0
        self.by_key: Counter[str] = Counter()
        self.attempts: Counter[str] = Counter()
        self.log: deque[dict[str, Any]] = deque(maxlen=200)

    def routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/enrich", self.enrich)
        router.add_route("*", "/{tail:.*}", self.receive)

    def stats(self) -> dict[str, Any]:
        return {"raw": self.raw, "applied": self.applied, "repeats": self.repeats, "by_key": dict(self.by_key),
                "requests": list(self.log)}

    async def record_request(self, request: web.Request) -> tuple[dict[str, Any], web.Response | None]:
        """Count the request, play `delay_ms`/`fail`/`redirect`; the entry, and an early answer or None."""
        raw = await request.read()
        try:
            body: Any = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = raw.decode(errors="replace")[:10_000]
        key = request.headers.get("Idempotency-Key")
        self.raw += 1
        if key is not None:
            self.by_key[key] += 1
        self.attempts[key or request.path] += 1
        entry = {"method": request.method, "path": request.path, "key": key, "body": body,
                 "content_type": request.headers.get("Content-Type"), "user_agent": request.headers.get("User-Agent"),
                 "status": 200}
        self.log.append(entry)
        query = request.query
        if delay := float(query.get("delay_ms", 0)):
            await asyncio.sleep(min(delay, 60_000) / 1000)
        fail = query.get("fail")
        if fail and (not query.get("fail_times") or self.attempts[key or request.path] <= int(query["fail_times"])):
            entry["status"] = int(fail)
            headers = {"retry-after": "1"} if fail == "429" else None
            return entry, self.json({"ok": False, "error": f"receiver fault {fail}"}, int(fail), headers)
        if target := query.get("redirect"):
            entry["status"] = 302
            return entry, web.Response(status=302, headers={"Location": target})
        return entry, None

    def apply(self, key: str | None) -> bool:
        """Whether this successful request has its effect now (False: a repeat of an applied key)."""
        if key is not None and key in self.applied_keys:
            self.repeats += 1
            return False
        if key is not None:
            self.applied_keys.add(key)
        self.applied += 1
        return True

    async def receive(self, request: web.Request) -> web.Response:
        if request.path in CONTROL_PATHS:
            return self.json({"ok": False, "error": "method not allowed"}, 405)
        entry, early = await self.record_request(request)
        if early is not None:
            return early
        doc: dict[str, Any] = {"ok": True, "applied": self.apply(entry["key"]), "key": entry["key"]}
        if pad := int(request.query.get("pad", 0)):
            doc["pad"] = "x" * pad
        return self.json(doc)

    async def enrich(self, request: web.Request) -> web.Response:
        entry, early = await self.record_request(request)
        if early is not None:
            return early
        domain = request.query.get("domain", "").strip().lower()
        if not domain:
            entry["status"] = 400
            return self.json({"ok": False, "error": "domain is required"}, 400)
        return self.json(company(domain))  # a read: counted, never "applied"


if __name__ == "__main__":
    Receiver.main()
