"""Budgets through the real server against the loopback fake upstream: concurrent requests never overspend
(one server, and two servers on one PostgreSQL), reservations are released after upstream errors and cut
streams, the soft-limit alert fires once and reaches a webhook, and the admin API explains bad input."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import sqlalchemy as sa

from conftest import MASTER_KEY, TEST_DB, eventually, eventually_async, free_port, fake_upstream, wait_ledger

pytestmark = pytest.mark.store

# The fake upstream bills "hello" as 8 prompt tokens and answers 13 tokens; Keel estimates the prompt at 9.
# With max_tokens 13 at $1/$2 per 1M tokens: worst case 9 + 2 * 13 = 35 µ$, real cost 8 + 2 * 13 = 34 µ$.
MAX_TOKENS = 13
WORST = 35e-6
REAL = 34e-6


@pytest.fixture
def upstream_factory():
    with contextlib.ExitStack() as stack:
        yield lambda *args: stack.enter_context(fake_upstream(*args))


def write_config(tmp_path, root: str):
    cfg = tmp_path / "keel.yaml"
    cfg.write_text(f"""
models:
  - alias: fake
    provider: openai_compatible
    model: gpt-fake
    base_url: {root}/v1
    input_price_per_1m: 1.0
    output_price_per_1m: 2.0
  - alias: fake-embed
    provider: openai_compatible
    model: embed-fake
    kind: embedding
    base_url: {root}/v1
    input_price_per_1m: 1000.0
ledger_flush_interval_s: 0.2
budget_idle_s: 0.5
""")
    return cfg


def new_key(srv, **kw) -> dict:
    r = srv.admin().post("/admin/keys", json={"role": "member", "name": "budgeted", **kw})
    assert r.status_code == 201, r.text
    return r.json()


def new_budget(srv, scope: str, scope_id: str, amount: float, period: str = "day", **kw) -> dict:
    r = srv.admin().post("/admin/budgets", json={"scope": scope, "scope_id": scope_id, "amount": amount,
                                                 "period": period, **kw})
    assert r.status_code == 201, r.text
    return r.json()


def chat(url: str, key: str, **kw) -> httpx.Response:
    body = {"model": "fake", "messages": [{"role": "user", "content": "hello"}], "max_tokens": MAX_TOKENS, **kw}
    return httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def settled(srv, budget_id: str, timeout: float = 10) -> dict:
    """The budget once the store holds nothing reserved for it: every settled call's spend is written and
    the free slices are handed back (replicas do so once a budget is idle for `budget_idle_s`)."""
    def state() -> dict | None:
        got = srv.admin().get(f"/admin/budgets/{budget_id}").json()
        return got if got["reserved"] == 0 else None
    return eventually(state, timeout=timeout, interval=0.1)


def delivered(srv, budget_id: str, timeout: float = 15) -> list[dict]:
    """The budget's events once there is one and each has its delivery written (after its POST returned)."""
    def events() -> list[dict] | None:
        got = srv.admin().get(f"/admin/budgets/{budget_id}").json()["events"]
        return got if got and all(e["delivery"] for e in got) else None
    return eventually(events, timeout=timeout, interval=0.1)


def inprocess_gateway(tmp_path, db_url: str, root: str, **settings):
    """(store, gateway) of an app built in this process, with one priced model on the fake upstream `root`."""
    from keel.app import create_app
    from keel.core.settings import DeploymentConfig, Settings

    model = DeploymentConfig(alias="fake", provider="openai_compatible", model="m", base_url=root + "/v1",
                             input_price_per_1m=1.0, output_price_per_1m=2.0)
    settings = Settings(data_dir=tmp_path / "data", database_url=db_url, embedded_models=False,
                        master_key=MASTER_KEY, models=[model], **settings)
    app = create_app(settings).app
    return app.state.store, app.state.gateway


async def burst(urls: list[str], key: str, n: int) -> list[httpx.Response]:
    """`n` requests at once, spread round-robin over `urls`."""
    body = {"model": "fake", "messages": [{"role": "user", "content": "hello"}], "max_tokens": MAX_TOKENS}
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
        return await asyncio.gather(*(client.post(urls[i % len(urls)] + "/v1/chat/completions", json=body)
                                      for i in range(n)))


