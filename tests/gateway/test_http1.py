"""Keel's HTTP/1.1 client (keel/core/http1.py) beyond the wire conformance suite (test_outbound_wire.py): what a
cancelled or abandoned call leaves behind, its connection limit, back-pressure on large bodies, connections the
upstream closed or desynchronised, and the headers a caller may not set."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Awaitable, Callable

import pytest
from yarl import URL

from keel.core.errors import ConfigError
from keel.core.http1 import Client, ConnectFailed, ConnectionLost, MalformedAnswer, WireError, header_lines
from keel.core.outbound import Outbound
from tests.conftest import eventually_async
from tests.gateway.test_outbound_wire import read_request

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
BODY = b'{"ok": true}'


def ok(body: bytes = BODY, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


class Upstream:
    """A loopback server: `handler` per connection; counts connections and notes when each one ends."""

    def __init__(self, handler: Handler) -> None:
        self.handler, self.connections, self.ended = handler, 0, 0

    async def __aenter__(self) -> Upstream:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()
                self.ended += 1

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()

    @property
    def url(self) -> URL:
        return URL(f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v1/x")


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 30))  # type: ignore[arg-type]


async def answer_each(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, answer: bytes = ok()) -> None:
    while await read_request(reader):
        writer.write(answer)
        await writer.drain()


async def get(client: Client, url: URL, method: str = "POST") -> bytes:
    resp = await client.request(method, url, body=b"{}" if method == "POST" else b"")
    return await resp.read()


def test_a_call_cancelled_while_waiting_closes_its_connection_and_frees_its_slot():
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await reader.read()  # until the client goes

    async def main() -> None:
        client = Client(limit=1)
        async with Upstream(silent) as stuck, Upstream(answer_each) as fine:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2):
                    await get(client, stuck.url)
            await eventually_async(lambda: stuck.ended == 1)  # the upstream saw the connection close
            assert await get(client, fine.url) == BODY  # the one slot was given back
        await client.close()

    run(main())


def test_failed_calls_give_back_their_slots():
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SMTP ready\r\n\r\n")
        await writer.drain()

    async def main() -> None:
        client = Client(limit=2)
        async with Upstream(hang_up) as a, Upstream(garbage) as b, Upstream(answer_each) as fine:
            for _ in range(5):
                for url, error in ((a.url, ConnectionLost), (b.url, MalformedAnswer),
                                   (URL("http://127.0.0.1:9/x"), ConnectFailed)):
                    with pytest.raises(error):
                        await get(client, url)
            async with asyncio.timeout(5):
                assert await get(client, fine.url) == BODY
        await client.close()

    run(main())


def test_a_body_left_part_way_is_never_reused_and_a_whole_one_is():
    async def slow_chunks(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader):
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for _ in range(3):
                writer.write(b"5\r\nhello\r\n")
                await writer.drain()
                await asyncio.sleep(0.02)
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    async def main() -> None:
        client = Client()
        async with Upstream(slow_chunks) as up:
            resp = await client.request("GET", up.url)
            assert await resp.read_some() == b"hello"
            resp.close()
            assert await get(client, up.url, "GET") == b"hello" * 3
            assert await get(client, up.url, "GET") == b"hello" * 3
            assert up.connections == 2
        await client.close()

    run(main())


def test_a_large_body_arrives_whole_through_back_pressure():
    big = bytes(range(256)) * (12 * 4096)  # 12 MiB: reading pauses and resumes

    async def main() -> None:
        client = Client()
        async with Upstream(lambda r, w: answer_each(r, w, ok(big))) as up:
            resp = await client.request("GET", up.url)
            conn = resp._conn
            await eventually_async(lambda: conn.paused, timeout=5)  # the buffer is past the pause mark
            assert await resp.read() == big
            assert await get(client, up.url, "GET") == big and up.connections == 1
        await client.close()

    run(main())


def test_an_idle_connection_the_upstream_closed_is_not_used_again():
    async def one_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(ok())
        await writer.drain()

    async def main() -> None:
        client = Client()
        async with Upstream(one_then_close) as up:
            assert await get(client, up.url) == BODY
            await eventually_async(lambda: up.ended == 1)
            idle = [conn for conns in client._idle.values() for conn, _ in conns]
            await eventually_async(lambda: all(conn.lost for conn in idle), timeout=5)  # the client saw the close
            assert await get(client, up.url) == BODY
            assert up.connections == 2
        await client.close()

    run(main())


def test_bytes_after_an_answer_make_its_connection_unfit():
    """An upstream that sends a second answer nobody asked for cannot have it read as the next call's answer."""
    async def extra(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = 0
        while await read_request(reader):
            n += 1
            writer.write(ok(b"first") + ok(b"smuggled") if n == 1 else ok(b"second"))
            await writer.drain()

    async def main() -> None:
        client = Client()
        async with Upstream(extra) as up:
            assert await get(client, up.url) == b"first"
            await eventually_async(lambda: up.ended == 1, timeout=5)  # the client closed the connection it came on
            assert await get(client, up.url) == b"first"  # a new connection's first answer, never "smuggled"
            assert up.connections == 2
        await client.close()

    run(main())


@pytest.mark.parametrize("name, value", [("Content-Length", "5"), ("Transfer-Encoding", "chunked"),
                                         ("Host", "elsewhere"), ("connection", "close"), ("X-A", "1\r\nX-B: 2"),
                                         ("X:A", "1"), ("X-A", "ü€")])
def test_headers_that_frame_or_split_the_request_are_refused_before_sending(name, value):
    async def main() -> None:
        client = Client()
        async with Upstream(answer_each) as up:
            with pytest.raises(ValueError, match="header"):
                await client.request("POST", up.url, headers={name: value}, body=b"{}")
            assert up.connections == 0
            assert await get(client, up.url) == BODY  # the refusal held no slot
        await client.close()

    run(main())


@pytest.mark.parametrize("wbits", [zlib.MAX_WBITS, -zlib.MAX_WBITS])
def test_deflate_bodies_zlib_wrapped_or_raw(wbits):
    comp = zlib.compressobj(wbits=wbits)
    data = comp.compress(BODY * 100) + comp.flush()

    async def main() -> None:
        client = Client()
        async with Upstream(lambda r, w: answer_each(r, w, ok(data, b"Content-Encoding: deflate\r\n"))) as up:
            assert await get(client, up.url) == BODY * 100
        await client.close()

    run(main())


def test_a_body_over_the_readers_limit_is_refused_and_its_connection_closed():
    async def part_then_wait(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 5000)
        await writer.drain()
        await reader.read()  # until the client goes

    async def main() -> None:
        client = Client()
        async with Upstream(part_then_wait) as up:
            resp = await client.request("GET", up.url)
            with pytest.raises(MalformedAnswer, match="over 1000 bytes"):
                await resp.read(limit=1000)
            await eventually_async(lambda: up.ended == 1)
        await client.close()

    run(main())


def test_an_answer_to_head_has_no_body_whatever_its_length_says():
    async def main() -> None:
        client = Client()
        async with Upstream(lambda r, w: answer_each(r, w, b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")) as up:
            async with asyncio.timeout(5):
                resp = await client.request("HEAD", up.url)
                assert resp.status == 200 and await resp.read() == b""
        await client.close()

    run(main())


def test_an_unknown_content_encoding_is_a_malformed_answer():
    async def main() -> None:
        client = Client()
        async with Upstream(lambda r, w: answer_each(r, w, ok(b"x", b"Content-Encoding: br\r\n"))) as up:
            with pytest.raises(MalformedAnswer, match="br"):
                await get(client, up.url)
        await client.close()

    run(main())


def test_every_failure_is_a_wire_error():
    assert all(issubclass(e, WireError) for e in (ConnectFailed, ConnectionLost, MalformedAnswer))


# -- found by review: each failed before its fix ------------------------------------------------------------

def test_the_start_of_an_answer_nobody_asked_for_is_never_handed_to_the_next_call():
    """An answer's first bytes in the same read as the previous answer's end (the rest sent after the next
    request) must not become the next call's answer (RFC 9112 §9.2)."""
    async def split(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = 0
        while await read_request(reader):
            n += 1
            if n == 1:
                writer.write(ok(b"first") + b"HTTP/1.1 200 OK\r\nContent-Le")
            else:
                writer.write(b"ngth: 8\r\n\r\nsmuggled")
            await writer.drain()

    async def main() -> None:
        client = Client()
        async with Upstream(split) as up:
            assert await get(client, up.url) == b"first"
            assert await get(client, up.url) == b"first"
            assert up.connections == 2
        await client.close()

    run(main())


def test_closing_the_client_ends_the_calls_in_flight():
    async def part(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await writer.drain()
        await reader.read()

    asked = asyncio.Event()

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        asked.set()
        await reader.read()

    async def main() -> None:
        client = Client()
        async with Upstream(part) as up, Upstream(mute) as up2:
            resp = await client.request("GET", up.url)
            waiting = asyncio.ensure_future(client.request("GET", up2.url))
            await asyncio.wait_for(asked.wait(), 5)  # its request is on the wire, the answer awaited
            await client.close()
            async with asyncio.timeout(2):
                with pytest.raises(ConnectionLost):
                    await resp.read()
                with pytest.raises(ConnectionLost):
                    await waiting
                with pytest.raises(ConnectionLost, match="closed"):
                    await client.request("GET", up.url)

    run(main())


def test_a_compressed_body_cannot_grow_past_the_clients_limit():
    bomb = zlib.compress(b"\0" * (64 << 20))  # ~64 KiB on the wire, 64 MiB inflated
    comp = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
    gz = comp.compress(b"\0" * (64 << 20)) + comp.flush()

    async def main() -> None:
        client = Client(max_body_bytes=1 << 20)
        for body, encoding in ((bomb, b"deflate"), (gz, b"gzip")):
            answer = ok(body, b"Content-Encoding: %s\r\n" % encoding)
            async with Upstream(lambda r, w, a=answer: answer_each(r, w, a)) as up:
                with pytest.raises(MalformedAnswer, match="over"):
                    await get(client, up.url)
        async with Upstream(lambda r, w: answer_each(r, w, ok(b"x" * (2 << 20)))) as up:
            with pytest.raises(MalformedAnswer, match="over"):
                await get(client, up.url)
        await client.close()

    run(main())


def test_trailers_cannot_grow_without_bound():
    async def long_trailer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: ")
        for _ in range(64):
            writer.write(b"a" * 65536)
            await writer.drain()
        await reader.read()

    async def main() -> None:
        client = Client()
        async with Upstream(long_trailer) as up:
            async with asyncio.timeout(5):
                with pytest.raises(MalformedAnswer):
                    await get(client, up.url, "GET")
        await client.close()

    run(main())


def test_a_connection_whose_request_was_not_all_sent_is_not_reused():
    """An early answer (a 413 before the body was read) leaves the rest of the body unsent: the next request on
    that connection would be read as the body's continuation (RFC 9112 §9.5)."""
    async def early(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.3)  # part of the scenario: the body is not read yet, so the client's write stalls
        while await reader.read(1 << 16):
            pass

    async def main() -> None:
        client = Client()
        async with Upstream(early) as up:
            resp = await client.request("POST", up.url, body=b"A" * (32 << 20))
            assert resp.status == 413 and await resp.read() == b""
            assert not any(client._idle.values())
        await client.close()

    run(main())


@pytest.mark.parametrize("answer", [b"HTTP/1.1 204 No Content\r\nContent-Encoding: gzip\r\n\r\n",
                                    b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 0\r\n\r\n"])
def test_an_empty_body_marked_compressed_is_empty(answer):
    async def main() -> None:
        client = Client()
        async with Upstream(lambda r, w: answer_each(r, w, answer)) as up:
            assert await get(client, up.url) == b""
        await client.close()

    run(main())


@pytest.mark.parametrize("method, path", [("GET /evil HTTP/1.1\r\nX: y\r\nZ:", "/x"), ("GE T", "/x"),
                                          ("GET", "/a b"), ("GET", "/a\x7fb")])
def test_a_method_or_target_that_would_split_the_request_line_is_refused(method, path):
    async def main() -> None:
        client = Client()
        async with Upstream(answer_each) as up:
            url = URL(str(up.url.with_path("/")).rstrip("/") + path, encoded=True)
            with pytest.raises(ValueError):
                await client.request(method, url)
            assert up.connections == 0
        await client.close()

    run(main())


@pytest.mark.parametrize("name, value", [("X A", "1"), ("Transfer_Encoding", "chunked"), ("X-A", "a\x0bb"),
                                         ("X-A", "a\x7fb")])
def test_header_names_are_tokens_and_values_have_no_control_characters(name, value):
    with pytest.raises(ValueError):
        header_lines({name: value})


def test_an_https_proxy_url_is_refused_rather_than_spoken_to_in_clear(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "https://secret:pw@proxy.example:8443")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with pytest.raises(ConfigError, match="https://"):
        Outbound().proxy_for("https://api.example.com/v1")


def test_idle_connections_past_their_keepalive_are_closed():
    async def main() -> None:
        client = Client(keepalive_s=0.1)
        ups = [Upstream(answer_each) for _ in range(5)]
        for up in ups:
            await up.__aenter__()
            assert await get(client, up.url) == BODY
        await asyncio.sleep(0.3)  # the subject: keepalive_s passes (the client reads time.monotonic, no clock)
        async with Upstream(answer_each) as last:
            assert await get(client, last.url) == BODY  # a call sweeps what has idled too long
            await eventually_async(lambda: all(up.ended == 1 for up in ups))
            assert sum(len(v) for v in client._idle.values()) == 1
        for up in ups:
            await up.__aexit__()
        await client.close()

    run(main())


def test_a_webhook_under_an_https_proxy_url_fails_as_a_connection_error(monkeypatch):
    """Budget and drift alerts record a failed delivery; the refusal never escapes their loops as a crash."""
    from keel.core.webhook import post_json_once
    monkeypatch.setenv("HTTPS_PROXY", "https://proxy.example:8443")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)

    async def main() -> None:
        with pytest.raises(ConnectFailed, match="https://"):
            await post_json_once(Outbound(), True, "https://hooks.example.com/x", {"a": 1}, timeout_s=5)

    run(main())


def test_a_webhook_is_json_with_keel_as_its_user_agent():
    from keel import __version__
    from keel.core.webhook import post_json
    heads: list[bytes] = []

    async def keep(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        await reader.readexactly(len(b'{"a":1}'))
        writer.write(ok())
        await writer.drain()

    async def main() -> None:
        async with Upstream(keep) as up:
            client = Client()
            assert await post_json(client, up.url, {"a": 1}, proxy=None, timeout_s=5) == 200
            await client.close()

    run(main())
    head = heads[0].decode().lower()
    assert "content-type: application/json\r\n" in head
    assert f"user-agent: keel/{__version__}\r\n" in head
