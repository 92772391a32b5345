"""The inbox: workflow approvals and held answers (reviews) the signed-in role may decide — see, edit,
approve, reject with a reason. Plain forms (every control reachable by keyboard, no script needed), through
the same service calls as `/v1/approvals/…` and `/v1/reviews/…`."""

from __future__ import annotations

from urllib.parse import quote

from starlette.concurrency import run_in_threadpool
from starlette.responses import RedirectResponse, Response

from keel.console.web import Page, root
from keel.core.errors import BadRequest
from keel.workflows import approvals

SHOWN = 50


def _may_see(page: Page) -> tuple[bool, bool]:
    p = page.p
    return p.has("approvals.decide") or p.has("audit.read"), p.has("reviews.decide")


async def inbox(page: Page) -> Response:
    sees_approvals, sees_reviews = _may_see(page)
    if not (sees_approvals or sees_reviews):
        page.p.require("approvals.decide")
    pending_approvals: list = []
    wf = getattr(page.state, "workflows", None)
    if sees_approvals and wf is not None:
        pending_approvals = await run_in_threadpool(approvals.list_approvals, wf.run_store, page.p, "pending", SHOWN)
    held: list = []
    gov = getattr(page.state, "governance", None)
    if sees_reviews and gov is not None:
        listed = await run_in_threadpool(gov.reviews.list, page.p, "pending", SHOWN)
        held = [await run_in_threadpool(gov.reviews.get, page.p, r["id"]) for r in listed]
    may_decide = page.p.has("approvals.decide")
    return page.render("inbox.html", title="Inbox", approvals=pending_approvals, reviews=held,
                       may_decide=may_decide, done=page.request.query_params.get("done", "")[:200])


def _decision(form: dict[str, str]) -> tuple[bool, str | None]:
    decision = form.get("decision", "")
    if decision not in ("approve", "reject"):
        raise BadRequest("decision must be approve or reject", fix="press Approve or Reject")
    reason = form.get("reason", "").strip() or None
    if decision == "reject" and not reason:
        raise BadRequest("a rejection needs a reason", fix="write why in the reason box, then press Reject")
    return decision == "approve", reason


async def decide_approval(page: Page) -> Response:
    form = await page.form()
    approve, reason = _decision(form)
    approval_id = page.request.path_params["approval_id"]
    wf = page.state.workflows
    edits = {k[len("edit."):]: v for k, v in form.items() if k.startswith("edit.")} if approve else None
    if edits:
        current = await run_in_threadpool(approvals.get_approval, wf.run_store, page.p, approval_id)
        shown = current.show or {}
        edits = {k: v for k, v in edits.items() if str(shown.get(k, "")) != v}  # only what was changed
    out = await approvals.decide(wf.run_store, wf.durable, page.p, approval_id,
                                 "approved" if approve else "rejected", reason, edits or None)
    return RedirectResponse(f"{root(page.request)}/inbox?done={quote(out['status'] + ': ' + out['workflow'])}", 303)


async def decide_review(page: Page) -> Response:
    form = await page.form()
    approve, reason = _decision(form)
    review_id = page.request.path_params["review_id"]
    gov = page.state.governance
    p = page.p
    p.require("reviews.decide")
    edited = form.get("output") if approve and "output" in form else None
    current = await run_in_threadpool(gov.reviews.get, p, review_id)
    if edited is not None and edited == ((current.get("output") or {}).get("content") or ""):
        edited = None  # unchanged: release the model's own answer
    review = await run_in_threadpool(lambda: gov.reviews.decide(p, review_id, approve=approve, reason=reason,
                                                                edited=edited))
    await run_in_threadpool(lambda: gov.audit.record(
        "review.approve" if approve else "review.reject", p.key_id, review["team_id"], review_id=review_id,
        request_id=review["request_id"], edited=edited is not None, reason=reason))
    settings = gov.policy.engine.policy.reviews
    gov.reviews.notify(review, [review.get("webhook_url") or "", settings.webhook_url or ""], settings.timeout_s)
    return RedirectResponse(f"{root(page.request)}/inbox?done={quote(review['status'] + ': review ' + review_id)}", 303)


ROUTES = [
    ("GET", "/inbox", inbox),
    ("POST", "/inbox/approvals/{approval_id}", decide_approval),
    ("POST", "/inbox/reviews/{review_id}", decide_review),
]
