"""Keel's HTTP/1.1 protocol (`keel/core/hotserve.py`): the hot endpoints served without the ASGI cycle,
on the real server (uvicorn with Keel's config, in a thread) against a loopback fake upstream, spoken to
over raw sockets so keep-alive, pipelining, chunked bodies and disconnects are exactly what is sent.
Every request here is also checked for which path served it, so a fall-back cannot pass unnoticed."""

from __future__ import annotations

import asyncio
import gc
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn

from conftest import MASTER_KEY, ledger_rows
from keel.core import hotserve, server
from tests.fakes.openai_upstream import FakeOpenAI

pytestmark = pytest.mark.store

MAX_BODY = 4096


class Served:
    """Counts the requests `HotProtocol` served itself (the real method runs)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        real = hotserve.HotProtocol._serve

        async def counting(protocol: hotserve.HotProtocol, hot: Any) -> None:
            self.count += 1
            await real(protocol, hot)

        monkeypatch.setattr(hotserve.HotProtocol, "_serve", counting)


@pytest.fixture
def fake():
    with FakeOpenAI(chunk_delay_ms=30) as f:
        yield f


@pytest.fixture
def keel(tmp_path, db_url, fake, monkeypatch) -> Iterator[dict[str, Any]]:
    from keel.app import create_app
    from keel.core.settings import DeploymentConfig, Settings
    from keel.identity import service as identity

    served = Served(monkeypatch)
    model = DeploymentConfig(alias="fake", provider="openai_compatible", model="m", base_url=fake.root + "/v1",
                             input_price_per_1m=1.0, output_price_per_1m=2.0)
    settings = Settings(data_dir=tmp_path / "data", database_url=db_url, embedded_models=False, port=0,
                        master_key=MASTER_KEY, models=[model], max_body_bytes=MAX_BODY)
    built = create_app(settings)
    secret, _ = identity.create_key(built.app.state.store, role="member")
    srv = uvicorn.Server(server.config_for(built.asgi, settings))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.02)
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield {"port": port, "key": secret, "served": served, "server": srv, "db_url": db_url,
           "gateway": built.app.state.gateway}
    srv.should_exit = True
    thread.join(30)


def request(key: str, body: Any = None, *, path: str = "/v1/chat/completions", method: str = "POST",
            extra: str = "", raw: bytes | None = None) -> bytes:
    data = raw if raw is not None else json.dumps(body).encode()
    return (f"{method} {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n{extra}\r\n").encode() + data


def chat(stream: bool = False, **kw: Any) -> dict[str, Any]:
    return {"model": "fake", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8,
            "stream": stream, **kw}


class Conn:
    """One keep-alive connection; `read()` takes one response off it (length or chunked body)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.file = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self) -> tuple[int, dict[str, str], bytes]:
        status = int(self.file.readline().split()[1])
        headers: dict[str, str] = {}
        while (line := self.file.readline()) not in (b"\r\n", b""):
            name, value = line.decode("latin-1").split(":", 1)
            headers[name.strip().lower()] = value.strip()
        if status < 200:
            return status, headers, b""
        if "content-length" in headers:
            return status, headers, self.file.read(int(headers["content-length"]))
        body = b""
        while (size := int(self.file.readline().strip(), 16)) > 0:
            body += self.file.read(size)
            assert self.file.read(2) == b"\r\n"
        assert self.file.read(2) == b"\r\n"
        return status, headers, body

    def closed(self) -> bool:
        return self.file.read(1) == b""

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def test_hot_requests_keep_alive_and_answer_like_the_framework_path(keel):
    c = Conn(keel["port"])
    c.send(request(keel["key"], chat(), extra="X-Request-Id: req-hot-1\r\n"))
    status, headers, body = c.read()
    assert status == 200 and keel["served"].count == 1
    answer = json.loads(body)
    assert answer["object"] == "chat.completion" and answer["choices"][0]["message"]["content"]
    assert headers["x-client-request-id"] == "req-hot-1" and headers["x-request-id"].startswith("req_")
    assert headers["x-keel-deployment"]
    assert float(headers["x-keel-overhead-ms"]) >= 0 and headers["content-type"] == "application/json"
    # The same request on the framework path (a query string keeps it off the hot path) answers alike.
    c.send(request(keel["key"], chat(), path="/v1/chat/completions?via=asgi", extra="X-Request-Id: req-hot-1\r\n"))
    status2, headers2, body2 = c.read()
    assert status2 == 200 and keel["served"].count == 1
    assert set(headers2) == set(headers)
    assert json.loads(body2).keys() == answer.keys()
    # Then an ordinary route on the same connection, and a hot one again.
    c.send(f"GET /v1/models HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {keel['key']}\r\n\r\n".encode())
    status3, _, body3 = c.read()
    assert status3 == 200 and json.loads(body3)["data"][0]["id"] == "fake"
    c.send(request(keel["key"], chat()))
    assert c.read()[0] == 200 and keel["served"].count == 2
    c.close()


