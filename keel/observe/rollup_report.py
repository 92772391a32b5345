"""Usage reports read from the daily rollups: the console's Overview and Usage & cost pages at any ledger size.

The same groups, filters, visibility rules (`usage.visible`) and figures as `usage.report`, except that latency
percentiles come from the rollups' histograms (within 12% of the exact nearest-rank value, keel/observe/rollup.py)
and feedback is not reported (the API's `GET /v1/usage` and the CSV download keep both exact). Whole UTC days of
the range are read from the rollups (today's too when the range ends now: the console's default); the partial
days at either end from the ledger itself, with the same bucketing. A grouping or filter the rollups do not keep (task, workflow or agent run, kind) falls back to
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
from keel.observe.usage import SUMS as LEDGER_SUMS

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


class _TeamOnly:
    """The rollups' columns a visibility rule may use for rows summed over keys and users: the team only."""

    team_id = r.team_id


def covers(q: ReportQuery) -> bool:
    """Whether the rollups keep every grouping and filter of `q`."""
    return all(n in ROLLED for n in q.group_by) and all(n in ROLLED for n, _ in q.filters)


def _midnight(t: datetime) -> datetime:
    t = t.astimezone(UTC)
    return datetime(t.year, t.month, t.day, tzinfo=UTC)


def _whole_days(q: ReportQuery, now: datetime) -> tuple[datetime, datetime] | None:
    """The UTC days inside [start, end) that the rollups answer whole, as [first midnight, last midnight); None if
    there is none. A range that ends now or later holds the end's day whole: the ledger has no call after now."""
    first = _midnight(q.start)
    if first < q.start:
        first += timedelta(days=1)
    last = _midnight(q.end)
    if q.end >= now and last < q.end:
        last += timedelta(days=1)
    return (first, last) if first < last else None


def _empty() -> list[Any]:
    return [0] * len(rollup.COUNTS) + [0.0] * len(rollup.SUMS) + [0] * HIST


def _key(values: Any) -> tuple[Any, ...]:
    return tuple(None if v == "" else v for v in values)


COLUMN_OF = {"team": "team_id", "key": "key_id", "user": "user_id", "use_case": "use_case", "model": "alias",
             "deployment": "deployment", "provider": "provider", "status": "status", "workflow": "use_case",
             "agent": "use_case"}


def grain_for(p: Principal, q: ReportQuery) -> tuple[str, sa.ColumnElement[bool] | None]:
    """The smallest rollup grain that keeps every dimension `q` groups or filters by and `p`'s visibility rule
    uses, and that rule over the rollups."""
    need = {COLUMN_OF[n] for n in q.group_by if n != "day"} | {COLUMN_OF[n] for n, _ in q.filters}
    try:  # a rule decided by team alone (or none: everything)
        scope = visible(p, _TeamOnly)
        need |= {"team_id"} if scope is not None else set()
    except AttributeError:  # it depends on the key or the user
        scope = visible(p, r)
        need |= {"team_id", "key_id", "user_id"}
    return next(g for g, kept in rollup.GRAINS.items() if need <= set(kept)), scope


def _from_rollups(conn: sa.Connection, p: Principal, q: ReportQuery, days: tuple[datetime, datetime],
                  into: dict[tuple[Any, ...], list[Any]], latency: bool) -> None:
    dims = [ROLLED[n][0].label(f"d{i}") for i, n in enumerate(q.group_by)]
    grain, scope = grain_for(p, q)
    where = [r.grain == grain, r.bucket >= days[0].strftime("%Y-%m-%d"), r.bucket < days[1].strftime("%Y-%m-%d")]
    if scope is not None:
        where.append(scope)
    where += [ROLLED[n][1](v) for n, v in q.filters]  # type: ignore[misc]
    names = rollup.VALUES if latency else rollup.COUNTS + rollup.SUMS
    sums = [sa.func.sum(r[n]).label(n) for n in names]
    width = len(dims)
    _add_sums(conn.execute(sa.select(*dims, *sums).where(*where).group_by(*dims)), width, into)