def check_no_overspend(responses: list[httpx.Response], budget: dict, state: dict, db_url: str) -> None:
    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    assert len(ok) >= 20, [r.status_code for r in responses]
    for r in refused:
        body = r.json()
        assert r.status_code == 402 and body["code"] == "budget_exceeded", body
        assert body["budget"]["id"] == budget["id"] and body["budget"]["scope"] == "key"
        assert body["budget"]["period"] == "day" and body["budget"]["remaining"] < WORST
        assert body["required"] == pytest.approx(WORST)
        assert budget["id"] in body["detail"] and "left of" in body["detail"]
    assert state["reserved"] == 0
    assert state["spent"] <= budget["amount"]  # 0 overspend
    assert state["spent"] == pytest.approx(len(ok) * REAL)
    rows = wait_ledger(db_url, "status = 'ok'", n=len(ok))  # the ledger is written in the background
    assert len(rows) == len(ok)
    assert sum(r.cost for r in rows) <= budget["amount"] + 1e-12


def test_50_concurrent_requests_never_overspend(server_factory, upstream_factory, tmp_path):
    """50 requests at once against a budget that fits 20 worst-case calls: at least 20 succeed, none overspends."""
    srv = server_factory(config=write_config(tmp_path, upstream_factory("--latency-ms", "100")))
    key = new_key(srv)
    budget = new_budget(srv, "key", key["id"], amount=20 * WORST)
    responses = asyncio.run(burst([srv.url], key["key"], 50))
    state = settled(srv, budget["id"])
    check_no_overspend(responses, budget, state, srv.extra["db_url"])


@pytest.mark.skipif(TEST_DB != "postgres", reason="two servers on one database: run with KEEL_TEST_DATABASE=postgres")
def test_50_concurrent_requests_over_two_servers_never_overspend(server_factory, upstream_factory, tmp_path):
    """The same, with the requests spread over two `keel serve` processes on one PostgreSQL."""
    cfg = write_config(tmp_path, upstream_factory("--latency-ms", "100"))
    one = server_factory(config=cfg, data_dir=tmp_path / "one")
    key = new_key(one)
    budget = new_budget(one, "key", key["id"], amount=20 * WORST)
    two = server_factory(config=cfg, data_dir=tmp_path / "two")
    responses = asyncio.run(burst([one.url, two.url], key["key"], 50))
    state = settled(one, budget["id"])
    check_no_overspend(responses, budget, state, one.extra["db_url"])


def test_reservations_are_released_after_upstream_errors_and_cut_streams(server_factory, upstream_factory, tmp_path):
    """Regression guard: nothing stays reserved after a failed call or a stream the client hung up on, and
    what is still in memory at shutdown reaches the store."""
    root = upstream_factory("--latency-ms", "20", "--chunk-delay-ms", "50")
    srv = server_factory(config=write_config(tmp_path, root))
    key = new_key(srv)
    budget = new_budget(srv, "key", key["prefix"], amount=0.01)  # by the key's visible prefix

    httpx.post(root + "/_control", json={"fault": "500", "times": -1})
    r = chat(srv.url, key["key"])
    assert r.status_code == 502
    httpx.post(root + "/_reset")
    state = settled(srv, budget["id"])
    assert state["reserved"] == 0 and state["spent"] == 0

    with httpx.stream("POST", srv.url + "/v1/chat/completions", timeout=30,
                      headers={"Authorization": f"Bearer {key['key']}"},
                      json={"model": "fake", "stream": True, "max_tokens": MAX_TOKENS,
                            "messages": [{"role": "user", "content": "hello"}]}) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        next(lines)
        during = srv.admin().get(f"/admin/budgets/{budget['id']}").json()
        assert during["reserved"] >= WORST  # the stream's worst case is held while it runs
    state = settled(srv, budget["id"])
    assert state["reserved"] == 0
    assert 0 < state["spent"] < WORST  # the part that was streamed, estimated from its text

    # A call settled in memory just before SIGTERM is written at shutdown.
    before = state["spent"]
    assert chat(srv.url, key["key"]).status_code == 200
    assert srv.stop(signal.SIGTERM) == 0
    engine = sa.create_engine(srv.extra["db_url"])
    with engine.connect() as conn:
        spent, reserved = conn.execute(sa.text("SELECT spent_nano, reserved_nano FROM budget_usage")).one()
        holds = conn.execute(sa.text("SELECT count(*) FROM budget_holds")).scalar()
    engine.dispose()
    assert reserved == 0 and holds == 0
    assert spent / 1e9 == pytest.approx(before + REAL)


