"""`GET /v1/usage` and `keel usage`: every figure equals what the ledger's own rows add up to (on SQLite and on
PostgreSQL, percentiles included), each caller sees only the calls its role may see, CSV matches JSON, and
a caller's mistakes are 400s that say how to fix them."""

from __future__ import annotations

import csv
import io
import math
import subprocess
import sys
from collections import defaultdict
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from conftest import ROOT, fake_upstream, ledger_rows, problem, wait_ledger

pytestmark = pytest.mark.store


def nearest_rank(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return round(ordered[max(math.ceil(p / 100 * len(ordered)), 1) - 1], 3)


class Traffic:
    """One server, two teams and a mix of calls: ok, failed upstream, unknown model, workflow-tagged."""

    def __init__(self, srv, upstream: str) -> None:
        self.srv = srv
        admin = srv.admin()
        for team in ("red", "blue"):
            assert admin.post("/admin/teams", json={"name": team}).status_code in (201, 409)
        self.keys = {}
        for name, role, team in (("red_a", "member", "red"), ("red_b", "member", "red"),
                                 ("red_builder", "builder", "red"), ("blue", "member", "blue"), ("loner", "member", None), ("auditor", "auditor", None),
                                 ("red_auditor", "auditor", "red")):
            k = admin.post("/admin/keys", json={"role": role, "team": team, "name": name}).json()
            self.keys[name] = k
        self.request_ids: dict[str, list[str]] = defaultdict(list)
        plan = [("red_a", "fake", {"use_case": "support", "task_id": "t-1"}, 3),
                ("red_a", "fake", {"use_case": "workflow:lead_intake", "task_id": "run_1"}, 2),
                ("red_b", "fake", {"use_case": "support", "task_id": "t-2"}, 2),
                ("blue", "fake", {"use_case": "=HYPERLINK(\"x\")", "task_id": "t-3"}, 2),
                ("loner", "fake", {}, 1),
                ("red_a", "nope", {}, 1)]  # an unknown model: an error row without a deployment
        n = 0
        for name, model, meta, times in plan:
            for i in range(times):
                body = {"model": model, "messages": [{"role": "user", "content": "word " * (3 + 7 * i)}],
                        "max_tokens": 5 + i, "metadata": meta}
                r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=30,
                               headers={"Authorization": f"Bearer {self.keys[name]['key']}"})
                assert r.status_code in (200, 404), r.text
                self.request_ids[name].append(r.headers["x-request-id"])
                n += 1
        httpx.post(upstream + "/_control", json={"fault": "500", "times": 1})
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=30,
                       headers={"Authorization": f"Bearer {self.keys['red_b']['key']}"}, json={"model": "fake", "messages": [{"role": "user", "content": "boom"}]})
        assert r.status_code == 502, r.text
        self.rows = wait_ledger(srv.extra["db_url"], n=n + 1)

    def client(self, name: str) -> httpx.Client:
        return self.srv.client(self.keys[name]["key"])


@pytest.fixture(scope="module")
def traffic(module_server_factory, tmp_path_factory):
    with fake_upstream("--latency-ms", "5") as upstream:
        base = tmp_path_factory.mktemp("usage")
        cfg = base / "keel.yaml"
        cfg.write_text(f"""
models:
  - {{alias: fake, provider: openai_compatible, model: gpt-fake, base_url: {upstream}/v1,
     input_price_per_1m: 1.0, output_price_per_1m: 2.0}}
aliases:
  fake: {{retries: 0}}
ledger_flush_interval_s: 0.1
""")
        yield Traffic(module_server_factory(config=cfg), upstream)


def expected(rows, key) -> dict:
    """The report computed straight from ledger rows, grouped by `key(row)`."""
    groups = defaultdict(list)
    for r in rows:
        groups[key(r)].append(r)
    out = {}
    for k, rs in groups.items():
        lat = [r.latency_ms for r in rs]
        out[k] = {"requests": len(rs), "errors": sum(r.status == "error" for r in rs),
                  "tokens_in": sum(r.tokens_in for r in rs), "tokens_out": sum(r.tokens_out for r in rs),
                  "cost": sum(r.cost for r in rs), "latency_p50_ms": nearest_rank(lat, 50),
                  "latency_p95_ms": nearest_rank(lat, 95)}
    return out


def check(report: dict, dims: list[str], want: dict) -> None:
    got = {tuple(row[d] for d in dims): row for row in report["data"]}
    assert set(got) == set(want), (sorted(got, key=str), sorted(want, key=str))
    for k, w in want.items():
        g = got[k]
        for name, value in w.items():
            assert g[name] == pytest.approx(value, abs=1e-9), (k, name, g[name], value)


