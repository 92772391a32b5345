"""Usage and cost reports from the ledger: tokens, cost, requests, errors, p50/p95 latency and feedback,
grouped by any of the dimensions a ledger row records, over a time range.

Who sees what (`visible`): admins and auditors (`reports.read`) every row; a builder the rows of its own
team (it builds the team's workflows and agents, and pays for them); a member or reviewer only its own
calls — its user's keys, or the key itself for a key with no user — as LiteLLM shows an internal user its
own spend. A team-less builder sees only its own calls too.

Every figure is computed here in Python from the rows themselves, so SQLite and PostgreSQL give the same
answer: sums in row order, and latency percentiles by the nearest-rank rule (the smallest value with at
least p% of the group's calls at or below it).

Workflow and agent dimensions come from the ledger's conventions: a workflow step's call has use case
`workflow:<name>` and its run id as task id; an agent's, `agent:<name>` and its run id.
"""

from __future__ import annotations

import csv
import io
import math
from array import array
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from keel.core.db import Store
from keel.core.errors import BadRequest, Forbidden
from keel.identity.principal import Principal
from keel.observe.tables import feedback, usage_ledger

u = usage_ledger.c
DEFAULT_DAYS = 30
MAX_GROUPS = 10_000
_LIKE_WORKFLOW, _LIKE_AGENT = "workflow:%", "agent:%"


def _prefixed(prefix: str, value: str | None) -> str | None:
    return value[len(prefix):] if value and value.startswith(prefix) else None


def _day(ts: datetime) -> str:
    return (ts if ts.tzinfo is None else ts.astimezone(UTC)).date().isoformat()  # SQLite gives naive UTC


Getter = Callable[[Any], Any]
# name → (how a row gives it, the SQL filter for `name=value`)
DIMENSIONS: dict[str, tuple[Getter, Callable[[str], sa.ColumnElement[bool]] | None]] = {
    "day": (lambda r: _day(r.ts), None),
    "team": (lambda r: r.team_id, lambda v: u.team_id == v),
    "key": (lambda r: r.key_id, lambda v: u.key_id == v),
    "user": (lambda r: r.user_id, lambda v: u.user_id == v),
    "use_case": (lambda r: r.use_case, lambda v: u.use_case == v),
    "task": (lambda r: r.task_id, lambda v: u.task_id == v),
    "model": (lambda r: r.alias, lambda v: u.alias == v),
    "deployment": (lambda r: r.deployment, lambda v: u.deployment == v),
    "provider": (lambda r: r.provider, lambda v: u.provider == v),
    "kind": (lambda r: r.kind, lambda v: u.kind == v),
    "status": (lambda r: r.status, lambda v: u.status == v),
    "workflow": (lambda r: _prefixed("workflow:", r.use_case), lambda v: u.use_case == f"workflow:{v}"),
    "workflow_run": (lambda r: r.task_id if _prefixed("workflow:", r.use_case) else None,
                     lambda v: (u.task_id == v) & u.use_case.like(_LIKE_WORKFLOW)),
    "agent": (lambda r: _prefixed("agent:", r.use_case), lambda v: u.use_case == f"agent:{v}"),
    "agent_run": (lambda r: r.task_id if _prefixed("agent:", r.use_case) else None,
                  lambda v: (u.task_id == v) & u.use_case.like(_LIKE_AGENT)),
}
SYNONYMS = {"task_id": "task", "alias": "model", "model_alias": "model", "team_id": "team", "key_id": "key",
            "user_id": "user", "date": "day"}
METRICS = ("requests", "errors", "cancelled", "cache_hits", "tokens_in", "tokens_out", "total_tokens", "cost",
           "saved_cost", "latency_p50_ms", "latency_p95_ms", "feedback_count", "feedback_avg_score")


