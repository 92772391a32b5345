"""Routing under fire: the real server in front of loopback upstreams that fail on command (500s, 429 with
retry-after, hangs past the timeout, resets before and after the first byte, 4xx). Guards: with a healthy
fallback every request succeeds; circuits open, half-open and close; nothing is retried that should not
be; every client request is billed exactly once, to the deployment named in `x-keel-deployment`."""

import concurrent.futures as cf
import socket
import struct
import threading
import time

import httpx
import orjson
import pytest

from conftest import eventually, ledger_rows, wait_ledger
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.openai_upstream import FakeOpenAI

pytestmark = pytest.mark.store

HEALTHY = "healthy/good"


class ResetServer:
    """An upstream that reads the request and resets the connection without sending a byte."""

    def __init__(self) -> None:
        self.requests = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.1)
        self.url = "http://127.0.0.1:%d/v1" % self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.requests += 1
            conn.settimeout(1)
            try:
                conn.recv(65536)
            except OSError:
                pass
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture(scope="module")
def up():
    """Named fake upstreams, one per role, running in threads."""
    names = ["bad", "good", "circ", "lim", "slow", "mid", "rej", "boom", "first"]
    fakes = {n: FakeOpenAI(latency_ms=5 if n == "good" else 0, hang_s=5).start() for n in names}
    fakes["claude"] = FakeAnthropic().start()
    fakes["rst"] = ResetServer()
    yield fakes
    for fake in fakes.values():
        fake.stop()


@pytest.fixture(scope="module")
def srv(module_server_factory, up, tmp_path_factory):
    def dep(alias, fake, model="gpt-fake", name="one", **extra):
        fields = {"alias": alias, "provider": "openai_compatible", "model": model, "id": f"{alias}/{name}",
                  "base_url": up[fake].url, **extra}
        return "  - " + orjson.dumps(fields).decode()

    models = "\n".join([
        dep("flaky", "bad", "fault:500", "bad", input_price_per_1m=100, output_price_per_1m=200),
        dep("healthy", "good", "gpt-good", "good", input_price_per_1m=1, output_price_per_1m=2),
        dep("circ", "circ"),
        dep("limited", "lim"),
        dep("slow", "slow", "fault:hang", timeout_s=0.5),
        dep("midreset", "mid", "fault:reset"),
        dep("rst", "rst", name="dead"),
        dep("boom", "boom", "fault:500"),
        dep("picky", "rej", "fault:400"),
        dep("ordered", "first", "fault:503"),
        '  - {"alias": "claude", "provider": "anthropic", "model": "claude-fake", "id": "claude/one", '
        f'"base_url": "{up["claude"].root}"}}',
    ])
    cfg = tmp_path_factory.mktemp("router") / "keel.yaml"
    cfg.write_text(f"""
ledger_flush_interval_s: 0.05
models:
{models}
aliases:
  flaky: {{fallbacks: [healthy], circuit_failures: 3, circuit_cooldown_s: 1, backoff_ms: 5}}
  circ: {{fallbacks: [healthy], retries: 2, circuit_failures: 3, circuit_cooldown_s: 1, backoff_ms: 5}}
  limited: {{retries: 2}}
  slow: {{fallbacks: [healthy], retries: 2}}
  midreset: {{fallbacks: [healthy]}}
  rst: {{fallbacks: [healthy], retries: 1, backoff_ms: 5}}
  boom: {{fallbacks: [healthy], retries: 1, backoff_ms: 5, circuit_failures: 100}}
  picky: {{fallbacks: [healthy], retries: 2}}
  ordered: {{fallbacks: [ghost, boom, claude, healthy], retries: 0}}
""")
    return module_server_factory(config=cfg)


@pytest.fixture(scope="module")
def http(srv):
    with srv.client(srv.admin_key, timeout=30, limits=httpx.Limits(max_connections=32)) as client:
        yield client


def chat(http, model, **kw):
    return http.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "hi"}],
                                                   **kw})


