"""The upstream HTTP/1.1 client against real loopback servers that answer byte for byte as scripted:
keep-alive reuse, body framings (length, chunked, until close), interim 1xx answers, early closes and
garbage, connection limits, flow control on big bodies, cancellation, TLS, and header injection."""

from __future__ import annotations

import asyncio
import datetime
import ssl
from collections.abc import Awaitable, Callable

import pytest

from keel.gateway.providers import http1

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request's head and body (Content-Length framed); b"" when the client went away."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return b""
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    return head + await reader.readexactly(length)


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


class Server:
    """A loopback server running `handler` per connection; counts connections."""

    def __init__(self, handler: Handler, tls: ssl.SSLContext | None = None) -> None:
        self.handler, self.tls = handler, tls
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Server:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=self.tls)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def origin(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{port}"


async def echo_forever(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while request := await read_request(reader):
        writer.write(ok(request.split(b"\r\n\r\n", 1)[1]))
        await writer.drain()


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 30))  # type: ignore[arg-type]


def test_keep_alive_reuses_one_connection_and_sends_the_body():
    async def main() -> None:
        async with Server(echo_forever) as srv:
            client = http1.Client(srv.origin)
            for i in range(20):
                resp = await client.post("/v1/x?y=1", b'{"n": %d}' % i, b"Content-Type: application/json\r\n")
                assert resp.status == 200 and resp.headers["content-length"] == str(len(b'{"n": %d}' % i))
                assert await resp.read() == b'{"n": %d}' % i
            assert srv.connections == 1 and client.open == 1
            await client.close()

    run(main())


def test_request_head_carries_host_target_and_length():
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await read_request(reader))
        writer.write(ok(b"{}"))

    async def main() -> None:
        async with Server(handler) as srv:
            client = http1.Client(srv.origin)
            await (await client.post("/v1/chat/completions", b"abc", http1.header_block({"X-A": "1"}))).read()
            port = srv.origin.rsplit(":", 1)[1]
            assert seen[0] == (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%s\r\nX-A: 1\r\n"
                               b"Content-Length: 3\r\n\r\nabc" % port.encode())

    run(main())


@pytest.mark.parametrize("answer, body", [
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", b"hello world"),
    (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end", b"until the end"),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok", b"ok"),
    (b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 3\r\nretry-after: 4\r\nContent-Length: 4\r\n\r\nslow", b"slow"),
])
def test_body_framings_and_interim_answers(answer, body):
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        for i in range(0, len(answer), 7):  # in small pieces, as a slow network would deliver it
            writer.write(answer[i:i + 7])
            await writer.drain()
            await asyncio.sleep(0)

    async def main() -> None:
        async with Server(handler) as srv:
            resp = await http1.Client(srv.origin).post("/", b"", b"")
            assert await resp.read() == body
            assert resp.status in (200, 201, 429)
            if resp.status == 429:
                assert resp.headers["retry-after"] == "3, 4"

    run(main())


# One keep-alive connection answering, in turn, heads the whole-answer path takes and ones it leaves to
# llhttp (chunked, 1xx first, no reason phrase, 204, pieces): each must read the same either way.
MIXED = [
    (ok(b"first", b"X-Twice: a\r\nx-twice: b\r\n"), 200, b"first", {"x-twice": "a, b"}),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", 200, b"abc", {}),
    (b"HTTP/1.1 503\r\ncontent-length:4\r\nRetry-After:\t7\r\n\r\nbusy", 503, b"busy", {"retry-after": "7"}),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok", 201, b"ok", {}),
    (b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n", 204, b"", {}),
    (ok(b""), 200, b"", {"content-length": "0"}),
    (ok(b"in pieces"), 200, b"in pieces", {}),
    (ok(b"last"), 200, b"last", {}),
]


def test_whole_answers_and_llhttp_answers_alternate_on_one_connection():
    async def scripted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for answer, *_ in MIXED:
            await read_request(reader)
            if answer == ok(b"in pieces"):
                for i in range(0, len(answer), 5):
                    writer.write(answer[i:i + 5])
                    await writer.drain()
                    await asyncio.sleep(0.005)
            else:
                writer.write(answer)
                await writer.drain()
        await read_request(reader)

    async def main() -> None:
        async with Server(scripted) as srv:
            client = http1.Client(srv.origin)
            for _, status, body, headers in MIXED:
                resp = await client.post("/", b"q", b"")
                assert (resp.status, await resp.read()) == (status, body)
                assert headers.items() <= resp.headers.items()
            assert srv.connections == 1

    run(main())


@pytest.mark.parametrize("answer", [
    ok(b"bye", b"Connection: close\r\n"),
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: Keep-Alive, Close\r\n\r\nbye",
])
def test_a_whole_answer_that_says_close_is_not_reused(answer):
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader):
            writer.write(answer)
            await writer.drain()

    async def main() -> None:
        async with Server(handler) as srv:
            client = http1.Client(srv.origin)
            for _ in range(3):
                assert await (await client.post("/", b"", b"")).read() == b"bye"
            assert srv.connections == 3

    run(main())


def test_a_whole_answer_in_one_read_skips_llhttp():
    conn = http1._Connection(http1.Client("http://127.0.0.1:9"))
    conn.response = resp = http1.Response(conn)
    conn.data_received(ok(b'{"a": 1}', b"Content-Type: application/json\r\n"))
    assert not conn._fed  # llhttp never saw it
    assert (resp.status, resp._done, resp._keep, resp._chunks) == (200, True, True, [b'{"a": 1}'])
    assert resp.headers == {"content-length": "8", "content-type": "application/json"}
    conn.response = resp = http1.Response(conn)
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\n{")  # the rest comes later
    assert conn._fed and resp.status == 200 and not resp._done
    conn.data_received(b'"a": 1}')
    assert resp._done and resp._chunks == [b"{", b'"a": 1}']


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcHTTP/1.1 200 OK\r\n",
])
def test_ambiguous_framing_is_left_to_llhttp(answer):
    """Two lengths, a length with chunked, or bytes after the body: never read as a whole answer here."""
    conn = http1._Connection(http1.Client("http://127.0.0.1:9"))
    conn.response = http1.Response(conn)
    assert conn._whole(conn.response, answer) is False