def visible(p: Principal) -> sa.ColumnElement[bool] | None:
    """The ledger rows `p` may see, as a filter (None: all of them); 403 for a role with no report right."""
    if p.has("reports.read"):
        return None
    if not p.has("reports.read.own"):
        raise Forbidden(f"role {p.role!r} of key {p.key_id} may not read usage reports",
                        fix="use a key whose role grants reports.read.own", key_id=p.key_id)
    if p.role == "builder" and p.team_id:
        return u.team_id == p.team_id
    if p.user_id:
        return (u.user_id == p.user_id) | (u.key_id == p.key_id)
    return u.key_id == p.key_id


@dataclass(frozen=True)
class ReportQuery:
    """What to report: the grouping, the time range [start, end) and equality filters by dimension."""

    group_by: tuple[str, ...] = ("day",)
    start: datetime = field(default_factory=lambda: datetime.now(UTC) - timedelta(days=DEFAULT_DAYS))
    end: datetime = field(default_factory=lambda: datetime.now(UTC))
    filters: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, params: Mapping[str, str], now: datetime | None = None) -> ReportQuery:
        """From query parameters: `group_by=team,model`, `start`/`end` (ISO date or date-time, UTC unless it
        says otherwise; default the last 30 days), and `<dimension>=<value>` filters."""
        now = now or datetime.now(UTC)
        names = [n.strip() for n in (params.get("group_by") or "day").split(",") if n.strip()]
        group_by = tuple(dict.fromkeys(_dimension(n, "group_by") for n in names)) or ("day",)
        end = _when(params["end"], "end") if params.get("end") else now
        start = _when(params["start"], "start") if params.get("start") else end - timedelta(days=DEFAULT_DAYS)
        if start >= end:
            raise BadRequest(f"start {start.isoformat()} is not before end {end.isoformat()}",
                             fix="give a start earlier than the end")
        filters = []
        for k, v in params.items():
            if k in ("group_by", "start", "end", "format"):
                continue
            name = _dimension(k, "filter")
            if name == "day":
                raise BadRequest("`day` is not a filter", fix="use start= and end= for a time range")
            if len(v) > 300:
                raise BadRequest(f"filter {k} is longer than 300 characters", fix="send the id or name itself")
            filters.append((name, v))
        return cls(group_by=group_by, start=start, end=end, filters=tuple(sorted(filters)))


def _dimension(name: str, what: str) -> str:
    name = SYNONYMS.get(name, name)
    if name not in DIMENSIONS:
        raise BadRequest(f"unknown {what} {name[:60]!r}", fix=f"use one of: {', '.join(DIMENSIONS)}")
    return name


def _when(text: str, name: str) -> datetime:
    try:
        if len(text) == 10:
            d = date.fromisoformat(text)
            return datetime(d.year, d.month, d.day, tzinfo=UTC)
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(f"{name} {text[:40]!r} is not an ISO 8601 date or date-time",
                         fix=f"e.g. {name}=2026-12-01 or {name}=2026-12-01T08:00:00Z") from None
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


class _Group:
    __slots__ = ("requests", "errors", "cancelled", "cache_hits", "tokens_in", "tokens_out", "cost", "saved_cost",
                 "latency", "fb_count", "fb_scored", "fb_sum")

    def __init__(self) -> None:
        self.requests = self.errors = self.cancelled = self.cache_hits = self.tokens_in = self.tokens_out = 0
        self.cost = self.saved_cost = self.fb_sum = 0.0
        self.fb_count = self.fb_scored = 0
        self.latency = array("d")

    def add(self, r: Any) -> None:
        self.requests += 1
        self.errors += r.status == "error"
        self.cancelled += r.status == "cancelled"
        self.cache_hits += bool(r.cache_hit)
        self.tokens_in += r.tokens_in or 0
        self.tokens_out += r.tokens_out or 0
        self.cost += r.cost or 0.0
        self.saved_cost += r.saved_cost or 0.0
        self.latency.append(r.latency_ms or 0.0)
        if r.fb_count:
            self.fb_count += r.fb_count
            self.fb_scored += r.fb_scored or 0
            self.fb_sum += r.fb_sum or 0.0

    def figures(self) -> dict[str, Any]:
        lat = sorted(self.latency)
        return {
            "requests": self.requests, "errors": self.errors, "cancelled": self.cancelled,
            "cache_hits": self.cache_hits, "tokens_in": self.tokens_in, "tokens_out": self.tokens_out,
            "total_tokens": self.tokens_in + self.tokens_out, "cost": round(self.cost, 9),
            "saved_cost": round(self.saved_cost, 9), "latency_p50_ms": percentile(lat, 50),
            "latency_p95_ms": percentile(lat, 95), "feedback_count": self.fb_count,
            "feedback_avg_score": round(self.fb_sum / self.fb_scored, 6) if self.fb_scored else None,
        }


