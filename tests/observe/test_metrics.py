"""`GET /metrics`: parsed by prometheus-client's own text parser, its request, token, cost, error, refusal and
latency figures equal sums over the usage ledger's rows; state gauges (circuits, queue depths) present;
served to admin and auditor keys, or without a key on the `metrics_bind` listener only."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import eventually, free_port, problem, wait_ledger
from tests.fakes.openai_upstream import FakeOpenAI

pytestmark = pytest.mark.store


@pytest.fixture
def upstream():
    fake = FakeOpenAI(reply="one two three four").start()
    yield fake
    fake.stop()


def config(tmp_path, upstream: str) -> Any:
    path = tmp_path / "keel.yaml"
    path.write_text(f"""
models:
  - {{alias: cloud, provider: openai_compatible, model: gpt-cloud, id: cloud/remote, base_url: {upstream},
      input_price_per_1m: 3.0, output_price_per_1m: 7.0}}
  - {{alias: broken, provider: openai_compatible, model: "fault:500", id: broken/remote, base_url: {upstream}}}
  - {{alias: cached, provider: openai_compatible, model: gpt-cloud, id: cached/remote, base_url: {upstream},
      input_price_per_1m: 3.0, output_price_per_1m: 7.0}}
aliases:
  broken: {{retries: 0, circuit_failures: 2}}
  cached: {{cache: {{mode: exact}}}}
