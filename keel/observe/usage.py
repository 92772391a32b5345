"""Usage and cost reports from the ledger: tokens, cost, requests, errors, p50/p95 latency and feedback,
grouped by any of the dimensions a ledger row records, over a time range.

Who sees what (`visible`): admins and auditors (`reports.read`) every row; a builder the rows of its own
team (it builds the team's workflows and agents, and pays for them); a member or reviewer only its own
calls — its user's keys, or the key itself for a key with no user — as LiteLLM shows an internal user its
own spend. A team-less builder sees only its own calls too.

The store adds up each group (one GROUP BY: counts and sums mean the same on SQLite and PostgreSQL); latency
percentiles are ranked here, not by the store (SQLite has none, PostgreSQL's interpolate), by the nearest-rank
rule: the smallest latency with at least p% of the group's calls at or below it. About 100k ledger rows a
second on SQLite on a laptop core.

Workflow and agent dimensions come from the ledger's conventions: a workflow step's call has use case
`workflow:<name>` and its run id as task id; an agent's, `agent:<name>` and its run id.
"""

from __future__ import annotations

import csv
import io
import math
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


def _after(prefix: str) -> sa.ColumnElement[Any]:
    """The use case's name after `prefix` (`workflow:lead_intake` → `lead_intake`), else NULL."""
    return sa.case((u.use_case.like(prefix + "%"), sa.func.substr(u.use_case, len(prefix) + 1)), else_=None)


def _run_of(prefix: str) -> sa.ColumnElement[Any]:
    return sa.case((u.use_case.like(prefix + "%"), u.task_id), else_=None)


def _day(dialect: str) -> sa.ColumnElement[Any]:
    """The row's UTC date as `YYYY-MM-DD`, computed by the store (SQLite keeps UTC text, PostgreSQL a timestamptz)."""
    if dialect == "sqlite":
        return sa.func.substr(u.ts, 1, 10)
    return sa.func.to_char(sa.func.timezone("UTC", u.ts), "YYYY-MM-DD")


Column = Callable[[str], sa.ColumnElement[Any]]  # the dimension as an SQL expression, for a dialect's name
# name → (its SQL expression, the SQL filter for `name=value`)
DIMENSIONS: dict[str, tuple[Column, Callable[[str], sa.ColumnElement[bool]] | None]] = {
    "day": (_day, None),
    "team": (lambda d: u.team_id, lambda v: u.team_id == v),
    "key": (lambda d: u.key_id, lambda v: u.key_id == v),
    "user": (lambda d: u.user_id, lambda v: u.user_id == v),
    "use_case": (lambda d: u.use_case, lambda v: u.use_case == v),
    "task": (lambda d: u.task_id, lambda v: u.task_id == v),
    "model": (lambda d: u.alias, lambda v: u.alias == v),
    "deployment": (lambda d: u.deployment, lambda v: u.deployment == v),
    "provider": (lambda d: u.provider, lambda v: u.provider == v),
    "kind": (lambda d: u.kind, lambda v: u.kind == v),
    "status": (lambda d: u.status, lambda v: u.status == v),
    "workflow": (lambda d: _after("workflow:"), lambda v: u.use_case == f"workflow:{v}"),
    "workflow_run": (lambda d: _run_of("workflow:"), lambda v: (u.task_id == v) & u.use_case.like(_LIKE_WORKFLOW)),
    "agent": (lambda d: _after("agent:"), lambda v: u.use_case == f"agent:{v}"),
    "agent_run": (lambda d: _run_of("agent:"), lambda v: (u.task_id == v) & u.use_case.like(_LIKE_AGENT)),
}
SYNONYMS = {"task_id": "task", "alias": "model", "model_alias": "model", "team_id": "team", "key_id": "key",
            "user_id": "user", "date": "day"}
METRICS = ("requests", "errors", "cancelled", "cache_hits", "tokens_in", "tokens_out", "total_tokens", "cost",
           "saved_cost", "latency_p50_ms", "latency_p95_ms", "feedback_count", "feedback_avg_score")


def visible(p: Principal, c: Any = u) -> sa.ColumnElement[bool] | None:
    """The ledger rows `p` may see, as a filter (None: all of them); 403 for a role with no report right. `c`: the
    columns to filter (`team_id`, `user_id`, `key_id`): the ledger's, or its rollups' (keel/observe/rollup.py)."""
    if p.has("reports.read"):
        return None
    if not p.has("reports.read.own"):
        raise Forbidden(f"role {p.role!r} of key {p.key_id} may not read usage reports",
                        fix="use a key whose role grants reports.read.own", key_id=p.key_id)
    if p.role == "builder" and p.team_id:
        return c.team_id == p.team_id
    if p.user_id:
        return (c.user_id == p.user_id) | (c.key_id == p.key_id)
    return c.key_id == p.key_id


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
            if len(v) > 300 or "\x00" in v:
                raise BadRequest(f"filter {k} is longer than 300 characters or holds a NUL character",
                                 fix="send the id or name itself")
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


