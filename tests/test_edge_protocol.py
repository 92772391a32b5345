"""The serving edge on the real server (Keel's ASGI app on its HTTP server, in a thread) against a loopback
fake upstream, spoken to over raw sockets so keep-alive, pipelining, chunked bodies and disconnects are
exactly what is sent: the hot endpoints answer like the framework's routes, streams are cut and metered when
the client leaves, a shutdown finishes the request in flight, and a 500 ends its request, not the connection."""

from __future__ import annotations

import asyncio
import gc
import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from conftest import MASTER_KEY, eventually, ledger_rows, wait_ledger
from keel.core import server
from keel.core.logs import client_request_id_var
from tests.fakes.openai_upstream import FakeOpenAI

pytestmark = pytest.mark.store

MAX_BODY = 4096


@pytest.fixture
def fake():
    with FakeOpenAI(chunk_delay_ms=30) as f:
        yield f


class Running:
    """`server.serve` in a thread of its own with its own event loop; `stop()` is what SIGTERM does."""

    def __init__(self, app: Any, settings: Any) -> None:
        self.ready = threading.Event()
        self.url = ""
        self.loop = asyncio.new_event_loop()
        self.stopping = asyncio.Event()
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self._serve(app, settings),),
                                       daemon=True)
        self.thread.start()
        assert self.ready.wait(30), "the server did not start"

    async def _serve(self, app: Any, settings: Any) -> None:
        await server.serve(app, settings, on_ready=self._ready, stop=self.stopping)

    def _ready(self, url: str) -> None:
        self.url = url
        self.ready.set()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.stopping.set)

    def join(self) -> None:
        self.stop()
        self.thread.join(30)


@pytest.fixture
def keel(tmp_path, db_url, fake) -> Iterator[dict[str, Any]]:
    from keel.app import create_app
    from keel.core.settings import DeploymentConfig, Settings
    from keel.identity import service as identity

    model = DeploymentConfig(alias="fake", provider="openai_compatible", model="m", base_url=fake.root + "/v1",
                             input_price_per_1m=1.0, output_price_per_1m=2.0)
    settings = Settings(data_dir=tmp_path / "data", database_url=db_url, embedded_models=False, port=0,
                        master_key=MASTER_KEY, models=[model], max_body_bytes=MAX_BODY)
    built = create_app(settings)
    secret, _ = identity.create_key(built.app.state.store, role="member")
    running = Running(built.asgi, settings)
    port = int(running.url.rsplit(":", 1)[1])
    yield {"port": port, "key": secret, "server": running, "db_url": db_url, "gateway": built.app.state.gateway}
    running.join()


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
    assert status == 200
    answer = json.loads(body)
    assert answer["object"] == "chat.completion" and answer["choices"][0]["message"]["content"]
    assert headers["x-client-request-id"] == "req-hot-1" and headers["x-request-id"].startswith("req_")
    assert headers["x-keel-deployment"]
    assert float(headers["x-keel-overhead-ms"]) >= 0 and headers["content-type"] == "application/json"
    # The same request on the framework's route (a query string keeps it off the hot dispatch) answers alike.
    c.send(request(keel["key"], chat(), path="/v1/chat/completions?via=asgi", extra="X-Request-Id: req-hot-1\r\n"))
    status2, headers2, body2 = c.read()
    assert status2 == 200
    assert set(headers2) == set(headers)
    assert json.loads(body2).keys() == answer.keys()
    # Then an ordinary route on the same connection, and a hot one again.
    c.send(f"GET /v1/models HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {keel['key']}\r\n\r\n".encode())
    status3, _, body3 = c.read()
    assert status3 == 200 and json.loads(body3)["data"][0]["id"] == "fake"
    c.send(request(keel["key"], chat()))
    assert c.read()[0] == 200
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
    c.close()


def test_bodies_over_the_limit_chunked_or_expecting_100_continue(keel):
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
    status, headers, _ = c.read()
    assert status == 200 and headers["connection"] == "close" and c.closed()  # after a chunked body (keel/core/edge.py)
    c.close()
    c = Conn(keel["port"])
    c.send(head.encode() + f"Content-Length: {len(data)}\r\nExpect: 100-continue\r\n\r\n".encode())
    assert c.read()[0] == 100
    c.send(data)
    assert c.read()[0] == 200
    c.close()