ledger_flush_interval_s: 0.05
""")
    return path


def samples(text: str) -> list[Any]:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def total(ss: list[Any], name: str, **labels: str) -> float:
    return sum(s.value for s in ss if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def chat(srv, key: str, model: str = "cloud", **body: Any) -> httpx.Response:
    return httpx.post(srv.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=30,
                      json={"model": model, "messages": [{"role": "user", "content": "hi there"}], **body})


def test_metrics_match_the_ledger(server_factory, tmp_path, upstream, db_url):
    """Guards /metrics against drifting from the ledger: every counter is a sum over the same rows."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("name: p\nguards:\n  input: {pii: redact}\n")
    srv = server_factory(config=config(tmp_path, upstream.url), KEEL_POLICY_FILE=str(policy))
    admin = srv.admin()
    assert admin.post("/admin/teams", json={"name": "red"}).status_code == 201
    red = admin.post("/admin/keys", json={"role": "member", "team": "red", "name": "m"}).json()
    solo = admin.post("/admin/keys", json={"role": "member", "name": "solo"}).json()
    assert admin.put(f"/admin/limits/keys/{solo['id']}", json={"rpm": 2}).status_code == 200

    for _ in range(3):
        assert chat(srv, red["key"]).status_code == 200
    assert chat(srv, red["key"], stream=True, stream_options={"include_usage": True}).status_code == 200
    assert chat(srv, red["key"], model="broken").status_code == 502
    assert chat(srv, red["key"], model="nope").status_code == 404
    codes = [chat(srv, solo["key"]).status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    for _ in range(3):
        assert chat(srv, red["key"], model="cached", temperature=0).status_code == 200
    pii = httpx.post(srv.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {red['key']}"},
                     json={"model": "cloud", "messages": [{"role": "user", "content": "mail ann@example.com"}]})
    assert pii.status_code == 200
    rows = wait_ledger(db_url, n=13)
    assert len(rows) == 13
    assert total(samples(admin.get("/metrics").text), "keel_requests_total") == len(rows)

    ss = samples(admin.get("/metrics").text)
    assert total(ss, "keel_requests_total") == len(rows)
    assert total(ss, "keel_requests_total", status="ok") == sum(r.status == "ok" for r in rows)
    tokens: dict[tuple[str, str, str], list[float]] = defaultdict(lambda: [0, 0, 0.0])
    for r in rows:
        t = tokens[(r.team_id or "", r.alias or "", r.deployment or "")]
        t[0] += r.tokens_in
        t[1] += r.tokens_out
        t[2] += r.cost
    assert sum(t[2] for t in tokens.values()) > 0
    for (team, alias, deployment), (tin, tout, cost) in tokens.items():
        where = {"team": team, "alias": alias, "deployment": deployment}
        assert total(ss, "keel_tokens_total", direction="input", **where) == tin
        assert total(ss, "keel_tokens_total", direction="output", **where) == tout
        assert total(ss, "keel_cost_dollars_total", **where) == pytest.approx(cost)
    for code in {r.error_code for r in rows if r.error_code}:
        assert total(ss, "keel_request_errors_total", code=code) == sum(r.error_code == code for r in rows)
    assert total(ss, "keel_request_errors_total", code="upstream_error", http_status="502") == 1
    assert total(ss, "keel_refusals_total", reason="rate_limit") == 1
    assert total(ss, "keel_request_duration_seconds_count") == len(rows)
    assert total(ss, "keel_request_duration_seconds_sum") == pytest.approx(sum(r.latency_ms for r in rows) / 1000)
    assert total(ss, "keel_time_to_first_token_seconds_count") == sum(r.ttft_ms is not None for r in rows) == 1
    hits = [r for r in rows if r.cache_hit]
    assert total(ss, "keel_cache_hits_total", alias="cached") == len(hits) == 2
    assert total(ss, "keel_cache_saved_dollars_total") == pytest.approx(sum(r.saved_cost for r in hits))
    metas = [json.loads(r.meta) if isinstance(r.meta, str) else (r.meta or {}) for r in rows]
    findings = sum((m or {}).get("keel_guards", {}).get("pii.email", 0) for m in metas)
    assert total(ss, "keel_guard_findings_total", guard="pii", type="email") == findings == 1

    # State read when scraped: the failing deployment's breaker, and every queue (empty here).
    assert total(ss, "keel_circuit_consecutive_failures", deployment="broken/remote") == 1
    assert total(ss, "keel_circuit_state", deployment="cloud/remote", state="closed") == 1
    for queue in ("ingest_jobs", "workflow_runs", "approvals", "reviews"):
        assert any(s.name == "keel_queue_depth" and s.labels["queue"] == queue for s in ss)
    assert total(ss, "keel_queue_depth") == 0


def test_metrics_need_a_key_whose_role_reads_them(server):
    """/metrics is not public on the API port: no key 401, a member 403, an auditor 200."""
    assert problem(httpx.get(server.url + "/metrics"), 401, "no API key")["code"] == "unauthorized"
    with server.admin() as admin:
        member = admin.post("/admin/keys", json={"role": "member", "name": "m"}).json()["key"]
        auditor = admin.post("/admin/keys", json={"role": "auditor", "name": "a"}).json()["key"]
    assert problem(httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {member}"}), 403,
                   "metrics.read")["code"] == "forbidden"
    r = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {auditor}"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert any(f.name == "keel_requests" for f in text_string_to_metric_families(r.text))


def test_metrics_bind_serves_metrics_without_a_key_on_its_own_listener(server_factory, tmp_path, upstream):
    """KEEL_METRICS_BIND opens a second listener for a scraper without a key; it serves metrics only."""
    port = free_port()
    srv = server_factory(config=config(tmp_path, upstream.url), KEEL_METRICS_BIND=f"127.0.0.1:{port}")
    with srv.admin() as admin:
        assert chat(srv, srv.admin_key).status_code == 200

    def scraped() -> list[Any] | None:
        ss = samples(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text)
        return ss if total(ss, "keel_requests_total") == 1 else None
    ss = eventually(scraped, timeout=10)
    assert total(ss, "keel_tokens_total", alias="cloud") > 0
    assert httpx.get(srv.url + "/metrics").status_code == 401  # the API port still wants a key


def test_a_bad_metrics_bind_stops_the_server_before_it_listens(tmp_path, db_url):
    """A malformed `metrics_bind` is a settings error naming the field, not a server without metrics."""
    from conftest import start_server

    with pytest.raises(RuntimeError) as err:
        start_server(tmp_path / "data", db_url, KEEL_METRICS_BIND="not-a-port", timeout=60)
    assert "metrics_bind" in str(err.value)
