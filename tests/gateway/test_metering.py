"""Metering: every gateway request — success, error, stream cut short — writes exactly one ledger
row, and rows queued in memory are flushed on graceful shutdown (SIGTERM mid-load)."""

import concurrent.futures as cf
import signal

import httpx
import pytest

from conftest import eventually, fake_upstream, ledger_rows

pytestmark = pytest.mark.store


@pytest.fixture
def upstream():
    with fake_upstream("--latency-ms", "40") as root:
        yield root + "/v1"


def _config(tmp_path, base_url):
    cfg = tmp_path / "keel.yaml"
    cfg.write_text(f"""
models:
  - alias: fake
    provider: openai_compatible
    model: gpt-fake
    base_url: {base_url}
    input_price_per_1m: 1.0
    output_price_per_1m: 2.0
  - alias: stalls
    provider: openai_compatible
    model: "fault:hang-mid"
    base_url: {base_url}
ledger_flush_interval_s: 5
""")
    return cfg


def _chat(url, key, **kw):
    body = {"model": "fake", "messages": [{"role": "user", "content": "hello"}], **kw}
    return httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"},
                      timeout=30)


def test_n_requests_n_rows_including_errors_and_cut_streams(server_factory, upstream, tmp_path):
    srv = server_factory(config=_config(tmp_path, upstream))
    ok = [_chat(srv.url, srv.admin_key, metadata={"task_id": f"t{i}"}) for i in range(5)]
    assert all(r.status_code == 200 for r in ok)
    assert ok[0].json()["usage"]["total_tokens"] > 0
    bad = _chat(srv.url, srv.admin_key, model="no-such-model")
    assert bad.status_code == 404
    with httpx.stream("POST", srv.url + "/v1/chat/completions", timeout=30,
                      headers={"Authorization": f"Bearer {srv.admin_key}"},
                      json={"model": "stalls", "stream": True, "messages": [{"role": "user", "content": "hi"}]}) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # read one event, then hang up
        cut = r.headers["x-request-id"]
    eventually(lambda: srv.answered(cut))  # the server has seen the hang-up and recorded the cut stream
    assert srv.stop(signal.SIGTERM) == 0
    rows = ledger_rows(srv.extra["db_url"])
    assert len(rows) == 7, [(r.status, r.error_code) for r in rows]
    assert len({r.request_id for r in rows}) == 7
    by_status = {}
    for r in rows:
        by_status.setdefault(r.status, []).append(r)
    assert len(by_status["ok"]) == 5 and len(by_status["error"]) == 1
    assert by_status["error"][0].error_code == "not_found" and by_status["error"][0].http_status == 404
    cancelled = by_status["cancelled"]
    assert len(cancelled) == 1 and cancelled[0].stream and cancelled[0].error_code == "client_disconnected"
    first = by_status["ok"][0]
    assert first.cost == pytest.approx((first.tokens_in * 1.0 + first.tokens_out * 2.0) / 1e6)
    assert {r.task_id for r in by_status["ok"]} == {f"t{i}" for i in range(5)}


def test_sigterm_mid_load_loses_no_row(server_factory, upstream, tmp_path):
    """Regression guard: rows still queued when SIGTERM arrives are flushed before exit."""
    srv = server_factory(config=_config(tmp_path, upstream))
    done: list[int] = []

    def one(i):
        try:
            r = _chat(srv.url, srv.admin_key, metadata={"task_id": f"load-{i}"})
            done.append(r.status_code)
            return r.status_code
        except httpx.HTTPError:
            return None

    with cf.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(one, i) for i in range(400)]
        eventually(lambda: len(done) >= 20, timeout=60)  # mid-load: some answered, many in flight
        srv.proc.send_signal(signal.SIGTERM)
        answered = [f.result() for f in futures]
    srv.proc.wait(60)
    got = [s for s in answered if s is not None]
    assert len(got) > 10, "load did not start before SIGTERM"
    rows = ledger_rows(srv.extra["db_url"])
    assert len(rows) == len(got)
    assert len({r.request_id for r in rows}) == len(rows)


