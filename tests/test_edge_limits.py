"""The HTTP edge, spoken to over raw sockets on the real `keel serve`: an `Upgrade` request never
desynchronises a connection (nothing after it is ever served as a request), and request heads over the
size or count limit answer 431 and close before any endpoint or auth runs. Nothing here depends on
which server or protocol implementation Keel runs on: only bytes in and bytes out."""

from __future__ import annotations

import json
import select
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests.fakes.openai_upstream import FakeOpenAI

pytestmark = pytest.mark.store

MAX_HEADER_BYTES = 64 * 1024
MAX_HEADERS = 100
TIMEOUT = 10.0
CHAT = "/v1/chat/completions"
EMBED = "/v1/embeddings"


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as f:
        yield f


@pytest.fixture(scope="module")
def keel(module_server_factory, fake, tmp_path_factory) -> Any:
    cfg = tmp_path_factory.mktemp("cfg") / "keel.yaml"
    cfg.write_text(f"""
models:
  - alias: fake
    provider: openai_compatible
    model: m
    base_url: {fake.url}
  - alias: fake-embed
    provider: openai_compatible
    model: e
    kind: embedding
    base_url: {fake.url}
""")
    return module_server_factory(config=cfg, KEEL_MAX_HEADER_BYTES=str(MAX_HEADER_BYTES),
                                 KEEL_MAX_HEADERS=str(MAX_HEADERS))


def head(method: str, path: str, key: str | None, *lines: str) -> bytes:
    auth = [f"Authorization: Bearer {key}"] if key else []
    return ("\r\n".join([f"{method} {path} HTTP/1.1", "Host: t", *auth, *lines]) + "\r\n\r\n").encode()


def post(path: str, key: str | None, body: Any, *lines: str) -> bytes:
    data = json.dumps(body).encode()
    return head("POST", path, key, "Content-Type: application/json", f"Content-Length: {len(data)}", *lines) + data


def chat_body(tag: str = "hello") -> dict[str, Any]:
    return {"model": "fake", "messages": [{"role": "user", "content": tag}], "max_tokens": 4}


