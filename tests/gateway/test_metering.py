"""Metering: every gateway request — success, error, stream cut short — writes exactly one ledger
row, and rows queued in memory are flushed on graceful shutdown (SIGTERM mid-load)."""

import concurrent.futures as cf
import signal
import time

import httpx
import pytest

from conftest import fake_upstream, ledger_rows

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
    time.sleep(0.5)
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
        deadline = time.monotonic() + 60
        while len(done) < 20 and time.monotonic() < deadline:  # mid-load: some answered, many in flight
            time.sleep(0.05)
        srv.proc.send_signal(signal.SIGTERM)
        answered = [f.result() for f in futures]
    srv.proc.wait(60)
    got = [s for s in answered if s is not None]
    assert len(got) > 10, "load did not start before SIGTERM"
    rows = ledger_rows(srv.extra["db_url"])
    assert len(rows) == len(got)
    assert len({r.request_id for r in rows}) == len(rows)
