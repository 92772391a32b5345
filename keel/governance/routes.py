"""Governance HTTP API: audit trail (read, verify, export), review queue, guard events, policy."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from keel.core.errors import BadRequest, Forbidden
from keel.core.http import json_response
from keel.governance.audit import export_lines, public_event
from keel.governance.policy import loader
from keel.governance.policy.model import parse_policy
from keel.identity import service as identity
from keel.identity.auth import principal
from keel.identity.principal import Principal

router = APIRouter()
SEQ_MAX = 2**63 - 1  # audit sequence numbers are 64-bit integers in every store
VERSION_MAX = 2**31 - 1  # policy versions are 32-bit
MAX_POLICY_BYTES = 200_000


class DecisionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    output: str | None = Field(default=None, description="an edited answer to release instead of the model's")
    reason: str | None = Field(default=None, max_length=4000)


class CollectionRef(BaseModel):
    """A collection the tested request would read: its id (for the explanation) and classification."""

    model_config = ConfigDict(extra="forbid")
    id: str | None = Field(default=None, max_length=300)
    classification: str | None = Field(default=None, max_length=100)


class PolicyTestIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1)
    classification: str | None = None
    team: str | None = Field(default=None, description="team id or name whose default applies")
    collections: list[CollectionRef] = Field(default_factory=list, max_length=1000)
    use_case: str | None = None


def _gov(request: Request):  # noqa: ANN202
    return request.app.state.governance


def _auditor(p: Principal) -> Principal:
    p.require("audit.read")
    return p


def _audit_scope(p: Principal) -> str | None:
    """A team-bound auditor reads only its team's events; admins and team-less auditors read all."""
    return None if p.is_admin or p.team_id is None else p.team_id


# -- audit ------------------------------------------------------------------------------------

@router.get("/v1/audit", tags=["audit"])
async def list_audit(request: Request, action: str | None = None, actor: str | None = None,
                     before: int | None = Query(None, ge=0, le=SEQ_MAX, description="events with a lower seq"),
                     after: int | None = Query(None, ge=0, le=SEQ_MAX, description="events with a higher seq"),
                     limit: int = Query(100, ge=1, le=1000), p: Principal = Depends(principal)) -> Response:
    """Audit events, newest first (`after` pages forward). Read-only for everyone: there is no edit."""
    _auditor(p)
    rows = await run_in_threadpool(_gov(request).audit.events, team_id=_audit_scope(p), action=action,
                                   actor=actor, before=before, after=after, limit=limit)
    return json_response({"data": [public_event(r) for r in rows]})


@router.get("/v1/audit/verify", tags=["audit"])
async def verify_audit(request: Request, anchor: str | None = None, p: Principal = Depends(principal)) -> Response:
    """Walk the whole chain; `ok: false` names the first broken link. `anchor=SEQ:HASH` checks a recorded head."""
    _auditor(p)
    verdict = await run_in_threadpool(_gov(request).audit.verify, parse_anchor(anchor))
    return json_response(verdict.to_dict())


@router.get("/v1/audit/export", tags=["audit"])
async def export_audit(request: Request, p: Principal = Depends(principal)) -> Response:
    """The whole chain as JSON lines with every hashed field, then the head — verifiable offline."""
    _auditor(p)
    if _audit_scope(p) is not None:
        raise Forbidden("an export holds the whole chain; a team-bound auditor may not read other teams' events",
                        fix="ask an auditor without a team, or an admin", key_id=p.key_id)
    lines = iterate_in_threadpool(export_lines(_gov(request).audit))
    return StreamingResponse(lines, media_type="application/x-ndjson",
                             headers={"content-disposition": "attachment; filename=keel-audit.jsonl"})


def parse_anchor(anchor: str | None) -> tuple[int, str] | None:
    if not anchor:
        return None
    seq, _, digest = anchor.partition(":")
    if not seq.isdigit() or len(digest) != 64:
        raise BadRequest(f"anchor {anchor!r} is not SEQ:SHA256", fix="pass e.g. 1200:3fa9… from an earlier verify")
    return int(seq), digest


# -- reviews ----------------------------------------------------------------------------------

@router.get("/v1/reviews", tags=["reviews"])
async def list_reviews(request: Request, status: str | None = "pending", limit: int = Query(100, ge=1, le=500),
                       p: Principal = Depends(principal)) -> Response:
    """The review queue of the caller's team (all teams for admins and team-less reviewers)."""
    p.require("reviews.decide")
    rows = await run_in_threadpool(_gov(request).reviews.list, p, status or None, limit)
    return json_response({"data": rows})


@router.get("/v1/reviews/{review_id}", tags=["reviews"])
async def get_review(review_id: str, request: Request, p: Principal = Depends(principal)) -> Response:
    """Reviewers see the item; the requesting key polls its status and, once approved, the answer."""
    return json_response(await run_in_threadpool(_gov(request).reviews.get, p, review_id))