def test_requests_reusing_a_client_request_id_each_leave_their_own_row(server_factory, upstream, tmp_path):
    """Regression (security issue, hole 7): the client's `X-Request-Id` was the ledger's key, so requests
    that reused one left one row between them and costs undercounted. Keel's own id keys every row; the
    client's id is kept beside it for correlation and echoed back as `x-client-request-id`."""
    srv = server_factory(config=_config(tmp_path, upstream))
    body = {"model": "fake", "messages": [{"role": "user", "content": "hello"}]}
    answers = []
    with httpx.Client(base_url=srv.url, timeout=30, headers={"Authorization": f"Bearer {srv.admin_key}"}) as c:
        for path in ("/v1/chat/completions", "/v1/chat/completions?via=asgi"):  # both of the server's paths
            for header in ("X-Request-Id", "X-Client-Request-Id"):
                answers += [c.post(path, json=body, headers={header: "reused-1"}) for _ in range(2)]
        with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True},
                      headers={"X-Request-Id": "reused-1"}) as r:
            r.read()
            answers.append(r)
    assert [r.status_code for r in answers] == [200] * 9
    assert all(r.headers["x-client-request-id"] == "reused-1" for r in answers)
    keel_ids = {r.headers["x-request-id"] for r in answers}
    assert len(keel_ids) == 9 and all(i.startswith("req_") for i in keel_ids)
    assert srv.stop(signal.SIGTERM) == 0
    rows = ledger_rows(srv.extra["db_url"])
    assert len(rows) == 9 and {r.request_id for r in rows} == keel_ids
    assert {r.client_request_id for r in rows} == {"reused-1"}
    assert sum(r.cost for r in rows) == pytest.approx(9 * rows[0].cost) and rows[0].cost > 0


@pytest.mark.parametrize("header, value", [
    ("X-Request-Id", "x" * 129),  # too long
    ("X-Client-Request-Id", "has space"),  # not visible ASCII
    ("X-Request-Id", b"caf\xe9"),  # not ASCII
])
def test_a_client_request_id_that_is_not_visible_ascii_is_ignored(server, header, value):
    """A bad client id is ignored, not refused: it only serves the client's correlation, so it must not cost
    the request; it is not echoed (it could carry bytes that do not belong in a header)."""
    with server.admin() as c:
        r = c.get("/v1/me", headers={header: value})
    assert r.status_code == 200 and "x-client-request-id" not in r.headers
    assert r.headers["x-request-id"].startswith("req_")


def test_a_workflow_steps_own_request_id_still_meters_a_rerun_once(db_url):
    """Internal callers keep their deterministic ids (a workflow step's `{run_id}/{step_id}`): a step re-run
    after a crash writes its row again under the same id, and the ledger still counts it once, in a batch
    of its own or among other rows. Only the HTTP edge's client-supplied id changed meaning."""
    import datetime

    from keel.core.db import Store
    from keel.observe.ledger import Ledger

    store = Store.open(db_url)
    store.upgrade()
    try:
        ledger = Ledger(store)

        def row(request_id: str) -> dict:
            return {"request_id": request_id, "ts": datetime.datetime.now(datetime.UTC), "kind": "chat",
                    "alias": "fake", "tokens_in": 3, "tokens_out": 4, "cost": 0.5, "latency_ms": 1.0,
                    "status": "ok", "http_status": 200, "stream": False, "cache_hit": False, "saved_cost": 0.0,
                    "task_id": request_id.split("/")[0]}

        ledger.record(row("run_1/draft"))
        ledger.flush_sync()
        ledger.record(row("run_1/draft"))  # the re-run after a crash, alone
        ledger.flush_sync()
        for rid in ("run_2/draft", "run_1/draft", "run_2/send"):  # and in a batch among new rows
            ledger.record(row(rid))
        ledger.flush_sync()
    finally:
        store.dispose()
    rows = ledger_rows(db_url)
    assert sorted(r.request_id for r in rows) == ["run_1/draft", "run_2/draft", "run_2/send"]
    assert all(r.client_request_id is None for r in rows)
