"""The review queue: answers held by policy wait here until a reviewer approves (maybe edited) or rejects.

The caller gets `202` with a review id, then polls `GET /v1/reviews/{id}` or receives a webhook.
A reviewer sees their own team's items (a reviewer without a team, and admins, see all).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import Any

import sqlalchemy as sa

from keel.core.clock import utcnow
from keel.core.db import Store
from keel.core.errors import BadRequest, ConfigError, Conflict, KeelError, NotFound
from keel.core.http1 import Client, WireError
from keel.core.ids import new_id
from keel.core.outbound import Outbound
from keel.core.webhook import post_json
from keel.governance.tables import reviews
from keel.identity.principal import Principal

log = logging.getLogger("keel.reviews")
STATUSES = ("pending", "approved", "rejected")


class ReviewPending(KeelError):
    """Not an error: the answer is held for human review. Status 202 with the review id."""

    code, status, title = "review_pending", 202, "Held for review"


def _iso(dt: Any) -> str | None:
    return dt.isoformat() if dt is not None else None


def public(r: Any, *, with_content: bool = True) -> dict[str, Any]:
    out = {"id": r.id, "object": "review", "status": r.status, "request_id": r.request_id, "key_id": r.key_id,
           "team_id": r.team_id, "model": r.alias, "deployment": r.deployment, "use_case": r.use_case,
           "classification": r.classification, "reasons": r.reasons, "policy_version": r.policy_version,
           "decided_by": r.decided_by, "decision_reason": r.decision_reason, "webhook_url": r.webhook_url,
           "webhook_status": r.webhook_status,
           "created_at": _iso(r.created_at), "decided_at": _iso(r.decided_at)}
    if with_content:
        out.update(messages=r.messages, output=r.output, final_output=r.final_output)
    return out


def released(r: Any) -> dict[str, Any]:
    """What the requesting caller sees: status, and the released answer once approved."""
    out = {"id": r.id, "object": "review", "status": r.status, "request_id": r.request_id,
           "created_at": _iso(r.created_at), "decided_at": _iso(r.decided_at)}
    if r.status == "approved":
        out["output"] = r.final_output
    elif r.status == "rejected":
        out["reason"] = r.decision_reason
    return out


class ReviewQueue:
    """Create, list, read and decide review items; decisions notify webhooks in supervised tasks, through
    Keel's outbound stack (`outbound`: CA bundle, client certificate, proxy)."""

    def __init__(self, store: Store, outbound: Outbound) -> None:
        self.store = store
        # Webhook URLs are the policy's, or a caller's under a prefix the policy allows: admin-chosen like a
        # provider's base_url, so they go out as providers do, through the environment's proxy (NO_PROXY aside).
        self.outbound = outbound
        self._tls = outbound.ssl_context("review webhook")  # a bad CA bundle or certificate fails at start
        self._tasks: set[asyncio.Task[None]] = set()
        self._client: Client | None = None

    def create(self, *, request_id: str, principal: Principal, alias: str, deployment: str | None,
               use_case: str | None, classification: str, reasons: list[str], messages: list[dict[str, Any]],
               output: dict[str, Any], policy_version: int, webhook_url: str | None,
               retain_days: int | None) -> dict[str, Any]:
        now = utcnow()
        row = {"id": new_id("rev"), "request_id": request_id, "status": "pending", "key_id": principal.key_id,
               "team_id": principal.team_id, "alias": alias, "deployment": deployment, "use_case": use_case,
               "classification": classification, "reasons": reasons[:50], "messages": messages, "output": output,
               "final_output": None, "decided_by": None, "decision_reason": None, "webhook_url": webhook_url,
               "webhook_status": None, "policy_version": policy_version,
               "retain_until": None if retain_days is None else now + timedelta(days=retain_days),
               "created_at": now, "decided_at": None}
        with self.store.engine.begin() as conn:
            conn.execute(reviews.insert().values(**row))
        return row

    def _get(self, review_id: str) -> Any:
        with self.store.engine.connect() as conn:
            return conn.execute(sa.select(reviews).where(reviews.c.id == review_id)).first()

    @staticmethod
    def may_decide(p: Principal, r: Any) -> bool:
        return p.has("reviews.decide") and (p.is_admin or p.team_id is None or p.team_id == r.team_id)

    def get(self, p: Principal, review_id: str) -> dict[str, Any]:
        """Reviewers of the item's team see everything; the requesting key sees its status and release."""
        r = self._get(review_id)
        if r is not None and self.may_decide(p, r):
            return public(r)
        if r is not None and r.key_id == p.key_id:
            return released(r)
        raise NotFound(f"review {review_id} does not exist or is not yours", fix="check the id", review_id=review_id)

    def list(self, p: Principal, status: str | None = "pending", limit: int = 100) -> list[dict[str, Any]]:
        q = sa.select(reviews).order_by(reviews.c.created_at.desc()).limit(max(1, min(limit, 500)))
        if status:
            if status not in STATUSES:
                raise BadRequest(f"unknown review status {status!r}", fix=f"use one of: {', '.join(STATUSES)}")
            q = q.where(reviews.c.status == status)
        if not p.is_admin and p.team_id is not None:
            q = q.where(reviews.c.team_id == p.team_id)
        with self.store.engine.connect() as conn:
            return [public(r, with_content=False) for r in conn.execute(q)]

    def decide(self, p: Principal, review_id: str, *, approve: bool, reason: str | None,
               edited: str | None) -> dict[str, Any]:
        """Approve (optionally with an edited answer) or reject with a reason; exactly once."""
        r = self._get(review_id)
        if r is None or not self.may_decide(p, r):
            raise NotFound(f"review {review_id} does not exist or is not in your team's queue",
                           fix="list your queue with `keel reviews list`", review_id=review_id)
        if not approve and not (reason or "").strip():
            raise BadRequest("a rejection needs a reason", fix="send {\"reason\": \"…\"}", review_id=review_id)
        final = None
        if approve:
            final = dict(r.output or {})
            if edited is not None:
                final["content"] = edited
                final["edited"] = True
        values = {"status": "approved" if approve else "rejected", "decided_by": p.key_id,
                  "decision_reason": reason, "final_output": final, "decided_at": utcnow()}
        with self.store.engine.begin() as conn:
            n = conn.execute(reviews.update().where(reviews.c.id == review_id, reviews.c.status == "pending")
                             .values(**values)).rowcount
        if not n:
            raise Conflict(f"review {review_id} was already decided", fix="reload it", review_id=review_id)
        return public(self._get(review_id))

    def purge_expired(self) -> int:
        """Blank the stored prompts/outputs of decided items past their retention."""
        with self.store.engine.begin() as conn:
            return conn.execute(reviews.update().where(reviews.c.status != "pending",
                                                       reviews.c.retain_until.is_not(None),
                                                       reviews.c.retain_until < utcnow())
                                .values(messages=None, output=None, final_output=None, retain_until=None)).rowcount

    # -- webhooks ---------------------------------------------------------------------------
    def notify(self, review: dict[str, Any], urls: list[str], timeout_s: float) -> None:
        """Send the decision to each URL in the background (3 tries); the outcome is stored."""
        for url in dict.fromkeys(u for u in urls if u):
            task = asyncio.get_running_loop().create_task(self._deliver(review, url, timeout_s))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _deliver(self, review: dict[str, Any], url: str, timeout_s: float) -> None:
        body = {"type": f"review.{review['status']}", "review": {k: review.get(k) for k in (
            "id", "status", "request_id", "model", "use_case", "decided_at", "decision_reason", "final_output")}}
        if self._client is None:
            self._client = self.outbound.client(limit=20, tls=self._tls)
        status, tries = "failed", 3
        proxy = None
        try:
            proxy = self.outbound.proxy_for(url)
        except ValueError:  # a caller's URL under an allowed prefix may still be malformed
            status, tries = "failed:InvalidURL", 0
        except ConfigError:  # the environment's proxy cannot be used (an https:// proxy URL)
            status, tries = "failed:ConnectFailed", 0
        for attempt in range(tries):
            try:
                code = await post_json(self._client, url, body, proxy=proxy, timeout_s=timeout_s,
                                       headers={"x-keel-review-id": review["id"]})
                if code < 300:
                    status = f"delivered:{code}"
                    break
                status = f"failed:{code}"
            except (WireError, ValueError, TimeoutError, OSError) as exc:
                status = f"failed:{type(exc).__name__}"
            await asyncio.sleep(0.5 * (attempt + 1))
        if review.get("webhook_url") == url:
            await asyncio.to_thread(self._set_webhook_status, review["id"], status)
        if not status.startswith("delivered"):
            log.warning("review webhook not delivered", extra={"review_id": review["id"], "status": status})

    def _set_webhook_status(self, review_id: str, status: str) -> None:
        with self.store.engine.begin() as conn:
            conn.execute(reviews.update().where(reviews.c.id == review_id).values(webhook_status=status))

    async def close(self) -> None:
        if self._tasks:
            for res in await asyncio.gather(*list(self._tasks), return_exceptions=True):
                if isinstance(res, BaseException):
                    log.error("review webhook task failed", exc_info=res)
        if self._client is not None:
            await self._client.close()