def test_connection_close_and_http_1_0_close_after_the_answer(keel):
    for extra, version in (("Connection: close\r\n", "1.1"), ("", "1.0")):
        c = Conn(keel["port"])
        c.send(request(keel["key"], chat(), extra=extra).replace(b"HTTP/1.1", f"HTTP/{version}".encode(), 1))
        status, _, _ = c.read()
        assert status == 200 and c.closed()
        c.close()


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
    rows = wait_ledger(keel["db_url"], "status = 'cancelled'")
    assert len(rows) == 1 and rows[0].error_code == "client_disconnected" and rows[0].stream
    c.close()


def test_graceful_shutdown_finishes_the_request_in_flight(keel, fake):
    fake.latency = 0.5
    c, before = Conn(keel["port"]), fake.requests
    c.send(request(keel["key"], chat()))
    eventually(lambda: fake.requests > before)  # in flight: the upstream has it and answers in 0.5 s
    keel["server"].stop()  # what SIGTERM does
    status, _, body = c.read()
    assert status == 200 and json.loads(body)["choices"]
    assert c.closed()
    c.close()


def test_a_stream_whose_client_left_before_the_first_delta_is_cut_and_metered(keel, fake):
    fake.latency = 0.4
    c, before = Conn(keel["port"]), fake.requests
    c.send(request(keel["key"], chat(stream=True, max_tokens=200), extra="X-Request-Id: gone-early\r\n"))
    eventually(lambda: fake.requests > before)  # the upstream has it and answers in 0.4 s
    c.close()  # before the upstream's first byte
    rows = wait_ledger(keel["db_url"], "client_request_id = 'gone-early'")
    assert len(rows) == 1 and rows[0].status == "cancelled" and rows[0].error_code == "client_disconnected"


class Hold:
    """A stage whose work after the call waits until the test releases it (slow bookkeeping); with `only`, just for
    the request whose X-Request-Id it is."""

    def __init__(self, clear_answer: bool = False, only: str | None = None) -> None:
        self.release = threading.Event()
        self.changes_answer = clear_answer  # one that may still change the answer holds it (the default)
        self.only = only

    async def handle(self, call: Any, nxt: Any) -> Any:
        result = await nxt(call)
        if self.only is not None and client_request_id_var.get() != self.only:
            return result
        while not self.release.is_set():
            await asyncio.sleep(0.01)  # the subject: bookkeeping that lasts until the test releases it
        return result


def test_the_answer_leaves_before_the_bookkeeping_after_it(keel):
    hold = Hold(only="early")
    keel["gateway"].stages.insert(0, hold)  # outermost: its wait comes after every other stage's work
    c = Conn(keel["port"])
    c.send(request(keel["key"], chat(), extra="X-Request-Id: early\r\n"))
    status, headers, body = c.read()  # arrives while the stage still holds the call
    assert status == 200 and json.loads(body)["choices"][0]["message"]["content"]
    assert headers["x-client-request-id"] == "early" and not hold.release.is_set()
    later = Conn(keel["port"])  # a call answered after it, not held: once its row is written, a flush ran
    later.send(request(keel["key"], chat(), extra="X-Request-Id: later\r\n"))
    assert later.read()[0] == 200
    later.close()
    wait_ledger(keel["db_url"], "client_request_id = 'later'")
    assert ledger_rows(keel["db_url"], "client_request_id = 'early'") == []  # ... without the held call's row
    hold.release.set()
    rows = wait_ledger(keel["db_url"], "client_request_id = 'early'")
    assert len(rows) == 1 and rows[0].status == "ok" and rows[0].tokens_out > 0
    c.send(request(keel["key"], chat()))  # the connection goes on
    assert c.read()[0] == 200
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


class Boom:
    """A stage with a bug: every call raises an unexpected error."""

    async def handle(self, call: Any, nxt: Any) -> Any:
        raise RuntimeError("a bug in a stage")


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/chat/completions?via=framework"])
def test_a_500_ends_its_request_and_the_connection_goes_on(keel, path):
    """Regression: after an unhandled error the 500 problem was sent, then the error reached the server and it
    reset the connection, so the client's next keep-alive request failed with ECONNRESET."""
    keel["gateway"].stages.insert(0, Boom())
    c = Conn(keel["port"])
    c.send(request(keel["key"], chat(), path=path))
    status, headers, body = c.read()
    assert status == 500 and json.loads(body)["code"] == "internal_error"
    assert "a bug" not in body.decode() and headers["x-request-id"].startswith("req_")
    keel["gateway"].stages.pop(0)
    c.send(request(keel["key"], chat(), path=path))  # the same connection
    assert c.read()[0] == 200
    c.close()
