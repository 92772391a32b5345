"""`POST /v1/moderations`, OpenAI's shape, answered by Keel's own guards — no model is called.

Categories are what Keel detects, not OpenAI's harm taxonomy:

| category | flagged when | score |
|---|---|---|
| `pii` | the PII guard finds a personal identifier (email, phone, card with a valid checksum, IBAN, …) | 1.0 or 0.0 |
| `secrets` | the secrets guard finds a credential (API keys, private keys, tokens, …) | 1.0 or 0.0 |
| `prompt_injection` | the injection guard's probability for the worst sentence passes the policy's threshold | that probability |

Each result also carries `keel.findings`: type and character span of what was found (never the value).
The guards are those the current policy configures (its PII entities, its injection threshold). The gateway
does not import governance: the app factory hands `mount` a function that returns the guards by name.
A ledger row of kind `moderation` (no tokens, no cost) records each call.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import orjson
from fastapi import APIRouter, Depends, FastAPI, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from keel.core.clock import utcnow
from keel.core.errors import BadRequest, NotSupported
from keel.core.http import JSONAnswer
from keel.core.logs import client_request_id_var, request_id_var
from keel.identity.auth import principal
from keel.identity.principal import Principal

router = APIRouter()
MODEL = "keel-guards"
CATEGORIES = {"pii": "pii", "secrets": "secrets", "injection": "prompt_injection"}  # guard name → category
MAX_INPUTS = 256
MAX_INPUT_CHARS = 200_000


class Scanner(Protocol):
    """A guard as this endpoint uses it: `scan(text)` gives findings with `type`, `start`, `end`, `score`."""

    def scan(self, text: str) -> list[Any]: ...


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: str
    text: str | None = Field(default=None, max_length=MAX_INPUT_CHARS)
    image_url: dict[str, Any] | None = None


class ModerationsBody(BaseModel):
    """`input`: a string, a list of strings, or a list of `{"type": "text", "text": …}` parts (images are refused)."""

    model_config = ConfigDict(extra="forbid")
    input: str | list[str] | list[TextPart]
    model: str | None = Field(default=None, max_length=256)


def _texts(body: ModerationsBody) -> list[str]:
    inp = body.input
    if isinstance(inp, str):
        texts = [inp]
    else:
        texts = []
        for item in inp:
            if isinstance(item, str):
                texts.append(item)
            elif item.type == "text" and item.text is not None:
                texts.append(item.text)
            else:
                raise NotSupported(f"input part of type {item.type!r} cannot be moderated by Keel's guards",
                                   fix='send text only: strings or {"type": "text", "text": …} parts')
    if not texts:
        raise BadRequest("`input` is empty", fix="send a string or a non-empty list of strings")
    if len(texts) > MAX_INPUTS:
        raise BadRequest(f"`input` has {len(texts)} items; at most {MAX_INPUTS} are moderated per request",
                         fix=f"split the list into requests of at most {MAX_INPUTS}")
    long = next((i for i, t in enumerate(texts) if len(t) > MAX_INPUT_CHARS), None)
    if long is not None:
        raise BadRequest(f"input {long} is longer than {MAX_INPUT_CHARS} characters",
                         fix="split the text into several inputs")
    return texts


def moderate(guards: Mapping[str, Scanner], text: str) -> dict[str, Any]:
    """One OpenAI moderation result for `text` from Keel's guards."""
    categories: dict[str, bool] = {}
    scores: dict[str, float] = {}
    findings: list[dict[str, Any]] = []
    for guard_name, category in CATEGORIES.items():
        guard = guards.get(guard_name)
        if guard is None:
            continue
        found = guard.scan(text)
        categories[category] = bool(found)
        if guard_name == "injection":
            probability = getattr(guard, "score", None)
            score = max([f.score or 0.0 for f in found] +
                        [float(probability(text)) if callable(probability) and text.strip() else 0.0])
        else:
            score = 1.0 if found else 0.0
        scores[category] = round(score, 4)
        findings += [{"guard": guard_name, "type": f.type, "start": f.start, "end": f.end} for f in found]
    return {"flagged": any(categories.values()), "categories": categories, "category_scores": scores,
            "category_applied_input_types": {c: ["text"] for c in categories}, "keel": {"findings": findings}}


@router.post("/v1/moderations", tags=["gateway"])
async def moderations(body: ModerationsBody, request: Request, p: Principal = Depends(principal)) -> Response:
    """OpenAI-compatible moderations from Keel's PII, secrets and injection guards; no model call."""
    started = time.perf_counter()
    texts = _texts(body)
    current = request.app.state.moderation_guards()
    results = await run_in_threadpool(lambda: [moderate(current, t) for t in texts])
    rid = request_id_var.get() or ""
    _meter(request, p, rid, started, sum(r["flagged"] for r in results))
    out = {"id": f"modr-{rid}", "model": MODEL, "results": results}
    return JSONAnswer(orjson.dumps(out), {"x-keel-cost": "0"})


def mount(app: FastAPI, guards: Callable[[], Mapping[str, Scanner]]) -> None:
    """Serve `/v1/moderations` on `app`, scanning with the guards `guards()` returns at each request."""
    app.state.moderation_guards = guards
    app.include_router(router)


def _meter(request: Request, p: Principal, rid: str, started: float, flagged: int) -> None:
    """A ledger row for the call, like a model call's, of kind `moderation`: no tokens, no cost."""
    gateway = getattr(request.app.state, "gateway", None)
    if gateway is None:
        return
    gateway.ledger.record({
        "request_id": rid, "ts": utcnow(), "key_id": p.key_id, "team_id": p.team_id, "user_id": p.user_id,
        "kind": "moderation", "alias": MODEL, "deployment": None, "provider": "keel", "tokens_in": 0,
        "tokens_out": 0, "cost": 0.0, "latency_ms": round((time.perf_counter() - started) * 1000, 3),
        "ttft_ms": None, "status": "ok", "http_status": 200, "error_code": None, "stream": False,
        "cache_hit": False, "saved_cost": 0.0, "use_case": "moderation", "task_id": None,
        "meta": {"flagged": flagged}, "client_request_id": client_request_id_var.get()})