def stream(http, model):
    """(response, data payloads) of a streaming request, read to its end."""
    with http.stream("POST", "/v1/chat/completions", json={
            "model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}]}) as r:
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    return r, data


def text_of(data):
    return "".join((orjson.loads(d)["choices"] or [{}])[0].get("delta", {}).get("content") or ""
                   for d in data if d != "[DONE]" and "choices" in orjson.loads(d))


def billed(srv, rids):
    """The ledger rows of these requests, once every one has arrived and so has a later request's row (the
    ledger writes in order, so a double of any of them would be in by then)."""
    db = srv.extra["db_url"]
    where = "request_id IN (" + ", ".join(f"'{r}'" for r in rids) + ")"
    wait_ledger(db, where, n=len(rids))
    with srv.client(srv.admin_key) as c:  # an unknown model: billed as an error, reaches no upstream
        later = c.post("/v1/chat/completions", json={"model": "no-such-alias",
                                                         "messages": [{"role": "user", "content": "hi"}]})
    assert later.status_code == 404, later.text
    wait_ledger(db, f"request_id = '{later.headers['x-request-id']}'")
    return ledger_rows(db, where)


def test_always_500_deployment_with_healthy_fallback_500_of_500_succeed(srv, http, up):
    bad_before, good_before = up["bad"].requests, up["good"].requests

    def one(_):
        r = chat(http, "flaky")
        return r.status_code, r.headers.get("x-keel-deployment"), r.headers.get("x-request-id")

    with cf.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(one, range(500)))
    assert [s for s, _, _ in results] == [200] * 500
    assert {d for _, d, _ in results} == {HEALTHY}
    assert up["good"].requests - good_before == 500
    # The open circuit keeps traffic off the broken deployment: the first few fail, then one trial a second.
    assert up["bad"].requests - bad_before < 60, up["bad"].requests - bad_before
    rows = billed(srv, [rid for _, _, rid in results])
    assert len(rows) == 500 and len({r.request_id for r in rows}) == 500
    assert {(r.status, r.deployment) for r in rows} == {("ok", HEALTHY)}
    r = rows[0]
    assert r.cost == pytest.approx((r.tokens_in * 1 + r.tokens_out * 2) / 1e6), "billed at the server's prices"


def test_circuit_opens_half_opens_and_closes(srv, http, up):
    circ = up["circ"]
    circ.reset()
    circ.fail_next("500", times=-1)
    r = chat(http, "circ")
    assert r.status_code == 200 and r.headers["x-keel-deployment"] == HEALTHY
    assert circ.requests == 3, "1 try + 2 retries, and the third failure opens the circuit"
    for _ in range(5):
        assert chat(http, "circ").headers["x-keel-deployment"] == HEALTHY
    assert circ.requests == 3, "open: no request reaches the deployment"

    # open for the cooldown (1 s): every request goes to the fallback until one is let through as a trial
    eventually(lambda: chat(http, "circ").headers["x-keel-deployment"] == HEALTHY and circ.requests > 3)
    assert circ.requests == 4, "half-open: exactly one trial, which fails"
    assert chat(http, "circ").headers["x-keel-deployment"] == HEALTHY
    assert circ.requests == 4, "the failed trial re-opened the circuit"

    circ.sticky = None  # the deployment recovers

    def served_by_circ():
        r = chat(http, "circ")
        return r if r.headers["x-keel-deployment"] == "circ/one" else None
    r = eventually(served_by_circ)  # the next trial, once the cooldown is over, succeeds
    assert r.status_code == 200
    assert circ.requests == 5
    for _ in range(3):
        assert chat(http, "circ").headers["x-keel-deployment"] == "circ/one"
    assert circ.requests == 8, "closed again: every request goes to it"


def test_429_with_short_retry_after_is_waited_out_and_retried(srv, http, up):
    lim = up["lim"]
    lim.reset()
    lim.retry_after = "0.4"
    lim.fail_next("429")
    t0 = time.monotonic()
    r = chat(http, "limited")
    assert r.status_code == 200 and r.headers["x-keel-deployment"] == "limited/one"
    assert time.monotonic() - t0 >= 0.4
    assert lim.requests == 2
    assert len(billed(srv, [r.headers["x-request-id"]])) == 1


def test_429_with_long_retry_after_is_not_waited_and_passes_retry_after_on(srv, http, up):
    lim = up["lim"]
    lim.reset()
    lim.retry_after = "30"
    lim.fail_next("429")
    t0 = time.monotonic()
    r = chat(http, "limited")
    assert r.status_code == 429 and r.headers["retry-after"] == "30"
    assert time.monotonic() - t0 < 2
    assert lim.requests == 1
    assert r.json()["tried"] == ["limited/one"]


def test_hang_past_the_timeout_fails_over(srv, http, up):
    slow, good_before = up["slow"], up["good"].requests
    slow.reset()
    t0 = time.monotonic()
    r = chat(http, "slow")
    took = time.monotonic() - t0
    assert r.status_code == 200 and r.headers["x-keel-deployment"] == HEALTHY
    assert 0.5 <= took < 3, took
    assert slow.requests == 1, "a deployment that timed out is not tried again in the same request"

    t0 = time.monotonic()
    r, data = stream(http, "slow")
    assert r.status_code == 200 and r.headers["x-keel-deployment"] == HEALTHY
    assert text_of(data).startswith("Hello from the fake") and data[-1] == "[DONE]"
    assert 0.5 <= time.monotonic() - t0 < 3
    assert slow.requests == 2 and up["good"].requests - good_before == 2


def test_reset_before_the_first_byte_fails_over(srv, http, up):
    rst, boom = up["rst"], up["boom"]
    rst_before, boom_before = rst.requests, boom.requests
    r, data = stream(http, "rst")
    assert r.status_code == 200 and r.headers["x-keel-deployment"] == HEALTHY
    assert text_of(data).startswith("Hello from the fake") and data[-1] == "[DONE]"
    assert rst.requests - rst_before == 2, "connection errors are retried once (retries: 1), then the fallback"

    r2 = chat(http, "rst")
    assert r2.status_code == 200 and r2.headers["x-keel-deployment"] == HEALTHY

    r3, data = stream(http, "boom")  # a 500 before the first byte of a stream
    assert r3.status_code == 200 and r3.headers["x-keel-deployment"] == HEALTHY and data[-1] == "[DONE]"
    assert boom.requests - boom_before == 2
    rows = billed(srv, [x.headers["x-request-id"] for x in (r, r2, r3)])
    assert len(rows) == 3 and {(x.status, x.deployment) for x in rows} == {("ok", HEALTHY)}


def test_reset_after_the_first_byte_ends_the_stream_with_an_error_event(srv, http, up):
    good_before = up["good"].requests
    r, data = stream(http, "midreset")
    assert r.status_code == 200 and r.headers["x-keel-deployment"] == "midreset/one"
    assert "[DONE]" not in data
    last = orjson.loads(data[-1])
    assert last["code"] == "upstream_error" and "midreset/one" in last["detail"]
    assert text_of(data[:-1]) == "Hello "
    assert up["good"].requests == good_before, "no failover once the client has bytes"
    rows = billed(srv, [r.headers["x-request-id"]])
    assert len(rows) == 1 and rows[0].status == "error" and rows[0].deployment == "midreset/one"


def test_4xx_is_neither_retried_nor_failed_over(srv, http, up):
    rej, good_before = up["rej"], up["good"].requests
    rej.reset()
    r = chat(http, "picky")
    assert r.status_code == 400 and r.json()["code"] == "upstream_rejected"
    assert rej.requests == 1 and up["good"].requests == good_before
    assert len(billed(srv, [r.headers["x-request-id"]])) == 1


def test_fallbacks_are_tried_in_order_across_providers(srv, http, up):
    """ghost is no alias (skipped), boom fails, claude (an Anthropic upstream) serves; healthy is never reached."""
    good_before, claude_before = up["good"].requests, up["claude"].requests
    r = chat(http, "ordered")
    assert r.status_code == 200 and r.headers["x-keel-deployment"] == "claude/one"
    assert r.json()["choices"][0]["message"]["content"]
    assert up["first"].requests >= 1 and up["claude"].requests == claude_before + 1
    assert up["good"].requests == good_before
