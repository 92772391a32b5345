"""Overview, Usage & cost and Audit: the ledger's reports and the audit chain, through the same service
functions (and so the same visibility rules) as `GET /v1/usage` and `GET /v1/audit`."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from keel.console import charts
from keel.console.web import Page
from keel.core.errors import BadRequest
from keel.gateway.budgets import Budgets
from keel.governance.audit import public_event
from keel.observe.rollup_report import rollup_report
from keel.observe.usage import DEFAULT_DAYS, DIMENSIONS, ReportQuery, report, to_csv

PAGE_SIZE = 50
FILTERS = ("team", "model", "use_case", "key", "status")
GROUPS = ("day", "team", "model", "use_case", "key", "user", "deployment", "provider", "status", "workflow", "agent")


def _query(params: dict[str, str], group_by: str) -> ReportQuery:
    """A report query from the page's own parameters (its filters, start, end), grouped by `group_by` (a
    comma-separated list of dimensions). With no start, the range begins at midnight UTC 29 days before the end's
    day (30 days on the charts), so only the end's own day is read from the ledger rather than the rollups."""
    wanted = {k: v for k, v in params.items() if k in ("start", "end") + FILTERS and v}
    q = ReportQuery.parse({**wanted, "group_by": group_by})
    if not wanted.get("start"):
        start = datetime(q.end.year, q.end.month, q.end.day, tzinfo=UTC) - timedelta(days=DEFAULT_DAYS - 1)
        q = replace(q, start=min(start, q.end - timedelta(microseconds=1)))
    return q


async def overview(page: Page) -> Response:
    params = dict(page.request.query_params)
    store = page.store
    days = await run_in_threadpool(rollup_report, store, page.p, _query(params, "day"))
    # the three breakdowns, cost and requests only (no percentiles): each reads its own small rollup grain
    by: dict[str, dict[str, dict[str, float]]] = {}
    for dim in ("team", "model", "use_case"):
        rep = await run_in_threadpool(rollup_report, store, page.p, _query(params, dim), False)
        by[dim] = {str(r[dim] or "none"): {"cost": r["cost"], "requests": r["requests"]} for r in rep["data"]}
    rows = days["data"]
    charts_ = {
        "requests": charts.series([(r["day"], r["requests"]) for r in rows], "requests"),
        "cost": charts.series([(r["day"], r["cost"]) for r in rows], "cost (USD)"),
        "tokens": charts.series([(r["day"], r["total_tokens"]) for r in rows], "tokens"),
        "errors": charts.series([(r["day"], r["errors"]) for r in rows], "errors"),
        "latency": charts.series([(r["day"], r["latency_p95_ms"] or 0) for r in rows], "p95 latency (ms)"),
        "cache": charts.series([(r["day"], r["cache_hits"]) for r in rows], "cache hits"),
    }
    guard = await _guard_actions(page)
    budget_use = await _budget_use(page)
    bars = {dim: charts.bars([(k, v["cost"]) for k, v in sums.items()], f"cost by {dim}", " USD")
            for dim, sums in by.items()}
    req_bars = {dim: charts.bars([(k, v["requests"]) for k, v in sums.items()], f"requests by {dim}")
                for dim, sums in by.items()}
    return page.render("overview.html", title="Overview", totals=days["totals"], charts=charts_, bars=bars,
                       req_bars=req_bars, guard=guard, budget_use=budget_use, start=days["start"][:10],
                       end=days["end"][:10])


async def _budget_use(page: Page) -> str:
    """Each budget's share used this period, as `GET /v1/budgets` shows them to this caller (an admin: every one)."""
    stage = next((s for s in page.state.gateway.stages if isinstance(s, Budgets)), None)
    if stage is None:
        return charts.bars([], "budgets")
    rows = await run_in_threadpool(stage.binding, page.p)
    return charts.bars([(f"{b['scope']} {b['scope_id']} ({b['period']})",
                         round(100 * float(b["spent"]) / float(b["amount"]), 1) if float(b["amount"]) else 0.0)
                        for b in rows], "budgets", " % used")


