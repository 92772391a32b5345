"""Usage reports read from the daily rollups: the console's Overview and Usage & cost pages at any ledger size.

The same groups, filters, visibility rules (`usage.visible`) and figures as `usage.report`, except that latency
percentiles come from the rollups' histograms (within 12% of the exact nearest-rank value, keel/observe/rollup.py)
and feedback is not reported (the API's `GET /v1/usage` and the CSV download keep both exact). Whole UTC days of
the range are read from the rollups; the partial days at either end from the ledger itself, with the same
bucketing. A grouping or filter the rollups do not keep (task, workflow or agent run, kind) falls back to
`usage.report`.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from keel.core.db import Store
from keel.identity.principal import Principal
from keel.observe import rollup
from keel.observe.rollup import HIST, usage_rollup
from keel.observe.tables import usage_ledger
from keel.observe.usage import DIMENSIONS, MAX_GROUPS, ReportQuery, report, visible

r = usage_rollup.c
u = usage_ledger.c


def _after(prefix: str) -> sa.ColumnElement[Any]:
    return sa.case((r.use_case.like(prefix + "%"), sa.func.substr(r.use_case, len(prefix) + 1)), else_=None)


# name → (the dimension over the rollups, the filter for `name=value`)
ROLLED: dict[str, tuple[sa.ColumnElement[Any], Callable[[str], sa.ColumnElement[bool]] | None]] = {
    "day": (r.bucket, None),
    "team": (r.team_id, lambda v: r.team_id == v),
    "key": (r.key_id, lambda v: r.key_id == v),
    "user": (r.user_id, lambda v: r.user_id == v),
    "use_case": (r.use_case, lambda v: r.use_case == v),
    "model": (r.alias, lambda v: r.alias == v),
    "deployment": (r.deployment, lambda v: r.deployment == v),
    "provider": (r.provider, lambda v: r.provider == v),
    "status": (r.status, lambda v: r.status == v),
    "workflow": (_after("workflow:"), lambda v: r.use_case == f"workflow:{v}"),
    "agent": (_after("agent:"), lambda v: r.use_case == f"agent:{v}"),
}


def covers(q: ReportQuery) -> bool:
    """Whether the rollups keep every grouping and filter of `q`."""
    return all(n in ROLLED for n in q.group_by) and all(n in ROLLED for n, _ in q.filters)


def _midnight(t: datetime) -> datetime:
    t = t.astimezone(UTC)
    return datetime(t.year, t.month, t.day, tzinfo=UTC)


def _whole_days(q: ReportQuery) -> tuple[datetime, datetime] | None:
    """The whole UTC days inside [start, end), as [first midnight, last midnight); None if there is none."""
    first = _midnight(q.start)
    if first < q.start:
        first += timedelta(days=1)
    last = _midnight(q.end)
    return (first, last) if first < last else None


def _empty() -> list[Any]:
    return [0] * len(rollup.COUNTS) + [0.0] * len(rollup.SUMS) + [0] * HIST


def _key(values: Any) -> tuple[Any, ...]:
    return tuple(None if v == "" else v for v in values)


def _from_rollups(conn: sa.Connection, p: Principal, q: ReportQuery, days: tuple[datetime, datetime],
                  into: dict[tuple[Any, ...], list[Any]]) -> None:
    dims = [ROLLED[n][0].label(f"d{i}") for i, n in enumerate(q.group_by)]
    where = [r.bucket >= days[0].strftime("%Y-%m-%d"), r.bucket < days[1].strftime("%Y-%m-%d")]
    scope = visible(p, r)
    if scope is not None:
        where.append(scope)
    where += [ROLLED[n][1](v) for n, v in q.filters]  # type: ignore[misc]
    sums = [sa.func.sum(r[n]).label(n) for n in rollup.VALUES]
    width = len(dims)
    for row in conn.execute(sa.select(*dims, *sums).where(*where).group_by(*dims)):
        acc = into.setdefault(_key(row[:width]), _empty())
        for i, v in enumerate(row[width:]):
            acc[i] += v or 0


def _from_ledger(conn: sa.Connection, p: Principal, q: ReportQuery, ranges: list[tuple[datetime, datetime]],
                 into: dict[tuple[Any, ...], list[Any]]) -> None:
    dialect = conn.dialect.name
    dims = [DIMENSIONS[n][0](dialect).label(f"d{i}") for i, n in enumerate(q.group_by)]
    where = [sa.or_(*((u.ts >= a) & (u.ts < b) for a, b in ranges))]
    scope = visible(p)
    if scope is not None:
        where.append(scope)
    where += [DIMENSIONS[n][1](v) for n, v in q.filters]  # type: ignore[misc]
    cols = [u.ts, u.status, u.cache_hit, u.tokens_in, u.tokens_out, u.cost, u.saved_cost, u.latency_ms]
    width = len(dims)
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in conn.execute(sa.select(*dims, *cols).where(*where)):
        groups.setdefault(_key(row[:width]), []).append(row._mapping)
    for k, rows in groups.items():
        acc = into.setdefault(k, _empty())
        for part in rollup.aggregate(rows).values():
            for i, v in enumerate(part):
                acc[i] += v


def _figures(v: list[Any]) -> dict[str, Any]:
    requests, errors, cancelled, cache_hits, n_in, n_out, cost, saved = v[:8]
    hist = v[8:]
    return {"requests": int(requests), "errors": int(errors), "cancelled": int(cancelled),
            "cache_hits": int(cache_hits), "tokens_in": int(n_in), "tokens_out": int(n_out),
            "total_tokens": int(n_in) + int(n_out), "cost": round(float(cost), 9), "saved_cost": round(float(saved), 9),
            "latency_p50_ms": rollup.hist_percentile(hist, 50), "latency_p95_ms": rollup.hist_percentile(hist, 95)}


def rollup_report(store: Store, p: Principal, q: ReportQuery) -> dict[str, Any]:
    """The report `p` may see for `q`, as `usage.report` shapes it, from the rollups (see the module's docstring)."""
    if not covers(q):
        return report(store, p, q)
    visible(p)  # a role with no report right is refused before anything is read
    days = _whole_days(q)
    groups: dict[tuple[Any, ...], list[Any]] = {}
    with store.read() as conn:
        if days is None:
            _from_ledger(conn, p, q, [(q.start, q.end)], groups)
        else:
            _from_rollups(conn, p, q, days, groups)
            edges = [(a, b) for a, b in ((q.start, days[0]), (days[1], q.end)) if a < b]
            if edges:
                _from_ledger(conn, p, q, edges, groups)
    keys = sorted(groups, key=lambda k: tuple("" if v is None else str(v) for v in k))
    total = _empty()
    for v in groups.values():
        for i, x in enumerate(v):
            total[i] += x
    return {"object": "usage_report", "group_by": list(q.group_by), "start": q.start.isoformat(),
            "end": q.end.isoformat(), "filters": dict(q.filters),
            "data": [{**dict(zip(q.group_by, k)), **_figures(groups[k])} for k in keys[:MAX_GROUPS]],
            "totals": _figures(total), "truncated": len(keys) > MAX_GROUPS, "latency": "histogram"}