async def _decide(request: Request, p: Principal, review_id: str, approve: bool, body: DecisionIn) -> Response:
    p.require("reviews.decide")
    gov = _gov(request)
    review = await run_in_threadpool(lambda: gov.reviews.decide(p, review_id, approve=approve, reason=body.reason,
                                                                edited=body.output if approve else None))
    await run_in_threadpool(lambda: gov.audit.record(
        "review.approve" if approve else "review.reject", p.key_id, review["team_id"], review_id=review_id,
        request_id=review["request_id"], edited=bool(approve and body.output is not None), reason=body.reason))
    settings = gov.policy.engine.policy.reviews
    gov.reviews.notify(review, [review.get("webhook_url") or "", settings.webhook_url or ""], settings.timeout_s)
    return json_response(review)


@router.post("/v1/reviews/{review_id}/approve", tags=["reviews"])
async def approve_review(review_id: str, request: Request, body: DecisionIn | None = None,
                         p: Principal = Depends(principal)) -> Response:
    """Release the held answer, or an edited one (`output`)."""
    return await _decide(request, p, review_id, True, body or DecisionIn())


@router.post("/v1/reviews/{review_id}/reject", tags=["reviews"])
async def reject_review(review_id: str, body: DecisionIn, request: Request,
                        p: Principal = Depends(principal)) -> Response:
    """Reject with a reason; the caller sees the reason, never the answer."""
    return await _decide(request, p, review_id, False, body)


# -- guard events -------------------------------------------------------------------------------

@router.get("/v1/guard-events", tags=["guards"])
async def guard_events(request: Request, request_id: str | None = None, limit: int = Query(200, ge=1, le=1000),
                       p: Principal = Depends(principal)) -> Response:
    """What guards found (type, span, action — never the value). Callers see their own key's requests."""
    gov = _gov(request)
    await gov.events.flush()
    if p.has("audit.read"):
        rows = await run_in_threadpool(gov.events.query, request_id=request_id, team_id=_audit_scope(p), limit=limit)
    else:
        rows = await run_in_threadpool(gov.events.query, request_id=request_id, key_id=p.key_id, limit=limit)
    return json_response({"data": rows})


# -- policy -------------------------------------------------------------------------------------

@router.get("/admin/policy", tags=["policy"])
async def current_policy(request: Request, p: Principal = Depends(principal)) -> Response:
    _auditor(p)
    source = _gov(request).policy
    version = await run_in_threadpool(loader.get_version, request.app.state.store, source.engine.version)
    return json_response({**version, "active": True})


@router.get("/admin/policy/versions", tags=["policy"])
async def policy_versions(request: Request, p: Principal = Depends(principal)) -> Response:
    _auditor(p)
    return json_response({"data": await run_in_threadpool(loader.list_versions, request.app.state.store),
                          "active": _gov(request).policy.engine.version})


@router.get("/admin/policy/versions/{version}", tags=["policy"])
async def policy_version(request: Request, version: int = Path(ge=1, le=VERSION_MAX),
                         p: Principal = Depends(principal)) -> Response:
    _auditor(p)
    return json_response(await run_in_threadpool(loader.get_version, request.app.state.store, version))


@router.put("/admin/policy", tags=["policy"])
async def set_policy(request: Request, p: Principal = Depends(principal)) -> Response:
    """Activate a policy (YAML body) on every process of this store within a second; admins only. 400
    `policy_invalid` lists field and line and changes nothing. A later change of the policy file wins over it."""
    p.require("admin.manage")
    raw = await request.body()
    if len(raw) > MAX_POLICY_BYTES:
        raise BadRequest(f"the policy is {len(raw)} bytes, over the {MAX_POLICY_BYTES}-byte limit",
                         fix="send a shorter policy")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("the policy is not UTF-8 text", fix="send the policy YAML as UTF-8") from None
    gov = _gov(request)
    engine = await run_in_threadpool(gov.policy.set, text, p.key_id)
    version = await run_in_threadpool(loader.get_version, request.app.state.store, engine.version)
    return json_response({**version, "active": True})


@router.post("/admin/policy/check", tags=["policy"])
async def check_policy(request: Request, p: Principal = Depends(principal)) -> Response:
    """Validate a policy (YAML body) without activating it; 400 `policy_invalid` lists field and line."""
    _auditor(p)
    text = (await request.body()).decode("utf-8", errors="replace")
    policy = parse_policy(text, "request body")
    return json_response({"valid": True, "name": policy.name, "rules": [r.name for r in policy.data_rules]})


@router.post("/v1/policy/test", tags=["policy"])
async def test_policy(body: PolicyTestIn, request: Request, p: Principal = Depends(principal)) -> Response:
    """Would a request like this be allowed, where could it go, and why (no model is called)."""
    _auditor(p)
    gov = _gov(request)
    engine = gov.policy.engine
    team = None
    if body.team:
        team = (await run_in_threadpool(identity.get_team, request.app.state.store, body.team))["classification"]
    collections = [c.model_dump(exclude_none=True) for c in body.collections]
    decision = engine.decide(team=team, explicit=body.classification, collections=collections,
                             use_case=body.use_case)
    return json_response(engine.explain(decision, body.model, gov.candidates(body.model)))