async def _guard_actions(page: Page) -> Any:
    """Guard actions per day, as `GET /v1/guard-events` shows them to this caller (its key's, or its scope's)."""
    gov = getattr(page.state, "governance", None)
    if gov is None:
        return charts.series([], "guard actions")
    p = page.p
    await gov.events.flush()
    if p.has("audit.read"):
        team = None if p.is_admin or p.team_id is None else p.team_id
        rows = await run_in_threadpool(lambda: gov.events.query(team_id=team, limit=1000))
    else:
        rows = await run_in_threadpool(lambda: gov.events.query(key_id=p.key_id, limit=1000))
    per_day: dict[str, int] = {}
    for r in rows:
        day = (r.get("ts") or "")[:10]
        per_day[day] = per_day.get(day, 0) + 1
    return charts.series(sorted(per_day.items()), "guard actions")


async def usage(page: Page) -> Response:
    params = dict(page.request.query_params)
    group = params.get("group_by") or "day"
    if group not in DIMENSIONS:
        raise BadRequest(f"unknown grouping {group[:40]!r}", fix=f"use one of: {', '.join(GROUPS)}")
    rep = await run_in_threadpool(rollup_report, page.store, page.p, _query(params, group))
    try:
        number = max(1, int(params.get("page") or 1))
    except ValueError:
        raise BadRequest("page must be a number", fix="use page=1, 2, …") from None
    data = rep["data"]
    pages = max(1, -(-len(data) // PAGE_SIZE))
    number = min(number, pages)
    shown = data[(number - 1) * PAGE_SIZE:number * PAGE_SIZE]
    keep = {k: v for k, v in params.items() if k != "page" and v}
    return page.render("usage.html", title="Usage & cost", rep=rep, rows=shown, group=group, groups=GROUPS,
                       filters=FILTERS, params=params, number=number, pages=pages, keep=keep,
                       chart=charts.bars([(str(r[group] or "none"), r["cost"]) for r in data], f"cost by {group}",
                                         " USD") if group != "day" else
                       charts.series([(r["day"], r["cost"]) for r in data], "cost (USD)"))


async def usage_csv(page: Page) -> Response:
    params = dict(page.request.query_params)
    group = params.get("group_by") or "day"
    rep = await run_in_threadpool(report, page.store, page.p, _query(params, group))
    return Response(to_csv(rep), media_type="text/csv; charset=utf-8",
                    headers={"content-disposition": 'attachment; filename="keel-usage.csv"', "Cache-Control": "no-store"})


def _audit_scope(page: Page) -> str | None:
    page.p.require("audit.read")
    return None if page.p.is_admin or page.p.team_id is None else page.p.team_id


async def audit(page: Page) -> Response:
    team = _audit_scope(page)
    params = dict(page.request.query_params)
    action, actor = params.get("action", "")[:100], params.get("actor", "")[:100]
    before = params.get("before", "")
    if before and not before.isdigit():
        raise BadRequest("before must be an event number", fix="use the link under the table")
    gov = page.state.governance
    rows = await run_in_threadpool(lambda: gov.audit.events(team_id=team, action=action or None, actor=actor or None,
                                                            before=int(before) if before else None,
                                                            limit=PAGE_SIZE + 1))
    more = len(rows) > PAGE_SIZE
    events = [public_event(r) for r in rows[:PAGE_SIZE]]
    return page.render("audit.html", title="Audit", events=events, action=action, actor=actor,
                       older=events[-1]["seq"] if more and events else None)


async def audit_verify(page: Page) -> Response:
    _audit_scope(page)
    await page.form()
    gov = page.state.governance
    verdict = (await run_in_threadpool(gov.audit.verify)).to_dict()
    await page.audit("audit.verify", ok=verdict.get("ok"))
    return page.render("audit_verdict.html", title="Audit chain", verdict=verdict)


ROUTES = [
    ("GET", "/overview", overview),
    ("GET", "/usage", usage),
    ("GET", "/usage.csv", usage_csv),
    ("GET", "/audit", audit),
    ("POST", "/audit/verify", audit_verify),
]