def test_report_equals_the_ledger_rows_grouped(traffic):
    """Admin's view by team, model, day: requests, errors, tokens, cost and nearest-rank p50/p95 of each group."""
    rows = ledger_rows(traffic.srv.extra["db_url"])
    rep = traffic.srv.admin().get("/v1/usage", params={"group_by": "team,model,day"}).json()
    day = lambda ts: ts[:10] if isinstance(ts, str) else ts.astimezone(UTC).date().isoformat()  # noqa: E731
    check(rep, ["team", "model", "day"], expected(rows, lambda r: (r.team_id, r.alias, day(r.ts))))
    assert rep["totals"]["requests"] == len(rows) and rep["totals"]["errors"] == 2
    assert rep["totals"]["cost"] == pytest.approx(sum(r.cost for r in rows))

    rep = traffic.srv.admin().get("/v1/usage", params={"group_by": "workflow,workflow_run,task_id"}).json()
    def wf(r):
        return ("lead_intake", "run_1", "run_1") if r.use_case == "workflow:lead_intake" else (None, None, r.task_id)
    check(rep, ["workflow", "workflow_run", "task"], expected(rows, wf))


def test_filters_and_time_range(traffic):
    admin = traffic.srv.admin()
    rows = ledger_rows(traffic.srv.extra["db_url"])
    red = next(r.team_id for r in rows if r.key_id == traffic.keys["red_a"]["id"])
    rep = admin.get("/v1/usage", params={"group_by": "key", "team": red, "use_case": "support"}).json()
    support = [r for r in rows if r.team_id == red and r.use_case == "support"]
    check(rep, ["key"], expected(support, lambda r: (r.key_id,)))
    future = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
    rep = admin.get("/v1/usage", params={"start": future, "end": future + "T12:00:00Z"}).json()
    assert rep["data"] == [] and rep["totals"]["requests"] == 0
    rep = admin.get("/v1/usage", params={"start": "2000-01-01", "group_by": "status"}).json()
    assert rep["totals"]["requests"] == len(rows)


def test_each_role_sees_only_what_it_may(traffic):
    """Admins and auditors (any team) see every call; a builder its team's; a member only its own key's."""
    rows = ledger_rows(traffic.srv.extra["db_url"])
    keys = {r.key_id for r in rows}

    def seen(name: str) -> set:
        r = traffic.client(name).get("/v1/usage", params={"group_by": "key"})
        assert r.status_code == 200, r.text
        return {row["key"] for row in r.json()["data"]}

    red_team = next(r.team_id for r in rows if r.key_id == traffic.keys["red_a"]["id"])
    assert seen("auditor") == keys and seen("red_auditor") == keys
    assert seen("red_builder") == {r.key_id for r in rows if r.team_id == red_team}
    assert seen("red_a") == {traffic.keys["red_a"]["id"]}
    assert seen("loner") == {traffic.keys["loner"]["id"]}
    # A filter naming someone else's key narrows to nothing, never widens.
    r = traffic.client("red_a").get("/v1/usage", params={"key": traffic.keys["blue"]["id"]}).json()
    assert r["data"] == [] and r["totals"]["requests"] == 0


def test_csv_matches_json_and_is_safe_for_spreadsheets(traffic):
    admin = traffic.srv.admin()
    params = {"group_by": "use_case,model"}
    rep = admin.get("/v1/usage", params=params).json()
    r = admin.get("/v1/usage", params={**params, "format": "csv"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(r.text)))
    assert len(table) == len(rep["data"])
    assert table[0].keys() >= {"use_case", "model", "requests", "cost", "latency_p95_ms"}
    cells = {row["use_case"] for row in table}
    assert "'=HYPERLINK(\"x\")" in cells and not any(c.startswith("=") for c in cells)
    by_case = {row["use_case"] or None: row for row in rep["data"] if row["model"] == "fake"}
    for row in table:
        if row["model"] == "fake" and not row["use_case"].startswith("'"):
            assert int(row["requests"]) == by_case[row["use_case"] or None]["requests"]


def test_keel_usage_command_prints_the_same_report(traffic):
    env = {**traffic.srv.env, "KEEL_URL": traffic.srv.url, "KEEL_API_KEY": traffic.srv.admin_key}
    out = subprocess.run([sys.executable, "-m", "keel", "usage", "--group-by", "team,model", "--csv"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    api = traffic.srv.admin().get("/v1/usage", params={"group_by": "team,model", "format": "csv"}).text
    assert out.stdout == api
    bad = subprocess.run([sys.executable, "-m", "keel", "usage", "--group-by", "colour"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert bad.returncode == 1 and "unknown group_by 'colour'" in bad.stderr and "use one of" in bad.stderr


@pytest.mark.parametrize("params, names", [
    ({"group_by": "colour"}, ["colour"]),
    ({"start": "yesterday"}, ["start"]),
    ({"start": "2026-12-02", "end": "2026-12-01"}, ["not before"]),
    ({"format": "xml"}, ["format"]),
    ({"day": "2026-12-01"}, ["day"]),
    ({"team": "x" * 400}, ["300"]),
    ({"task": "a\x00b"}, ["NUL"]),
])
def test_caller_mistakes_are_400s_with_a_fix(traffic, params, names):
    problem(traffic.srv.admin().get("/v1/usage", params=params), 400, *names)


def test_no_key_is_401(traffic):
    assert httpx.get(traffic.srv.url + "/v1/usage").status_code == 401