def _add_sums(rows: Any, width: int, into: dict[tuple[Any, ...], list[Any]]) -> None:
    """Add grouped rows (`width` group columns, then the sums in `VALUES` order) to the figures per group."""
    for row in rows:
        k = _key(row[:width])
        acc = into.get(k)
        if acc is None:
            acc = into[k] = _empty()
        for i, v in enumerate(row[width:]):
            acc[i] += v or 0


def _from_ledger(conn: sa.Connection, p: Principal, q: ReportQuery, ranges: list[tuple[datetime, datetime]],
                 into: dict[tuple[Any, ...], list[Any]], latency: bool) -> None:
    """Add the ledger's own rows in `ranges` (the partial days): the store adds up each group, the latencies are
    bucketed here as the rollups bucket them."""
    dialect = conn.dialect.name
    dims = [DIMENSIONS[n][0](dialect).label(f"d{i}") for i, n in enumerate(q.group_by)]
    scope = visible(p)
    where = ([] if scope is None else [scope]) + [DIMENSIONS[n][1](v) for n, v in q.filters]  # type: ignore[misc]
    sums = [LEDGER_SUMS[n].label(n) for n in rollup.COUNTS + rollup.SUMS]
    width = len(dims)
    for a, b in ranges:  # one indexed range scan each
        within = [u.ts >= a, u.ts < b, *where]
        _add_sums(conn.execute(sa.select(*dims, *sums).where(*within).group_by(*dims)), width, into)
        if latency:
            bucket_of = rollup.bucket_of
            for row in conn.execute(sa.select(*dims, u.latency_ms).where(*within)).all():
                into[_key(row[:width])][8 + bucket_of(row[width])] += 1


def _figures(v: list[Any], latency: bool = True) -> dict[str, Any]:
    requests, errors, cancelled, cache_hits, n_in, n_out, cost, saved = v[:8]
    hist = v[8:]
    return {"requests": int(requests), "errors": int(errors), "cancelled": int(cancelled),
            "cache_hits": int(cache_hits), "tokens_in": int(n_in), "tokens_out": int(n_out),
            "total_tokens": int(n_in) + int(n_out), "cost": round(float(cost), 9), "saved_cost": round(float(saved), 9),
            "latency_p50_ms": rollup.hist_percentile(hist, 50) if latency else None,
            "latency_p95_ms": rollup.hist_percentile(hist, 95) if latency else None}


def rollup_report(store: Store, p: Principal, q: ReportQuery, latency: bool = True,
                  now: datetime | None = None) -> dict[str, Any]:
    """The report `p` may see for `q`, as `usage.report` shapes it, from the rollups (see the module's docstring).
    `latency=False`: no percentiles (None), for a report that shows none: the histograms are not added up. `now`
    (the clock; default the system's): a range ending at or after it reads today's rollup rather than the ledger."""
    if not covers(q):
        return report(store, p, q)
    visible(p)  # a role with no report right is refused before anything is read
    days = _whole_days(q, now or datetime.now(UTC))
    groups: dict[tuple[Any, ...], list[Any]] = {}
    with store.read() as conn:
        if days is None:
            _from_ledger(conn, p, q, [(q.start, q.end)], groups, latency)
        else:
            _from_rollups(conn, p, q, days, groups, latency)
            edges = [(a, b) for a, b in ((q.start, days[0]), (days[1], q.end)) if a < b]
            if edges:
                _from_ledger(conn, p, q, edges, groups, latency)
    keys = sorted(groups, key=lambda k: tuple("" if v is None else str(v) for v in k))
    total = _empty()
    for v in groups.values():
        for i, x in enumerate(v):
            total[i] += x
    return {"object": "usage_report", "group_by": list(q.group_by), "start": q.start.isoformat(),
            "end": q.end.isoformat(), "filters": dict(q.filters),
            "data": [{**dict(zip(q.group_by, k)), **_figures(groups[k], latency)} for k in keys[:MAX_GROUPS]],
            "totals": _figures(total, latency), "truncated": len(keys) > MAX_GROUPS, "latency": "histogram"}