def percentile(ordered: list[float], p: float) -> float | None:
    """Nearest rank: the smallest value with at least `p`% of the values at or below it."""
    if not ordered:
        return None
    return round(ordered[max(math.ceil(p / 100 * len(ordered)), 1) - 1], 3)


def report(store: Store, p: Principal, q: ReportQuery) -> dict[str, Any]:
    """The report `p` may see for `q`: one entry per group (sorted by its keys) and the totals."""
    scope = visible(p)
    f = feedback.c
    fb = (sa.select(f.request_id, sa.func.count().label("fb_count"), sa.func.count(f.score).label("fb_scored"),
                    sa.func.sum(f.score).label("fb_sum")).group_by(f.request_id).subquery())
    stmt = (sa.select(u.ts, u.team_id, u.key_id, u.user_id, u.use_case, u.task_id, u.alias, u.deployment,
                      u.provider, u.kind, u.status, u.cache_hit, u.tokens_in, u.tokens_out, u.cost, u.saved_cost,
                      u.latency_ms, fb.c.fb_count, fb.c.fb_scored, fb.c.fb_sum)
            .select_from(usage_ledger.outerjoin(fb, fb.c.request_id == u.request_id))
            .where(u.ts >= q.start, u.ts < q.end))
    if scope is not None:
        stmt = stmt.where(scope)
    for name, value in q.filters:
        stmt = stmt.where(DIMENSIONS[name][1](value))  # type: ignore[misc]
    getters = [DIMENSIONS[n][0] for n in q.group_by]
    groups: dict[tuple[Any, ...], _Group] = {}
    total = _Group()
    truncated = False
    with store.engine.connect() as conn:
        for r in conn.execution_options(yield_per=5000).execute(stmt):
            key = tuple(g(r) for g in getters)
            grp = groups.get(key)
            if grp is None:
                if len(groups) >= MAX_GROUPS:
                    truncated = True
                    total.add(r)
                    continue
                grp = groups[key] = _Group()
            grp.add(r)
            total.add(r)
    data = [{**dict(zip(q.group_by, key)), **grp.figures()}
            for key, grp in sorted(groups.items(), key=lambda kv: tuple("" if k is None else str(k) for k in kv[0]))]
    return {"object": "usage_report", "group_by": list(q.group_by), "start": q.start.isoformat(),
            "end": q.end.isoformat(), "filters": dict(q.filters), "data": data, "totals": total.figures(),
            "truncated": truncated}


def to_csv(rep: dict[str, Any]) -> str:
    """The report's groups as CSV: the dimensions, then every figure; empty cells for none."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    cols = [*rep["group_by"], *METRICS]
    w.writerow(cols)
    for row in rep["data"]:
        w.writerow([_cell(row.get(c)) for c in cols])
    return out.getvalue()


def _cell(value: Any) -> Any:
    """A CSV cell; text a spreadsheet would run as a formula (a task id of `=HYPERLINK(…)`) is quoted."""
    if value is None:
        return ""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value