def test_pipelined_requests_are_answered_in_order(keel):
    c = Conn(keel["port"])
    c.send(request(keel["key"], chat(), extra="X-Request-Id: first\r\n")
           + request(keel["key"], chat(), extra="X-Request-Id: second\r\n")
           + f"GET /v1/models HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {keel['key']}\r\n\r\n".encode())
    first, second, third = c.read(), c.read(), c.read()
    assert (first[0], first[1]["x-client-request-id"]) == (200, "first")
    assert (second[0], second[1]["x-client-request-id"]) == (200, "second")
    assert third[0] == 200 and "data" in json.loads(third[2])
    assert keel["served"].count == 1  # the ones queued behind it took the framework path
    c.close()


def test_errors_leave_as_problems_from_the_hot_path(keel):
    c = Conn(keel["port"])
    c.send(request(keel["key"], raw=b'{"model": '))
    status, headers, body = c.read()
    problem = json.loads(body)
    assert status == 400 and problem["code"] == "malformed_json"
    assert headers["content-type"].startswith("application/problem+json")
    assert problem["request_id"] == headers["x-request-id"]
    c.send(request("sk-keel-wrong", chat()))
    status, _, body = c.read()
    assert status == 401 and json.loads(body)["code"] == "unauthorized"
    c.send(request(keel["key"], {"model": "nope", "messages": [{"role": "user", "content": "x"}]}))
    status, _, body = c.read()
    assert status == 404 and "nope" in json.loads(body)["detail"]
    assert keel["served"].count == 3
    c.close()


def test_bodies_it_does_not_take_go_the_framework_path(keel):
    c = Conn(keel["port"])
    # Over the limit: 413 from the framework path, and the connection stays usable.
    c.send(request(keel["key"], chat(messages=[{"role": "user", "content": "x" * MAX_BODY}])))
    status, _, body = c.read()
    assert status == 413 and json.loads(body)["code"] == "payload_too_large"
    c.close()
    c = Conn(keel["port"])
    data = json.dumps(chat()).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {keel['key']}\r\n"
            "Content-Type: application/json\r\n")
    c.send(head.encode() + b"Transfer-Encoding: chunked\r\n\r\n"
           + b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data))
    assert c.read()[0] == 200
    c.send(head.encode() + f"Content-Length: {len(data)}\r\nExpect: 100-continue\r\n\r\n".encode())
    assert c.read()[0] == 100
    c.send(data)
    assert c.read()[0] == 200
    assert keel["served"].count == 0
    c.close()


def test_connection_close_and_http_1_0_close_after_the_answer(keel):
    for extra, version in (("Connection: close\r\n", "1.1"), ("", "1.0")):
        c = Conn(keel["port"])
        c.send(request(keel["key"], chat(), extra=extra).replace(b"HTTP/1.1", f"HTTP/{version}".encode(), 1))
        status, headers, _ = c.read()
        assert status == 200 and headers["connection"] == "close"
        assert c.closed()
        c.close()
    assert keel["served"].count == 2


