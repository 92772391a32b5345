"""Playground: chat with any alias the caller may use, streamed; with collections picked, an answer with
numbered citations (knowledge's `answer_stream`, as `POST /v1/answer` streams it). Every turn goes through the
one governed path under the signed-in principal, and ends with its deployment, tokens, cost and guard actions.

The reply streams as JSON lines (`delta`, `citations`, `done`, `error`) that `console.js` reads with fetch.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response, StreamingResponse

from keel.console.web import Page
from keel.core.errors import BadRequest, KeelError
from keel.core.ids import new_id
from keel.gateway.pipeline import Call
from keel.gateway.protocol import ChatRequest
from keel.knowledge import answer as answers, catalog

MAX_TURNS, MAX_CHARS = 20, 8000


async def playground(page: Page) -> Response:
    p = page.p
    p.require("models.use")
    aliases = [a for a, kind in page.state.gateway.visible_aliases(p).items() if kind == "chat"]
    kn = getattr(page.state, "knowledge", None)
    cols = await run_in_threadpool(catalog.readable, kn.store, p) if kn is not None and p.has("collections.read") else []
    return page.render("playground.html", title="Playground", aliases=aliases,
                       collections=[{"id": c.id, "name": c.name, "classification": c.classification} for c in cols])


def _history(raw: str) -> list[dict[str, str]]:
    try:
        turns = orjson.loads(raw or "[]")
    except orjson.JSONDecodeError:
        raise BadRequest("history is not JSON", fix="reload the playground") from None
    if not isinstance(turns, list) or len(turns) > MAX_TURNS * 2:
        raise BadRequest(f"history holds more than {MAX_TURNS} turns", fix="start a new conversation")
    out = []
    for t in turns:
        if not (isinstance(t, dict) and t.get("role") in ("user", "assistant") and isinstance(t.get("content"), str)):
            raise BadRequest("each history turn needs a role (user or assistant) and text", fix="reload the playground")
        out.append({"role": t["role"], "content": t["content"][:MAX_CHARS]})
    return out


def _line(event: dict[str, Any]) -> bytes:
    return orjson.dumps(event) + b"\n"


async def chat(page: Page) -> Response:
    form = await page.form()
    p = page.p
    p.require("models.use")
    message = form.get("message", "").strip()
    model = form.get("model", "")
    if not message or not model:
        raise BadRequest("a message and a model are needed", fix="pick a model and write a message")
    collections = [c for c in form.get("collections", "").split(",") if c][:20]
    rid = new_id("req")
    gateway, gov = page.state.gateway, getattr(page.state, "governance", None)
    if collections:
        kn = page.state.knowledge
        req = answers.AnswerRequest(question=message, collections=collections, model=model, max_tokens=512)
        _hits, events = await answers.answer_stream(kn, p, req, rid)
    else:
        call = Call(request_id=rid, principal=p, kind="chat", alias=model,
                    chat=ChatRequest(model=model, messages=[*_history(form.get("history", "")),
                                                            {"role": "user", "content": message}],
                                     max_tokens=512, stream=True, include_usage=True),
                    metadata={"use_case": "console.playground"})
        events = _chat_events(gateway, call)

    async def body() -> AsyncIterator[bytes]:
        try:
            async for ev in events:
                yield _line(ev)
        except KeelError as exc:
            yield _line({"type": "error", "detail": exc.detail, "code": exc.code, "fix": exc.fix or ""})
        yield _line({"type": "turn", "request_id": rid, "guard_actions": await _guards(gov, p, rid)})

    return StreamingResponse(body(), media_type="application/x-ndjson",
                             headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})


async def _chat_events(gateway: Any, call: Call) -> AsyncIterator[dict[str, Any]]:
    async for delta in gateway.chat_stream(call):
        if delta.content:
            yield {"type": "delta", "content": delta.content}
    u = call.usage
    yield {"type": "done", "deployment": call.deployment.id if call.deployment else None,
           "usage": {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens},
           "cost": round(call.cost(), 9), "cache_hit": call.cache_hit}


async def _guards(gov: Any, p: Any, rid: str) -> list[dict[str, Any]]:
    """What the guards did on this turn (its own request and the answer's model call), never the values."""
    if gov is None:
        return []
    await gov.events.flush()
    rows = []
    for request_id in (rid, f"{rid}/answer"):
        rows += await run_in_threadpool(lambda r=request_id: gov.events.query(request_id=r, key_id=p.key_id, limit=50))
    return [{"guard": r.get("guard"), "type": r.get("type"), "action": r.get("action")} for r in rows]


ROUTES = [
    ("GET", "/playground", playground),
    ("POST", "/playground/chat", chat),
]
