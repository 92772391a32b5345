"""Overview and Usage & cost read the daily rollups for whole days (and the ledger for today): past days' calls,
written by the ledger's own flush into a running server's store, show on the pages with the same figures as the
ledger; a member sees only its own calls (another team's model, team and totals never appear, not even when it
filters by that team); malformed parameters are 400 pages. Real server, real store (SQLite or PostgreSQL)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from keel.core.db import Store
from keel.observe.ledger import Ledger
from tests.console.test_sessions import sign_in

pytestmark = pytest.mark.store


def signed_in(srv, key: str) -> httpx.Client:
    c = httpx.Client(base_url=srv.url, timeout=30)
    assert sign_in(c, key=key).status_code == 303
    return c


def total(html: str, name: str) -> str:
    return re.search(rf"<dt>{name}</dt><dd>([^<]*)</dd>", html).group(1)


def test_reports_from_rollups_and_a_member_sees_only_its_own_calls(server, db_url) -> None:
    admin = server.admin()
    teams = {t: admin.post("/admin/teams", json={"name": t}).json()["id"] for t in ("red", "blue")}
    keys = {t: admin.post("/admin/keys", json={"role": "member", "team": t, "name": f"{t}_m"}).json()
            for t in ("red", "blue")}
    now = datetime.now(UTC)
    plan = [("red", "red-model", 2, 3), ("red", "red-model", 1, 2), ("blue", "blue-secret-model", 3, 4)]
    store = Store.open(db_url)
    try:  # past days' calls, written as the gateway's are: by the ledger's flush (its rows and their rollups)
        ledger = Ledger(store)
        n = 0
        for team, model, days_ago, calls in plan:
            for _ in range(calls):
                n += 1
                ledger.record({"request_id": f"req_console{n}", "ts": now - timedelta(days=days_ago),
                               "key_id": keys[team]["id"], "team_id": teams[team], "kind": "chat", "alias": model,
                               "tokens_in": 10, "tokens_out": 5, "cost": 0.25 if team == "blue" else 0.01,
                               "latency_ms": 100.0 * n, "status": "ok", "http_status": 200, "stream": False,
                               "cache_hit": False, "saved_cost": 0.0})
        ledger.flush_sync()
    finally:
        store.dispose()
    red, adm = signed_in(server, keys["red"]["key"]), signed_in(server, admin.headers["authorization"][7:])
    try:
        everything = adm.get("/console/overview")
        assert everything.status_code == 200
        assert total(everything.text, "Requests") == "9" and total(everything.text, "Cost") == "$1.0500"
        assert "blue-secret-model" in everything.text
        mine = red.get("/console/overview")
        assert mine.status_code == 200
        assert total(mine.text, "Requests") == "5" and total(mine.text, "Cost") == "$0.0500"
        for path in ("/console/overview", "/console/usage?group_by=model", "/console/usage?group_by=team",
                     f"/console/usage?group_by=day&team={teams['blue']}", "/console/usage?group_by=key"):
            page = red.get(path)
            assert page.status_code == 200, path
            echoed = page.text.replace(f"team={teams['blue']}", "").replace(f'value="{teams["blue"]}"', "")
            assert "blue-secret-model" not in page.text and teams["blue"] not in echoed, path
            assert keys["blue"]["id"] not in page.text, path
        by_model = red.get("/console/usage?group_by=model").text
        assert "red-model" in by_model and "5 requests" in by_model
        assert "0 requests" in red.get(f"/console/usage?group_by=day&team={teams['blue']}").text
        for bad in ("/console/usage?group_by=bogus", "/console/usage?start=yesterday", "/console/overview?end=x",
                    "/console/usage?team=" + "x" * 400, "/console/usage?page=two"):
            assert red.get(bad).status_code == 400, bad
    finally:
        red.close()
        adm.close()


def test_budget_use_shows_the_budgets_that_bind_the_caller(server) -> None:
    """Overview's budget use and `GET /v1/budgets` show a member its own key's and team's budgets, never another
    team's; an admin sees every budget."""
    admin = server.admin()
    teams = {t: admin.post("/admin/teams", json={"name": f"{t}_b"}).json()["id"] for t in ("red", "blue")}
    keys = {t: admin.post("/admin/keys", json={"role": "member", "team": f"{t}_b", "name": f"{t}_bm"}).json()
            for t in ("red", "blue")}
    nobody = admin.post("/admin/keys", json={"role": "member", "name": "teamless_bm"}).json()
    for scope, scope_id, amount in (("team", teams["red"], 40), ("team", teams["blue"], 70),
                                    ("key", keys["red"]["id"], 5)):
        r = admin.post("/admin/budgets", json={"scope": scope, "scope_id": scope_id, "period": "month",
                                               "amount": amount})
        assert r.status_code == 201, r.text
    with httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {keys['red']['key']}"}) as c:
        mine = c.get("/v1/budgets").json()["data"]
    assert sorted((b["scope"], b["scope_id"], b["amount"]) for b in mine) == [
        ("key", keys["red"]["id"], 5.0), ("team", teams["red"], 40.0)]
    with httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {nobody['key']}"}) as c:
        assert c.get("/v1/budgets").json()["data"] == []
    assert {b["scope_id"] for b in admin.get("/v1/budgets").json()["data"]} >= {teams["red"], teams["blue"]}
    red, adm = signed_in(server, keys["red"]["key"]), signed_in(server, admin.headers["authorization"][7:])
    try:
        page = red.get("/console/overview").text
        assert "Budget use this period" in page and f"team {teams['red']} (month)" in page
        assert f"key {keys['red']['id']} (month)" in page and teams["blue"] not in page
        everything = adm.get("/console/overview").text
        assert f"team {teams['blue']} (month)" in everything and f"team {teams['red']} (month)" in everything
    finally:
        red.close()
        adm.close()