def test_streams_are_chunked_sse_and_a_client_leaving_cuts_them(keel, fake):
    c = Conn(keel["port"])
    c.send(request(keel["key"], chat(stream=True)))
    status, headers, body = c.read()
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [e for e in body.decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and json.loads(events[0][6:])["object"] == "chat.completion.chunk"
    # The official client reads the same stream.
    with httpx.Client(base_url=f"http://127.0.0.1:{keel['port']}", timeout=20,
                      headers={"Authorization": f"Bearer {keel['key']}"}) as h:
        with h.stream("POST", "/v1/chat/completions", json=chat(stream=True, max_tokens=200)) as r:
            first = next(r.iter_lines())
            assert first.startswith("data: ")
    # Gone after the first chunk of a slow stream: the row says cancelled, the upstream saw the close.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        rows = ledger_rows(keel["db_url"], "status = 'cancelled'")
        if rows:
            break
        time.sleep(0.05)
    assert len(rows) == 1 and rows[0].error_code == "client_disconnected" and rows[0].stream
    assert keel["served"].count == 2
    c.close()


def test_graceful_shutdown_finishes_the_request_in_flight(keel, fake):
    fake.latency = 0.5
    c = Conn(keel["port"])
    c.send(request(keel["key"], chat()))
    time.sleep(0.2)
    keel["server"].should_exit = True  # what SIGTERM sets
    status, headers, body = c.read()
    assert status == 200 and headers["connection"] == "close" and json.loads(body)["choices"]
    assert c.closed()
    c.close()


def test_a_stream_whose_client_left_before_the_first_delta_is_cut_and_metered(keel, fake):
    fake.latency = 0.4
    c = Conn(keel["port"])
    c.send(request(keel["key"], chat(stream=True, max_tokens=200), extra="X-Request-Id: gone-early\r\n"))
    time.sleep(0.1)
    c.close()  # before the upstream's first byte
    deadline = time.monotonic() + 10
    rows: list[Any] = []
    while not rows and time.monotonic() < deadline:
        rows = ledger_rows(keel["db_url"], "client_request_id = 'gone-early'")
        time.sleep(0.05)
    assert len(rows) == 1 and rows[0].status == "cancelled" and rows[0].error_code == "client_disconnected"
    assert keel["served"].count == 1


class Hold:
    """A stage whose work after the call waits until the test releases it (slow bookkeeping)."""

    def __init__(self, clear_answer: bool = False) -> None:
        self.release = threading.Event()
        self.clear_answer = clear_answer

    async def handle(self, call: Any, nxt: Any) -> Any:
        if self.clear_answer:
            call.answer = None  # what a stage that may still change the answer does
        result = await nxt(call)
        while not self.release.is_set():
            await asyncio.sleep(0.01)
        return result


def test_the_answer_leaves_before_the_bookkeeping_after_it(keel):
    hold = Hold()
    keel["gateway"].stages.insert(0, hold)  # outermost: its wait comes after every other stage's work
    c = Conn(keel["port"])
    c.send(request(keel["key"], chat(), extra="X-Request-Id: early\r\n"))
    status, headers, body = c.read()  # arrives while the stage still holds the call
    assert status == 200 and json.loads(body)["choices"][0]["message"]["content"]
    assert headers["x-client-request-id"] == "early" and not hold.release.is_set()
    time.sleep(0.6)  # two ledger flushes: the row is not written while the call is held
    assert ledger_rows(keel["db_url"], "client_request_id = 'early'") == []
    hold.release.set()
    deadline = time.monotonic() + 10
    rows: list[Any] = []
    while not rows and time.monotonic() < deadline:
        rows = ledger_rows(keel["db_url"], "client_request_id = 'early'")
        time.sleep(0.05)
    assert len(rows) == 1 and rows[0].status == "ok" and rows[0].tokens_out > 0
    c.send(request(keel["key"], chat()))  # the connection goes on
    assert c.read()[0] == 200 and keel["served"].count == 2
    c.close()


def test_a_stage_that_may_change_the_answer_keeps_it_until_done(keel):
    hold = Hold(clear_answer=True)
    keel["gateway"].stages.insert(0, hold)
    c = Conn(keel["port"])
    c.send(request(keel["key"], chat()))
    c.sock.settimeout(0.5)
    with pytest.raises(TimeoutError):
        c.sock.recv(1, socket.MSG_PEEK)  # nothing while the stage holds the call
    c.sock.settimeout(20)
    hold.release.set()
    status, _, body = c.read()
    assert status == 200 and json.loads(body)["object"] == "chat.completion"
    c.close()


def test_a_request_leaves_nothing_for_the_cyclic_collector(keel):
    """Reference counting frees each request at once: no cycle through the scope, the task or the call
    (they cost memory and collector pauses under load)."""
    c = Conn(keel["port"])
    for stream in (False, True, False):  # warm every path first
        c.send(request(keel["key"], chat(stream=stream)))
        c.read()
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for i in range(20):
            c.send(request(keel["key"], chat(stream=i % 2 == 1)))
            assert c.read()[0] == 200
        gc.collect()
        kinds = {type(o).__name__ for o in gc.garbage}
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert not kinds & {"_Hot", "Task", "coroutine", "Call", "JSONAnswer", "Context", "StarletteRequest",
                        "Request"}, kinds
    c.close()


class Heads:
    """Records which parser read each hot request (`_whole` or llhttp) and the scope it was served with."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.whole: list[bool] = []
        self.scopes: list[dict[str, Any]] = []
        real_whole, real_serve = hotserve.HotProtocol._whole, hotserve.HotProtocol._serve

        def whole(protocol: hotserve.HotProtocol, data: bytes) -> bool:
            took = real_whole(protocol, data)
            self.whole.append(took)
            return took

        async def serve(protocol: hotserve.HotProtocol, hot: Any) -> None:
            self.scopes.append({k: v for k, v in hot.scope.items() if k not in ("state", "app", "keel.send_now")})
            await real_serve(protocol, hot)

        monkeypatch.setattr(hotserve.HotProtocol, "_whole", whole)
        monkeypatch.setattr(hotserve.HotProtocol, "_serve", serve)


def test_a_whole_request_in_one_read_is_served_as_llhttp_would_serve_it(keel, monkeypatch):
    heads = Heads(monkeypatch)
    c = Conn(keel["port"])
    one = request(keel["key"], chat(), extra="X-Request-Id: same\r\nX-Pad:\t padded \r\n")
    c.send(one)
    first = c.read()
    split = one.index(b"X-Pad")
    c.send(one[:split])  # the same request in two reads: llhttp parses it
    time.sleep(0.05)
    c.send(one[split:])
    second = c.read()
    assert heads.whole[0] is True and heads.whole[1] is False and len(heads.scopes) == 2
    assert heads.scopes[0] == heads.scopes[1]  # the same scope, headers (lower-case, trimmed) included
    assert (b"x-pad", b"padded") in heads.scopes[0]["headers"]
    assert first[0] == second[0] == 200
    assert first[1]["x-client-request-id"] == second[1]["x-client-request-id"] == "same"
    c.send(request(keel["key"], chat(), extra="Connection: close\r\n"))  # whole, and the connection closes
    status, headers, _ = c.read()
    assert status == 200 and headers["connection"] == "close" and c.closed() and heads.whole[-1] is True
    c.close()


@pytest.mark.parametrize("extra, status", [
    ("Content-Length: 3\r\n", 400),  # a second length: llhttp refuses it
    ("X-Folded: a\r\n b\r\n", 400),  # obs-fold
    ("X-Bad: a\x01b\r\n", 400),  # a control character in a value
    ("Bad Name: x\r\n", 400),  # a name that is not a token
    ("Upgrade: h2c\r\nConnection: upgrade\r\n", 400),  # llhttp ends an upgrade request at its head: no body
])
def test_heads_the_strict_pattern_does_not_take_go_to_llhttp(keel, monkeypatch, extra, status):
    heads = Heads(monkeypatch)
    c = Conn(keel["port"])
    c.send(request(keel["key"], chat(), extra=extra))
    assert c.read()[0] == status
    assert heads.whole == [False]
    c.close()


def test_a_pipelined_head_over_the_limits_lets_the_answer_before_it_finish_then_closes(keel, fake):
    """A head over the limits behind a request still being answered: that answer goes out whole (saying
    `connection: close`), then the connection closes and the refused request never runs."""
    fake.latency = 0.3
    c = Conn(keel["port"])
    crowded = "".join(f"X-H{i}: v\r\n" for i in range(150))
    c.send(request(keel["key"], chat()) + request(keel["key"], chat(), extra=crowded))
    status, headers, body = c.read()
    assert status == 200 and headers["connection"] == "close" and json.loads(body)["choices"]
    assert c.closed() and fake.requests == 1
    c.close()