def _count(cond: sa.ColumnElement[bool]) -> sa.ColumnElement[Any]:
    return sa.func.sum(sa.case((cond, 1), else_=0))


SUMS = {  # figure → its SQL aggregate over a group's rows
    "requests": sa.func.count(), "errors": _count(u.status == "error"), "cancelled": _count(u.status == "cancelled"),
    "cache_hits": _count(u.cache_hit.is_(True)), "tokens_in": sa.func.sum(u.tokens_in),
    "tokens_out": sa.func.sum(u.tokens_out), "cost": sa.func.sum(u.cost), "saved_cost": sa.func.sum(u.saved_cost),
}


def percentile(ordered: list[float], p: float) -> float | None:
    """Nearest rank: the smallest value with at least `p`% of the values at or below it."""
    if not ordered:
        return None
    return round(ordered[max(math.ceil(p / 100 * len(ordered)), 1) - 1], 3)


def _figures(sums: dict[str, Any], latencies: list[float], fb: tuple[int, int, float]) -> dict[str, Any]:
    ordered = sorted(latencies)
    n_in, n_out = int(sums["tokens_in"] or 0), int(sums["tokens_out"] or 0)
    return {
        "requests": int(sums["requests"]), "errors": int(sums["errors"] or 0),
        "cancelled": int(sums["cancelled"] or 0), "cache_hits": int(sums["cache_hits"] or 0),
        "tokens_in": n_in, "tokens_out": n_out, "total_tokens": n_in + n_out,
        "cost": round(float(sums["cost"] or 0), 9), "saved_cost": round(float(sums["saved_cost"] or 0), 9),
        "latency_p50_ms": percentile(ordered, 50), "latency_p95_ms": percentile(ordered, 95),
        "feedback_count": fb[0], "feedback_avg_score": round(fb[2] / fb[1], 6) if fb[1] else None,
    }


def report(store: Store, p: Principal, q: ReportQuery) -> dict[str, Any]:
    """The report `p` may see for `q`: one entry per group (sorted by its keys) and the totals.

    The store adds up each group (one GROUP BY); latencies come back one float per call and are ranked here,
    so percentiles are computed the same way on every store."""
    scope = visible(p)
    dialect = store.engine.dialect.name
    dims = [DIMENSIONS[n][0](dialect).label(f"d{i}") for i, n in enumerate(q.group_by)]
    where = [u.ts >= q.start, u.ts < q.end]
    if scope is not None:
        where.append(scope)
    where += [DIMENSIONS[name][1](value) for name, value in q.filters]  # type: ignore[misc]
    f = feedback.c
    fb = (sa.select(f.request_id, sa.func.count().label("n"), sa.func.count(f.score).label("scored"),
                    sa.func.sum(f.score).label("total")).group_by(f.request_id).subquery())
    sums = sa.select(*dims, *(agg.label(name) for name, agg in SUMS.items())).where(*where).group_by(*dims)
    fbs = (sa.select(*dims, sa.func.sum(fb.c.n).label("n"), sa.func.sum(fb.c.scored).label("scored"),
                     sa.func.sum(fb.c.total).label("total"))
           .select_from(usage_ledger.join(fb, fb.c.request_id == u.request_id)).where(*where).group_by(*dims))
    lat = sa.select(*dims, u.latency_ms).where(*where)
    width = len(dims)
    with store.engine.connect() as conn:
        groups = {tuple(r[:width]): r._mapping for r in conn.execute(sums)}
        feedbacks = {tuple(r[:width]): (int(r.n or 0), int(r.scored or 0), float(r.total or 0))
                     for r in conn.execute(fbs)}
        latencies: dict[tuple[Any, ...], list[float]] = {k: [] for k in groups}
        for r in conn.execution_options(yield_per=20_000).execute(lat):
            latencies[tuple(r[:width])].append(r[width] or 0.0)
    keys = sorted(groups, key=lambda k: tuple("" if v is None else str(v) for v in k))
    data = [{**dict(zip(q.group_by, k)), **_figures(groups[k], latencies[k], feedbacks.get(k, (0, 0, 0.0)))}
            for k in keys[:MAX_GROUPS]]
    total_sums = {name: sum((g[name] or 0) for g in groups.values()) for name in SUMS}
    fb_total = tuple(sum(v[i] for v in feedbacks.values()) for i in range(3))
    everything = [x for v in latencies.values() for x in v]
    return {"object": "usage_report", "group_by": list(q.group_by), "start": q.start.isoformat(),
            "end": q.end.isoformat(), "filters": dict(q.filters), "data": data,
            "totals": _figures(total_sums, everything, fb_total),  # type: ignore[arg-type]
            "truncated": len(keys) > MAX_GROUPS}


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
