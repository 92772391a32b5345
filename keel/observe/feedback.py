"""Feedback on what Keel answered: a score, a label, a comment and/or a correction, tied to one metered call.

The caller names what it judges by exactly one of: `request_id` (a ledger row: the `x-request-id` of a
call, or its `chatcmpl-…` id), `run_id` (a workflow or agent run: anchored to the run's first metered call)
or `answer_id` (the `x-request-id` of a `/v1/answer`). Whoever may not see that call in a usage report
gets the same 404 as for an id that does not exist, so feedback never tells what exists. Rows are
append-only; reports show their count and mean score per group.

>>> given = await Feedback(store, ledger).give(principal, {"request_id": "req_…", "score": 1, "label": "good"})
"""

from __future__ import annotations

import math
from typing import Any

import sqlalchemy as sa
from starlette.concurrency import run_in_threadpool

from keel.core.clock import utcnow
from keel.core.db import Store
from keel.core.errors import BadRequest, NotFound
from keel.core.ids import new_id
from keel.identity.principal import Principal
from keel.observe.ledger import Ledger
from keel.observe.tables import feedback, usage_ledger
from keel.observe.usage import visible

SUBJECTS = ("request_id", "run_id", "answer_id")
LIMITS = {"label": 100, "comment": 10_000, "correction": 100_000}
SCORE_RANGE = (-100.0, 100.0)
_FIELDS = {*SUBJECTS, "score", *LIMITS}


def parse(body: Any) -> tuple[str, str, dict[str, Any]]:
    """(subject kind, subject id, the judgement) from a request body, or a 400 naming the field."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object",
                         fix='send {"request_id": "…", "score": 1, "label": "…", "comment": "…"}')
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise BadRequest(f"unknown field {unknown[0][:60]!r}", fix=f"use only: {', '.join(sorted(_FIELDS))}")
    named = [k for k in SUBJECTS if body.get(k) is not None]
    if len(named) != 1:
        raise BadRequest("name exactly one of request_id, run_id or answer_id",
                         fix="send the x-request-id of the call (request_id), a run id, or an answer's id")
    kind = named[0]
    sid = body[kind]
    if not isinstance(sid, str) or not 0 < len(sid) <= 200 or "\x00" in sid:
        raise BadRequest(f"{kind} must be a non-empty string of at most 200 characters", fix=f"send the {kind} itself")
    out: dict[str, Any] = {}
    score = body.get("score")
    if score is not None:
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score) \
                or not SCORE_RANGE[0] <= score <= SCORE_RANGE[1]:
            raise BadRequest("score must be a number from -100 to 100",
                             fix="send e.g. 1 / -1 for thumbs, 1–5 for stars, 0–1 for a grade")
        out["score"] = float(score)
    for name, most in LIMITS.items():
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, str) or len(value) > most:
            raise BadRequest(f"{name} must be a string of at most {most} characters", fix=f"shorten {name}")
        if "\x00" in value:  # no store keeps it (PostgreSQL text refuses NUL)
            raise BadRequest(f"{name} holds a NUL character", fix=f"remove NUL characters from {name}")
        out[name] = value
    if not out:
        raise BadRequest("feedback needs a score, label, comment or correction", fix="send at least one of them")
    return kind, sid, out


class Feedback:
    """Stores feedback after checking that the caller may see the call it judges."""

    def __init__(self, store: Store, ledger: Ledger) -> None:
        self.store = store
        self.ledger = ledger

    async def give(self, p: Principal, body: Any) -> dict[str, Any]:
        p.require("feedback.write")
        kind, sid, judgement = parse(body)
        anchor = await run_in_threadpool(self._anchor, p, kind, sid)
        if anchor is None:  # it may be a call this replica has not written yet
            await self.ledger.flush()
            anchor = await run_in_threadpool(self._anchor, p, kind, sid)
        if anchor is None:
            raise NotFound(f"no {kind.removesuffix('_id')} {sid!r} that this key may see",
                           fix="use the x-request-id Keel answered with, from a call this key may see in /v1/usage",
                           **{kind: sid})
        row = {"id": new_id("fb"), "ts": utcnow(), "request_id": anchor, "subject_kind": kind.removesuffix("_id"),
               "subject_id": sid, "key_id": p.key_id, "team_id": p.team_id, "user_id": p.user_id, **judgement}
        await run_in_threadpool(self._insert, row)
        return to_dict(row)

    def _anchor(self, p: Principal, kind: str, sid: str) -> str | None:
        """The ledger row the feedback judges, if it exists and `p` may see it."""
        u = usage_ledger.c
        if kind == "request_id":
            ids = [sid, sid.removeprefix("chatcmpl-")] if sid.startswith("chatcmpl-") else [sid]
            stmt = sa.select(u.request_id).where(u.request_id.in_(ids))
        elif kind == "answer_id":
            stmt = sa.select(u.request_id).where(u.request_id == f"{sid}/answer")
        else:
            stmt = (sa.select(u.request_id).where(u.task_id == sid, u.use_case.like("workflow:%")
                                                  | u.use_case.like("agent:%"))
                    .order_by(u.ts, u.request_id))
        scope = visible(p)
        if scope is not None:
            stmt = stmt.where(scope)
        with self.store.engine.connect() as conn:
            return conn.execute(stmt.limit(1)).scalar()

    def _insert(self, row: dict[str, Any]) -> None:
        with self.store.engine.begin() as conn:
            conn.execute(feedback.insert().values(**row))


def to_dict(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "object": "feedback", "created_at": row["ts"].isoformat(),
            "request_id": row["request_id"], "subject": {"kind": row["subject_kind"], "id": row["subject_id"]},
            "score": row.get("score"), "label": row.get("label"), "comment": row.get("comment"),
            "correction": row.get("correction"), "key_id": row["key_id"]}