class _Hook(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802
        self.received.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:
        return None


@pytest.fixture
def webhook():
    _Hook.received = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/alerts", _Hook.received
    httpd.shutdown()
    thread.join(5)


def test_soft_limit_alert_fires_once_and_reaches_the_webhook(server_factory, upstream_factory, tmp_path, webhook):
    url, received = webhook
    srv = server_factory(config=write_config(tmp_path, upstream_factory("--latency-ms", "5")),
                         KEEL_ALERT_WEBHOOK_URL=url, KEEL_BUDGET_ALERT_PERCENT="50")
    admin = srv.admin()
    user = admin.post("/admin/users", json={"email": "ana@example.com", "role": "member"}).json()
    key = new_key(srv, user_id=user["id"])
    budget = new_budget(srv, "user", "ana@example.com", amount=200e-6, period="month")
    assert budget["scope_id"] == user["id"] and budget["alert_percent"] == 50
    codes = []
    for _ in range(8):
        codes.append(chat(srv.url, key["key"]).status_code)
        if codes[-1] != 200:
            break
    # 5 calls spend 170 µ$; the 6th may cost 35 µ$ more than the 30 µ$ left.
    assert codes == [200] * 5 + [402]
    # Once all 5 calls' spend is in the store, every flush that could alert has run (the alert is claimed in
    # the flush that writes the spend), and each alert's delivery is written after its POST came back.
    state = settled(srv, budget["id"])
    assert state["spent"] == pytest.approx(5 * REAL)
    events = delivered(srv, budget["id"])
    assert [(e["kind"], e["delivery"]) for e in events] == [("soft_limit", "http 200")]
    assert len(received) == 1, received
    alert = received[0]
    assert alert["type"] == "budget.soft_limit" and alert["budget_id"] == budget["id"]
    assert alert["scope"] == "user" and alert["scope_id"] == user["id"] and alert["period"] == "month"
    assert alert["alert_percent"] == 50 and alert["limit"] == pytest.approx(200e-6)
    assert 100e-6 <= alert["spent"] <= 200e-6
    assert state["alerted"] is True

    # Raising the limit re-arms the alert for this period; the key can spend again.
    r = admin.patch(f"/admin/budgets/{budget['id']}", json={"amount": 0.01})
    assert r.status_code == 200 and r.json()["alerted"] is False and r.json()["amount"] == 0.01
    assert chat(srv.url, key["key"]).status_code == 200


def test_shutdown_flushes_budgets_before_the_store_closes(server_factory, upstream_factory, tmp_path, webhook):
    """Regression guard: SIGTERM drains the budget stage as part of the app's lifecycle, before the store
    closes: settled spend, the free slice it holds and the soft-limit alert that spend crosses (posted, and
    its delivery written) all reach the store, not a flush run by the event loop's teardown afterwards."""
    url, received = webhook
    srv = server_factory(config=write_config(tmp_path, upstream_factory()), KEEL_ALERT_WEBHOOK_URL=url,
                         KEEL_BUDGET_ALERT_PERCENT="10", KEEL_BUDGET_IDLE_S="3600")  # the slice stays in memory
    key = new_key(srv)
    budget = new_budget(srv, "key", key["id"], amount=100e-6)
    assert chat(srv.url, key["key"]).status_code == 200  # 34 of 100 µ$: past the 10% threshold
    assert srv.stop(signal.SIGTERM) == 0
    engine = sa.create_engine(srv.extra["db_url"])
    with engine.connect() as conn:
        spent, reserved = conn.execute(sa.text("SELECT spent_nano, reserved_nano FROM budget_usage")).one()
        holds = conn.execute(sa.text("SELECT count(*) FROM budget_holds")).scalar()
        events = conn.execute(sa.text("SELECT kind, delivery FROM budget_events WHERE budget_id = :b"),
                              {"b": budget["id"]}).all()
    engine.dispose()
    assert reserved == 0 and holds == 0 and spent / 1e9 == pytest.approx(REAL)
    assert [(e.kind, e.delivery) for e in events] == [("soft_limit", "http 200")]
    assert len(received) == 1 and received[0]["budget_id"] == budget["id"]


def test_budget_admin_api(server_factory, upstream_factory, tmp_path):
    srv = server_factory(config=write_config(tmp_path, upstream_factory()))
    admin = srv.admin()
    key = new_key(srv)
    r = admin.post("/admin/budgets", json={"scope_id": key["id"], "amount": 5})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "scope"
    r = admin.post("/admin/budgets", json={"scope": "key", "scope_id": key["id"], "amount": -5})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "amount"
    assert "greater than 0" in r.json()["detail"]
    r = admin.post("/admin/budgets", json={"scope": "key", "scope_id": key["id"], "amount": 5, "period": "week"})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "period" and "'day'" in r.json()["detail"]
    r = admin.post("/admin/budgets", json={"scope": "project", "scope_id": "x", "amount": 5})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "scope"
    r = admin.post("/admin/budgets", json={"scope": "key", "scope_id": "key_missing", "amount": 5})
    assert r.status_code == 404 and "key_missing" in r.json()["detail"] and "GET /admin/keys" in r.json()["fix"]
    r = admin.post("/admin/budgets", json={"scope": "team", "scope_id": "nobody", "amount": 5})
    assert r.status_code == 404 and "nobody" in r.json()["detail"]
    r = admin.post("/admin/budgets", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code in (400, 422) and r.json()["code"] == "malformed_json"

    budget = new_budget(srv, "key", key["id"], amount=5, period="total")
    assert budget["remaining"] == 5 and budget["resets_at"] is None and budget["period_key"] == "total"
    r = admin.post("/admin/budgets", json={"scope": "key", "scope_id": key["id"], "amount": 9, "period": "total"})
    assert r.status_code == 409 and budget["id"] in r.json()["detail"] and "PATCH" in r.json()["fix"]
    second = new_budget(srv, "key", key["id"], amount=1, period="day")  # a key may have one budget per period

    r = admin.patch(f"/admin/budgets/{budget['id']}", json={})
    assert r.status_code == 422 and "set `amount`, `alert_percent` or both" in r.json()["detail"]
    r = admin.patch(f"/admin/budgets/{budget['id']}", json={"alert_percent": 150})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "alert_percent"
    r = admin.patch("/admin/budgets/budget_missing", json={"amount": 2})
    assert r.status_code == 404 and "GET /admin/budgets" in r.json()["fix"]
    assert admin.patch(f"/admin/budgets/{budget['id']}", json={"amount": 7.5}).json()["amount"] == 7.5

    listed = admin.get("/admin/budgets", params={"scope": "key", "scope_id": key["id"]}).json()["data"]
    assert {b["id"] for b in listed} == {budget["id"], second["id"]}
    assert srv.client(key["key"]).get("/admin/budgets").status_code == 403
    assert admin.delete(f"/admin/budgets/{second['id']}").status_code == 204
    assert admin.get(f"/admin/budgets/{second['id']}").status_code == 404
    assert admin.delete(f"/admin/budgets/{second['id']}").status_code == 404
    assert chat(srv.url, key["key"]).status_code == 200

    # Embeddings are budgeted too: their prompt tokens at the input price.
    r = srv.client(key["key"]).post("/v1/embeddings", json={"model": "fake-embed", "input": ["hello world"] * 4})
    assert r.status_code == 200
    tokens = r.json()["usage"]["prompt_tokens"]
    state = settled(srv, budget["id"])
    assert state["spent"] == pytest.approx(REAL + tokens * 1000 / 1e6)


def test_a_dead_replicas_hold_is_counted_as_spent(tmp_path, db_url):
    """A replica that dies mid-call leaves its reservation behind; once its hold expires another replica
    counts it as spent (never as free: that could overspend), and a late write of the dead one is ignored."""
    from keel.app import create_app
    from keel.core.outbound import Outbound
    from keel.core.settings import Settings
    from keel.gateway.budgets import Budgets, budget_holds
    from keel.identity import service as identity

    settings = Settings(data_dir=tmp_path / "data", database_url=db_url, embedded_models=False, master_key=MASTER_KEY)
    app = create_app(settings).app
    store = app.state.store
    stage = next(s for s in app.state.gateway.stages if isinstance(s, Budgets))
    _, key = identity.create_key(store, role="member")
    budget = stage.create("key", key["id"], "day", 0.001)
    pool = stage._pool(stage._defs[budget["id"]])
    assert asyncio.run(stage._take(pool, 35_000))  # a call's worst case, 35 µ$, as a request takes it
    assert stage.get(budget["id"])["reserved"] == pytest.approx(35e-6)

    with store.engine.begin() as conn:  # the replica stops renewing its hold: it is dead
        conn.execute(budget_holds.update().values(expires_at=0))
    other = Budgets(store, settings, app.state.gateway.deployments, Outbound())
    assert other.sweep() == 1
    state = stage.get(budget["id"])
    assert state["reserved"] == 0 and state["spent"] == pytest.approx(35e-6)
    assert [e["kind"] for e in state["events"]] == ["hold_expired"]

    pool.inflight -= 35_000  # the dead replica's call ends after all, cheaper, and it tries to write
    pool.unflushed += 10_000
    pool.avail += 25_000
    _alerts, dead = stage._flush(stage._snapshot())
    assert dead == [pool]
    assert stage.get(budget["id"])["spent"] == pytest.approx(35e-6)
    store.dispose()


def test_no_store_round_trip_for_a_key_without_limits_or_budgets(tmp_path, db_url, upstream_factory):
    """Performance guard: with limits and budgets defined for others, a key without any never touches
    their tables on the request path."""
    from keel.gateway.pipeline import Call
    from keel.gateway.protocol import ChatRequest
    from keel.identity import service as identity
    from keel.identity.principal import Principal

    store, gateway = inprocess_gateway(tmp_path, db_url, upstream_factory())
    _, limited = identity.create_key(store, role="member")
    stages = {type(s).__name__: s for s in gateway.stages}
    stages["RateLimiter"].put("key", limited["id"], 10, 1000)
    stages["Budgets"].create("key", limited["id"], "day", 1.0)

    statements: list[str] = []
    sa.event.listen(store.engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    free = Principal(key_id="key_free", role="member")

    async def run() -> None:
        await gateway.start()
        for i in range(30):
            call = Call(request_id=f"r{i}", principal=free, kind="chat", alias="fake",
                        chat=ChatRequest(model="fake", messages=[{"role": "user", "content": "hi"}], max_tokens=5))
            await gateway.chat(call)
        await gateway.stop()

    asyncio.run(run())
    touched = [s for s in statements if any(t in s for t in ("rate_counters", "budget_usage", "budget_holds"))]
    assert touched == []
    definition_reads = [s for s in statements if "FROM rate_limits" in s or "FROM budgets" in s]
    assert len(definition_reads) <= 4  # re-read every 2 s, never per request
    store.dispose()


def test_the_alert_webhook_uses_the_outbound_ca_bundle_and_client_certificate(server_factory, upstream_factory,
                                                                                 tmp_path):
    """Regression guard: the budget alert went out through a session of its own, so a receiver behind the
    configured CA bundle (and asking for the configured client certificate) was never reached."""
    from tests.fakes.tls import make_pki

    pki = make_pki(tmp_path)
    _Hook.received = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    httpd.socket = pki.server_context(require_client_cert=True).wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        srv = server_factory(config=write_config(tmp_path, upstream_factory()),
                             KEEL_ALERT_WEBHOOK_URL=f"https://127.0.0.1:{httpd.server_address[1]}/alerts",
                             KEEL_BUDGET_ALERT_PERCENT="50", KEEL_OUTBOUND_CA_BUNDLE=str(pki.ca),
                             KEEL_OUTBOUND_CLIENT_CERT=str(pki.client_cert),
                             KEEL_OUTBOUND_CLIENT_KEY=str(pki.client_key))
        key = new_key(srv)
        budget = new_budget(srv, "key", key["id"], amount=40e-6)
        assert chat(srv.url, key["key"]).status_code == 200  # 34 of 40 µ$: past the 50% threshold
        events = delivered(srv, budget["id"])
        assert [(e["kind"], e["delivery"]) for e in events] == [("soft_limit", "http 200")]
        assert len(_Hook.received) == 1 and _Hook.received[0]["budget_id"] == budget["id"]
    finally:
        httpd.shutdown()
        thread.join(5)


def test_an_unreachable_webhook_is_recorded_not_fatal(server_factory, upstream_factory, tmp_path):
    dead_port = free_port()  # nothing listens here
    srv = server_factory(config=write_config(tmp_path, upstream_factory()),
                         KEEL_ALERT_WEBHOOK_URL=f"http://127.0.0.1:{dead_port}/alerts", KEEL_BUDGET_ALERT_PERCENT="50")
    key = new_key(srv)
    budget = new_budget(srv, "key", key["id"], amount=40e-6)
    assert chat(srv.url, key["key"]).status_code == 200  # 34 of 40 µ$: past the 50% threshold
    events = delivered(srv, budget["id"])
    assert [e["kind"] for e in events] == ["soft_limit"]
    assert events[0]["delivery"].startswith("failed: ")
    assert chat(srv.url, key["key"]).status_code == 402
    assert srv.proc.poll() is None


def test_traffic_keeps_its_slice_between_flushes_and_short_pauses(tmp_path, db_url, upstream_factory):
    """Performance guard: a budget in use claims from the store once, not after every flush or pause
    shorter than `budget_idle_s` (each claim is a store round trip on some request's path); its settled
    spend still reaches the store every flush, and the free slice goes back once it is idle that long."""
    from keel.gateway import budgets as budgets_module
    from keel.gateway.pipeline import Call
    from keel.gateway.protocol import ChatRequest
    from keel.identity import service as identity
    from keel.identity.principal import Principal

    store, gateway = inprocess_gateway(tmp_path, db_url, upstream_factory(), budget_idle_s=2.0)
    _, key = identity.create_key(store, role="member")
    stage = next(s for s in gateway.stages if isinstance(s, budgets_module.Budgets))
    budget = stage.create("key", key["id"], "day", 1.0)
    who = Principal(key_id=key["id"], role="member")

    statements: list[str] = []
    sa.event.listen(store.engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    seen: list[dict] = []

    async def run() -> None:
        await gateway.start()  # what the app's startup does: budgets flush from here on
        end = time.monotonic() + 4 * budgets_module.FLUSH_S
        i = 0
        while time.monotonic() < end:
            call = Call(request_id=f"r{i}", principal=who, kind="chat", alias="fake",
                        chat=ChatRequest(model="fake", messages=[{"role": "user", "content": "hi"}], max_tokens=5))
            await gateway.chat(call)
            i += 1
            # The subject, not a wait: requests paced 20 ms apart, and after the 5th a pause over two flushes
            # but shorter than idle (real time: the budget ticker runs on the loop's clock).
            await asyncio.sleep(1.2 if i == 5 else 0.02)
        seen.append(await asyncio.to_thread(stage.get, budget["id"]))  # spend written while traffic flows

        async def handed_back() -> dict | None:  # idle: the slice goes back
            state = await asyncio.to_thread(stage.get, budget["id"])
            return state if state["reserved"] == 0 else None
        seen.append(await eventually_async(handed_back, timeout=15, interval=0.1))
        await gateway.stop()

    asyncio.run(run())
    claims = [s for s in statements if "SET granted_nano" in s]
    assert len(claims) == 1, f"{len(claims)} claims"
    busy, idle = seen
    assert busy["spent"] > 0
    assert idle["reserved"] == 0 and idle["spent"] > busy["spent"] - 1e-12
    store.dispose()