@pytest.mark.parametrize("answer, message", [
    (b"", "without answering"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial", "before its answer ended"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", "before its answer ended"),
    (b"SMTP ready\r\n\r\n", "malformed HTTP response"),
    (b"HTTP/1.1 200 OK\r\nX-Folded: a\r\n b\r\nContent-Length: 3\r\n\r\nfld", "malformed HTTP response"),
])
def test_early_closes_and_garbage_are_protocol_errors(answer, message):
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer)
        await writer.drain()

    async def main() -> None:
        async with Server(handler) as srv:
            client = http1.Client(srv.origin)
            with pytest.raises(http1.RemoteProtocolError, match=message):
                resp = await client.post("/", b"x", b"")
                await resp.read()
            assert client.open == 0

    run(main())


def test_unreachable_upstream_is_a_connect_error():
    async def main() -> None:
        async with Server(echo_forever) as srv:
            origin = srv.origin
        with pytest.raises(http1.ConnectError, match="cannot connect to 127.0.0.1"):
            await http1.Client(origin).post("/", b"", b"")

    run(main())


def test_a_connection_the_server_closed_while_idle_is_not_reused():
    async def one_and_done(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(ok(b"once"))  # keep-alive by the headers, but the server hangs up after it
        await writer.drain()

    async def main() -> None:
        async with Server(one_and_done) as srv:
            client = http1.Client(srv.origin)
            for _ in range(3):
                assert await (await client.post("/", b"", b"")).read() == b"once"
                await asyncio.sleep(0.05)  # the close arrives while the connection is idle
            assert srv.connections == 3

    run(main())


def test_connection_limit_queues_requests():
    busy = 0
    most = 0

    async def slow_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal busy, most
        while request := await read_request(reader):
            busy += 1
            most = max(most, busy)
            await asyncio.sleep(0.02)
            busy -= 1
            writer.write(ok(request.split(b"\r\n\r\n", 1)[1]))
            await writer.drain()

    async def main() -> None:
        async with Server(slow_echo) as srv:
            client = http1.Client(srv.origin, limit=2)

            async def one(i: int) -> bytes:
                return await (await client.post("/", str(i).encode(), b"")).read()

            assert await asyncio.gather(*(one(i) for i in range(10))) == [str(i).encode() for i in range(10)]
            assert srv.connections == 2 and most == 2

    run(main())


def test_a_big_body_streams_through_flow_control():
    size = 8 * 2**20

    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        for _ in range(size // 65536):
            writer.write(b"x" * 65536)
            await writer.drain()

    async def main() -> None:
        async with Server(big) as srv:
            resp = await http1.Client(srv.origin).post("/", b"", b"")
            got = 0
            while chunk := await resp.readany():
                got += len(chunk)
                await asyncio.sleep(0.001)  # a slow consumer: reading pauses and resumes
            assert got == size

    run(main())


def test_a_silent_upstream_times_out_by_the_callers_bound_and_the_connection_is_dropped():
    async def stalls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        await asyncio.sleep(10)

    async def main() -> None:
        async with Server(stalls) as srv:
            client = http1.Client(srv.origin)
            resp = await client.post("/", b"", b"")
            resp.idle_timeout = 0.2
            assert await resp.readany() == b"first"
            with pytest.raises(TimeoutError):
                await resp.readany()
            assert client.open == 0

    run(main())


def test_header_injection_is_refused():
    with pytest.raises(ValueError, match="not allow"):
        http1.header_block({"X-Evil": "a\r\nHost: elsewhere"})
    with pytest.raises(ValueError, match="not allow"):
        http1.header_block({"Bad:Name": "x"})


def _self_signed(tmp_path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context trusting it) for a fresh self-signed certificate for 127.0.0.1."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_file, key_file)
    client = ssl.create_default_context(cafile=str(cert_file))
    return server, client


def test_tls_verifies_the_certificate(tmp_path):
    server_ctx, trusting = _self_signed(tmp_path)

    async def main() -> None:
        async with Server(echo_forever, tls=server_ctx) as srv:
            client = http1.Client(srv.origin, ssl_context=trusting)
            assert await (await client.post("/", b"secret", b"")).read() == b"secret"
            with pytest.raises(http1.ConnectError, match="certificate"):
                await http1.Client(srv.origin).post("/", b"", b"")  # the system's trust store: refused

    run(main())


def test_a_configured_url_becomes_a_valid_request_target():
    from keel.core.settings import DeploymentConfig
    from keel.gateway.protocol import ProviderContext
    from keel.gateway.providers.openai_compatible import OpenAICompatibleProvider

    prov = OpenAICompatibleProvider(DeploymentConfig(alias="a", provider="openai_compatible", model="m",
                                                     base_url="http://h:1/v1/ü x"), ProviderContext(get_secret=dict().get))
    assert prov._target(prov.base_url + "/chat/completions") == "/v1/%C3%BC%20x/chat/completions"
    assert prov._target("http://h/openai?api-version=2024-02-01&a=b c") == "/openai?api-version=2024-02-01&a=b%20c"