class Wire:
    """One raw connection; `responses()` reads every response until the server closes it (or the deadline)."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=TIMEOUT)
        self.file = self.sock.makefile("rb")

    def send(self, data: bytes) -> bool:
        """Send `data`; False if the server had already closed the connection."""
        try:
            self.sock.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError):
            return False

    def read(self) -> tuple[int, dict[str, str], bytes] | None:
        """One response, or None at the end of the connection."""
        try:
            line = self.file.readline()
        except ConnectionResetError:
            return None
        if not line:
            return None
        status = int(line.split()[1])
        headers: dict[str, str] = {}
        while (line := self.file.readline()) not in (b"\r\n", b""):
            name, value = line.decode("latin-1").split(":", 1)
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            return status, headers, self.file.read(int(headers["content-length"]))
        body = b""
        if headers.get("transfer-encoding") == "chunked":
            while (size := int(self.file.readline().strip(), 16)) > 0:
                body += self.file.read(size)
                self.file.read(2)
            self.file.read(2)
        return status, headers, body

    def responses(self) -> list[tuple[int, dict[str, str], bytes]]:
        """Every response until the server closes the connection; fails if it stays open past the deadline."""
        out = []
        try:
            while (r := self.read()) is not None:
                out.append(r)
        except TimeoutError:
            pytest.fail(f"the connection stayed open after {out}")
        return out

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def teams(keel: Any) -> set[str]:
    with keel.admin() as c:
        return {t["name"] for t in c.get("/admin/teams").json()["data"]}


# -- Upgrade -----------------------------------------------------------------------------------------------

UPGRADES = [("Connection: Upgrade", "Upgrade: something"), ("Connection: keep-alive, upgrade", "Upgrade: h2c"),
            ("Connection: Upgrade", "Upgrade: websocket")]


SMUGGLED = {
    "authenticated-chat": lambda keel: post(CHAT, keel.admin_key, chat_body("smuggled")),
    "anonymous-chat": lambda keel: post(CHAT, None, chat_body("smuggled")),
    "anonymous-embedding": lambda keel: post(EMBED, None, {"model": "fake-embed", "input": "smuggled"}),
    "authenticated-admin": lambda keel: post("/admin/teams", keel.admin_key, {"name": "smuggled"}),
}


@pytest.mark.parametrize("path", [CHAT, EMBED, "/admin/teams", "/v1/models"])
@pytest.mark.parametrize("upgrade", UPGRADES, ids=["something", "h2c", "websocket"])
@pytest.mark.parametrize("smuggled", SMUGGLED)
def test_an_upgrade_request_never_lets_a_later_packet_be_served_as_a_request(keel, fake, path, upgrade, smuggled):
    """Regression (security issue, hole 5): with `Connection: Upgrade` and nothing after the head, the next
    packet was served as a second request — a smuggling primitive behind any proxy that tunnels upgrades.
    One request, one answer, then nothing more on that connection: an authenticated request's effect never
    happens, and an unauthenticated one never reaches an endpoint (not even for a 401)."""
    before = fake.requests
    w = Wire(keel.url)
    w.send(head("GET" if path == "/v1/models" else "POST", path, keel.admin_key, *upgrade))
    first = w.read()
    assert first is not None and first[0] < 500, first
    w.send(SMUGGLED[smuggled](keel))  # a packet of its own, after the answer
    assert w.responses() == []  # exactly one answer, and the connection ends
    w.close()
    assert "smuggled" not in teams(keel)
    assert fake.requests == before  # no call reached the upstream


@pytest.mark.parametrize("path", [CHAT, EMBED, "/admin/teams"])
@pytest.mark.parametrize("smuggled", ["authenticated-admin", "anonymous-chat"])
def test_an_upgrade_request_whose_body_is_a_request_never_runs_it(keel, fake, path, smuggled):
    """Regression (hole 5): an upgrade request declaring a body that is itself a request, sent in a later
    packet: that request never runs, and the connection carries exactly one answer and then ends. (llhttp
    answers the upgrade request at its head and drops the rest; a server may also wait for the body.)"""
    before = fake.requests
    inner = SMUGGLED[smuggled](keel)
    w = Wire(keel.url)
    w.send(head("POST", path, keel.admin_key, "Content-Type: application/json", f"Content-Length: {len(inner)}",
                "Connection: Upgrade", "Upgrade: something"))
    answers = []
    if select.select([w.sock], [], [], 0.5)[0]:  # answered at its head: read that before the body goes
        answers.append(w.read())
    w.send(inner)
    answers += w.responses()
    w.close()
    assert len(answers) == 1 and answers[0] is not None and answers[0][0] < 500, answers
    assert "smuggled" not in teams(keel)
    assert fake.requests == before


def test_the_same_connection_goes_on_after_a_plain_request(keel):
    """The guard against upgrades does not cost ordinary keep-alive: three requests, three answers."""
    w = Wire(keel.url)
    for _ in range(3):
        w.send(post(CHAT, keel.admin_key, chat_body()))
        status, headers, _ = w.read()
        assert status == 200 and headers.get("connection") != "close"
    w.close()


# -- header limits -----------------------------------------------------------------------------------------

def padded(total: int, count: int) -> list[str]:
    """`count` header lines whose lines (with CRLF) add up to about `total` bytes."""
    each = max(total // count - len("X-Pad-000: \r\n"), 1)
    return [f"X-Pad-{i:03d}: " + "p" * each for i in range(count)]


def send_in_background(w: Wire, data: bytes) -> threading.Thread:
    """Send `data` while the test reads: a server that answers before the head ends must not deadlock it."""
    t = threading.Thread(target=w.send, args=(data,), daemon=True)
    t.start()
    return t


ROUTES = [("POST", CHAT), ("POST", EMBED), ("GET", "/v1/models"), ("POST", "/admin/teams")]


def request(method: str, path: str, key: str | None, lines: list[str]) -> bytes:
    if method == "GET":
        return head(method, path, key, *lines)
    body = {CHAT: chat_body(), EMBED: {"model": "fake-embed", "input": "x"}}.get(path, {"name": "t-limits"})
    return post(path, key, body, *lines)


@pytest.mark.parametrize("method, path", ROUTES)
@pytest.mark.parametrize("lines", [
    padded(MAX_HEADER_BYTES + 1024, 8),  # a header block over the byte limit
    ["X-Big: " + "b" * (2 * 1024 * 1024)],  # 2 MB in one header (the reproduction)
    [f"X-H{i}: v" for i in range(50_000)],  # 50,000 headers (the reproduction)
    [f"X-H{i}: v" for i in range(MAX_HEADERS)],  # more than 100 headers, with Host, Authorization, …
], ids=["over-bytes", "2MB", "50k-headers", "over-count"])
def test_a_request_head_over_the_limits_is_431_and_closes(keel, fake, method, path, lines):
    """Regression (hole 5): 2 MB of headers and 50,000 headers were answered 200. A head over the size or
    count limit answers 431 and the connection closes, before any endpoint or auth runs (an unauthenticated
    one gets 431, not 401; nothing reaches the upstream)."""
    before = fake.requests
    for key in (keel.admin_key, None):
        w = Wire(keel.url)
        sender = send_in_background(w, request(method, path, key, lines))
        answers = w.responses()
        sender.join(TIMEOUT)
        w.close()
        assert [a[0] for a in answers] == [431], answers
    assert fake.requests == before


@pytest.mark.parametrize("path", [CHAT, "/admin/teams"])
def test_a_head_that_never_ends_is_refused_once_past_the_limit(keel, path):
    """The limit holds while the head is still arriving: the server does not buffer it to the end."""
    w = Wire(keel.url)
    w.send(f"POST {path} HTTP/1.1\r\nHost: t\r\nX-Big: ".encode() + b"b" * (MAX_HEADER_BYTES * 3 // 2))
    assert [a[0] for a in w.responses()] == [431]
    w.close()


@pytest.mark.parametrize("method, path", ROUTES)
def test_a_request_head_just_under_the_limits_is_served(keel, method, path):
    """Just under the limits is an ordinary request, on the hot endpoints and on the framework's routes."""
    w = Wire(keel.url)
    base = 4 if method == "POST" else 2  # Host, Authorization (+ Content-Type, Content-Length): 100 in all
    for lines in (padded(MAX_HEADER_BYTES - 2048, 8), [f"X-H{i}: v" for i in range(MAX_HEADERS - base)]):
        w.send(request(method, path, keel.admin_key, lines))
        status, _, body = w.read()
        assert status in (200, 201, 409), body  # 409: the team of the first round exists already
    w.close()


def test_the_limits_are_settings():
    from keel.core.settings import load_settings

    settings, sources = load_settings(environ={"KEEL_MAX_HEADER_BYTES": "32768", "KEEL_MAX_HEADERS": "50"})
    assert (settings.max_header_bytes, settings.max_headers) == (32768, 50)
    defaults, _ = load_settings(environ={})
    assert (defaults.max_header_bytes, defaults.max_headers) == (MAX_HEADER_BYTES, MAX_HEADERS)
