"""Keel's outbound HTTP/1.1 client: keep-alive pools on asyncio protocols, answers parsed by llhttp (`httptools`).

Why not aiohttp's client: it cost ~300 µs of the event loop's CPU a call against ~75 µs for this one
(`bench/README.md`, the eighth session), on the thread that bounds the gateway's throughput. What it does:
HTTP/1.1 and 1.0 answers framed by Content-Length, chunked (trailers read and dropped) or the connection's end;
interim 1xx answers skipped; gzip and deflate bodies; a head bounded while it arrives; proxies (absolute-form
through an HTTP proxy, CONNECT tunnels for HTTPS) and any `ssl.SSLContext` (CA bundle, client certificate).
It never follows redirects, keeps no cookies and has no timeouts of its own: callers bound what they await,
and a call cancelled part-way closes its connection. `tests/gateway/test_outbound_wire.py` is its conformance
suite (the one aiohttp passed).

>>> client = Client(limit=100)
>>> answer = await client.request("POST", URL("https://api.example.com/v1/chat"), headers={"X-A": "1"}, body=b"{}")
>>> data = await answer.read()
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import httptools
from yarl import URL

MAX_HEAD_BYTES = 64 * 1024  # an answer's whole head
MAX_FIELD_BYTES = 8190  # one header line (aiohttp's and nginx's default)
PAUSE_BYTES = 1 << 22  # read no more from the socket while this much of a body waits unread
MAX_BODY_BYTES = 1 << 26  # decompressed body bytes waiting unread, or read whole (`Client(max_body_bytes=)`)
INFLATE_STEP = 1 << 20  # decompress in steps of this much output, so no one step can outgrow the limit
TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 §5.6.2: a method or a header name
VALUE = re.compile(r"[^\x00-\x08\x0a-\x1f\x7f]*")  # a header value: no control character but HTAB (§5.5)
TARGET = re.compile(r"[!-~]+")  # a request target: visible ASCII, no space (RFC 9112 §3.2)
Resolver = Callable[[str, int], Awaitable[list[str]]]  # (host, port) -> the addresses to connect to, in order
Proxy = tuple[URL, str | None]  # a proxy's URL and its Proxy-Authorization value
DEFAULT_PORTS = {"http": 80, "https": 443}
METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
# Written by the client (or meaningless through it): a caller's own would frame the request, pick its connection
# or ask for a body encoding the client cannot decode.
FRAMING = frozenset({"host", "content-length", "transfer-encoding", "connection", "upgrade", "te", "trailer",
                     "proxy-authorization", "proxy-connection", "keep-alive", "accept-encoding"})
TOO_BIG = f"the answer's head is over the limit ({MAX_FIELD_BYTES} bytes a line, {MAX_HEAD_BYTES} in all)"


class WireError(Exception):
    """An outbound call failed on the wire; `detail` says how."""


class ConnectFailed(WireError):
    """No connection: refused, unreachable, a TLS handshake or certificate check failed, a proxy said no."""


class MalformedAnswer(WireError):
    """The answer is not HTTP/1.x this client reads: bad syntax, ambiguous framing, a head over the limits."""


class ConnectionLost(WireError):
    """The connection ended before the answer did."""


class Headers(dict[str, str]):
    """An answer's headers by lower-case name (a repeated one's values joined with ", ")."""

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        return super().get(key.lower(), default)

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(key.lower())

    def __contains__(self, key: object) -> bool:
        return super().__contains__(key.lower() if isinstance(key, str) else key)


def check_header(name: str, value: str) -> None:
    """Refuse a header name that is not an HTTP token, or a value with a control character (CR, LF, NUL …)."""
    if not TOKEN.fullmatch(name) or not VALUE.fullmatch(value):
        raise ValueError(f"header {name!r} has a character HTTP does not allow there")


def check_request_header(name: str, value: str) -> None:
    """`check_header`, and refuse the headers that frame the request or pick its connection: the client writes
    those itself, and a second one would let the receiver read the request differently from the sender."""
    check_header(name, value)
    if name.lower().replace("_", "-") in FRAMING:  # some proxies read "_" as "-"
        raise ValueError(f"header {name!r} is set by Keel's HTTP client and cannot be given")


def header_lines(headers: Mapping[str, str]) -> bytes:
    """`headers` as request head lines, each checked (`check_request_header`); encode once, pass as `head=`."""
    out = []
    for name, value in headers.items():
        check_request_header(name, value)
        out.append(f"{name}: {value}\r\n")
    try:
        return "".join(out).encode("latin-1")
    except UnicodeEncodeError as exc:
        raise ValueError(f"a header has a character outside Latin-1 ({exc.object[exc.start:exc.end]!r})") from None


class Response:
    """One answer: `status`, `headers`, and its body by `read()` (whole) or `read_some()` (as it arrives, b""
    at the end). Once the whole body has arrived the connection goes back to its pool by itself; `close()`
    ends a body not read to its end (the connection is closed, never reused)."""

    def __init__(self, conn: _Conn, status: int, headers: Headers, max_bytes: int) -> None:
        self.status, self.headers = status, headers
        self._max = max_bytes
        self._conn: _Conn | None = conn
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: WireError | None = None
        self.at_eof = False
        self._fed = False
        encoding = headers.get("content-encoding", "").strip().lower()
        self._decoder: Any = None
        if encoding == "gzip" or encoding == "x-gzip":
            self._decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            self._decoder = "deflate"  # zlib-wrapped or raw: chosen by the first byte
        elif encoding not in ("", "identity"):
            raise MalformedAnswer(f"the answer's Content-Encoding {encoding!r} is not one this client asked for")

    def _feed(self, data: bytes) -> None:
        if not data:
            return
        self._fed = True
        if self._decoder is None:
            return self._keep(data)
        try:
            if self._decoder == "deflate":
                self._decoder = zlib.decompressobj(zlib.MAX_WBITS if data[0] & 0x0F == 8 else -zlib.MAX_WBITS)
            while data and self._error is None:
                out = self._decoder.decompress(data, INFLATE_STEP)
                data = self._decoder.unconsumed_tail
                if self._decoder.eof and self._decoder.unused_data:
                    raise zlib.error("bytes after the compressed stream's end")
                if out:
                    self._keep(out)
        except zlib.error as exc:
            self._fail(MalformedAnswer(f"the body cannot be decompressed ({exc})"))

    def _keep(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > self._max:
            return self._fail(MalformedAnswer(f"the body is over {self._max} bytes"))
        if self._buffered > PAUSE_BYTES and self._conn is not None:
            self._conn.pause()
        self._wake()

    def _end(self) -> None:
        if self._error is not None:
            return
        if self._fed and self._decoder is not None:  # an empty body (HEAD, 204, 304) marked compressed is empty
            try:
                if tail := self._decoder.flush():
                    self._chunks.append(tail)
                if not self._decoder.eof:
                    return self._fail(MalformedAnswer("the compressed body ends early"))
            except zlib.error as exc:
                return self._fail(MalformedAnswer(f"the body cannot be decompressed ({exc})"))
        self.at_eof = True
        self._conn = None
        self._wake()

    def _fail(self, error: WireError) -> None:
        if self.at_eof or self._error is not None:
            return
        self._error = error
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def read_some(self) -> bytes:
        """The body's bytes that have arrived since the last read (decompressed); b"" once it has all been read."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self.at_eof:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        # All that has arrived, as one: a consumer (an SSE relay) handles a burst in one step, not one per packet.
        data = self._chunks.popleft() if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        if self._conn is not None and self._buffered < PAUSE_BYTES // 2:
            self._conn.resume()
        return data

    async def read(self, limit: int | None = None) -> bytes:
        """The whole body; with `limit`, a `MalformedAnswer` once it passes that many bytes (and the rest is
        not read). Cancelled or failed part-way, it closes the connection."""
        parts, size = [], 0
        limit = self._max if limit is None else min(limit, self._max)
        try:
            while chunk := await self.read_some():
                size += len(chunk)
                if size > limit:
                    raise MalformedAnswer(f"the body is over {limit} bytes")
                parts.append(chunk)
        except BaseException:
            self.close()
            raise
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        """Stop reading: a body not yet whole closes its connection."""
        if not self.at_eof:
            self._fail(ConnectionLost("closed before the body's end"))


class _Conn(asyncio.Protocol):
    """One connection and the llhttp parser of the answers on it; at most one request at a time."""

    def __init__(self, pool: Client, key: tuple[Any, ...]) -> None:
        self.pool, self.key = pool, key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.head: asyncio.Future[Response] | None = None
        self.response: Response | None = None
        self.lost = False
        self.paused = False
        self.head_only = False
        self.slot = False  # holds one of the client's `limit` slots until its answer's body ends
        self._begin()

    def _begin(self) -> None:
        self.head_size, self.header_bytes, self.headers, self.interim = 0, 0, Headers(), False
        self.wire = self.body = 0  # bytes of this answer received, and of its body: the rest is framing
        self.framed = False  # Content-Length or chunked: the body does not end with the connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, data: bytes, head_only: bool) -> asyncio.Future[Response]:
        if self.lost or self.transport is None:
            raise ConnectionLost("the connection closed while idle")
        self.head = asyncio.get_running_loop().create_future()
        self.head_only = head_only
        self.transport.write(data)
        return self.head

    def data_received(self, data: bytes) -> None:
        if self.head is None and self.response is None:
            return self.close()  # bytes nobody asked for: the connection is not fit to reuse
        if self.head is not None:
            self.head_size += len(data)
        else:  # chunk lines and trailers are bounded by the body they frame, plus a head's worth
            self.wire += len(data)
            if self.wire - 2 * self.body > 2 * MAX_HEAD_BYTES:
                return self._error(MalformedAnswer("the answer's chunk framing or trailers are over the limit"))
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._error(MalformedAnswer("the answer switches protocols"))
        except httptools.HttpParserError as exc:
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, WireError):
                self._error(cause)
            else:
                self._error(MalformedAnswer(f"the answer is not valid HTTP/1.1 ({exc})"))
        else:
            if self.head is not None and self.head_size > MAX_HEAD_BYTES:  # a head still arriving
                self._error(MalformedAnswer(TOO_BIG))

    def on_message_begin(self) -> None:
        if self.head is None:  # bytes after an answer's end that begin another: nobody asked for it (RFC 9112 §9.2)
            raise MalformedAnswer("the upstream sent an answer to no request")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.head is None:
            return  # a chunked body's trailers
        self.header_bytes += len(name) + len(value) + 4
        if len(name) + len(value) > MAX_FIELD_BYTES or self.header_bytes > MAX_HEAD_BYTES:
            raise MalformedAnswer(TOO_BIG)
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        if key in ("content-length", "transfer-encoding"):
            self.framed = True
        self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            self.interim = True  # 100 Continue, 103 Early Hints …: the real answer follows
            return
        if self.head is None:  # bytes after the answer's end, or an answer nobody asked for: never reused
            raise MalformedAnswer("the upstream sent an answer to no request")
        # First: an unknown encoding raises here and so fails the call that waits for this head.
        response = Response(self, status, self.headers, self.pool.max_body_bytes)
        head, self.head = self.head, None
        self.response = response
        if status in (204, 304):
            self.framed = True
        if not head.done():
            head.set_result(response)
        if self.head_only:  # the answer to HEAD has no body whatever its head says: end it, do not reuse
            self.response = None
            response._end()
            self.close()

    def on_body(self, body: bytes) -> None:
        self.body += len(body)
        if self.response is not None and not self.interim:
            self.response._feed(body)

    def on_message_complete(self) -> None:
        if self.interim:
            self._begin()
            return
        response, self.response = self.response, None
        # Reused only if the upstream keeps it and all of this request went out: an answer that came early (413)
        # leaves the body's rest unsent, which the upstream would read as the next request's start (§9.5).
        keep = self.parser.should_keep_alive() and self.transport is not None \
            and not self.transport.get_write_buffer_size()
        self._begin()
        if response is not None:
            response._end()
        if keep and not self.lost:
            self.pool._put(self)
        else:
            self.close()

    def _error(self, error: WireError) -> None:
        head, self.head = self.head, None
        if head is not None and not head.done():
            head.set_exception(error)
        response, self.response = self.response, None
        if response is not None:
            response._fail(error)
        self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.pool._gone(self)
        response = self.response
        if response is not None and self.head is None and not self.framed:
            self.response = None  # a body that ends with the connection (HTTP/1.0, or no length given)
            return response._end()
        reason = f" ({exc})" if exc else ""
        self._error(ConnectionLost(f"the connection closed before the answer's end{reason}"))

    def pause(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None and not self.lost:
            self.paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        self.head = self.response = None  # what was waiting on this connection has been told, or gave up
        if self.transport is not None:
            self.transport.close()
        self.lost = True
        self.pool._gone(self)


class _Tunnel(asyncio.Protocol):
    """The proxy's answer to CONNECT, read with llhttp; the TLS session then starts on the same socket."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.size = 0

    def data_received(self, data: bytes) -> None:
        self.size += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if not self.status.done():
                self.status.set_exception(ConnectFailed(f"the proxy's answer to CONNECT is not HTTP ({exc})"))
        if self.size > MAX_HEAD_BYTES and not self.status.done():
            self.status.set_exception(ConnectFailed("the proxy's answer to CONNECT is too long"))

    def on_headers_complete(self) -> None:
        if not self.status.done():
            self.status.set_result(self.parser.get_status_code())

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.status.done():
            self.status.set_exception(ConnectFailed("the proxy closed the connection during CONNECT"))


def _authority(url: URL) -> str:
    host = url.raw_host or ""
    if ":" in host:
        host = f"[{host}]"
    return host if url.port == DEFAULT_PORTS.get(url.scheme) else f"{host}:{url.port}"


class Client:
    """A keep-alive pool per origin (and proxy), `limit` connections in use at most.

    `tls`: the context for HTTPS (`True`: the system's trust store); `resolver`: where to connect for a host
    (workflow egress checks the addresses it returns; default: the system's resolver). Use it inside one
    event loop; `close()` ends every idle connection."""

    def __init__(self, *, tls: ssl.SSLContext | bool = True, limit: int = 100, keepalive_s: float = 30.0,
                 resolver: Resolver | None = None, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self._tls = tls
        self.max_body_bytes = max_body_bytes
        self._swept = time.monotonic()
        self._slots = asyncio.Semaphore(limit)
        self.keepalive_s = keepalive_s
        self.resolver = resolver
        self._idle: dict[tuple[Any, ...], list[tuple[_Conn, float]]] = {}
        self._open: set[_Conn] = set()
        self.closed = False

    def _context(self) -> ssl.SSLContext:
        if self._tls is True:
            self._tls = ssl.create_default_context()
        assert isinstance(self._tls, ssl.SSLContext)
        return self._tls

    async def request(self, method: str, url: URL, *, head: bytes = b"", headers: Mapping[str, str] | None = None,
                      body: bytes = b"", proxy: Proxy | None = None) -> Response:
        """Send one request and return its answer once the head has arrived. `head`: header lines already
        encoded (`header_lines`); `headers`: more, checked here. Host, Content-Length and Accept-Encoding are
        added. Raises a `WireError`, or `ValueError` for a header or URL that cannot be sent."""
        if self.closed:
            raise ConnectionLost("the client was closed")
        if url.scheme not in DEFAULT_PORTS or not url.raw_host:
            raise ValueError(f"{url.scheme or 'a relative'} URL cannot be fetched: give an absolute http(s) URL")
        if method not in METHODS and not TOKEN.fullmatch(method):
            raise ValueError(f"{method[:40]!r} is not an HTTP method")
        absolute = proxy is not None and url.scheme == "http"
        target = str(url.with_fragment(None).with_user(None)) if absolute else (url.raw_path_qs or "/")
        if not TARGET.fullmatch(target):
            raise ValueError(f"the request target {target[:80]!r} has a space or a character HTTP does not allow")
        lines = [f"{method} {target} HTTP/1.1\r\nHost: {_authority(url)}\r\n".encode("latin-1"), head]
        if headers:
            lines.append(header_lines(headers))
        if absolute and proxy is not None and proxy[1]:
            lines.append(b"Proxy-Authorization: %s\r\n" % proxy[1].encode("latin-1"))
        if body or method in ("POST", "PUT", "PATCH"):
            lines.append(b"Content-Length: %d\r\n" % len(body))
        lines.append(b"Accept-Encoding: gzip, deflate\r\n\r\n")
        lines.append(body)
        data = b"".join(lines)
        key = (url.scheme, url.raw_host, url.port, proxy[0] if proxy else None)
        await self._slots.acquire()
        conn = None
        try:
            conn = self._take(key) or await self._connect(key, url, proxy)
            response = await conn.send(data, method == "HEAD")
        except BaseException:
            if conn is not None:
                conn.close()
            self._slots.release()
            raise
        self._hold(response)
        return response

    def _hold(self, response: Response) -> None:
        """The slot is given back when the answer's body ends, whichever way."""
        if response._conn is None:
            self._slots.release()
        else:
            response._conn.slot = True

    def _take(self, key: tuple[Any, ...]) -> _Conn | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn, since = idle.pop()
            if not conn.lost and now - since < self.keepalive_s:
                return conn
            conn.close()
        return None

    def _put(self, conn: _Conn) -> None:
        self._release_slot(conn)
        if self.closed:
            return conn.close()
        now = time.monotonic()
        if now - self._swept > self.keepalive_s:
            self._sweep(now)
        self._idle.setdefault(conn.key, []).append((conn, now))

    def _sweep(self, now: float) -> None:
        """Close the idle connections kept past `keepalive_s`, forget the closed ones."""
        self._swept = now
        for key, conns in list(self._idle.items()):
            kept = []
            for conn, since in conns:
                if conn.lost or now - since >= self.keepalive_s:
                    conn.close()
                else:
                    kept.append((conn, since))
            if kept:
                self._idle[key] = kept
            else:
                del self._idle[key]

    def _gone(self, conn: _Conn) -> None:
        self._release_slot(conn)
        self._open.discard(conn)

    def _release_slot(self, conn: _Conn) -> None:
        if conn.slot:
            conn.slot = False
            self._slots.release()

    async def _connect(self, key: tuple[Any, ...], url: URL, proxy: Proxy | None) -> _Conn:
        loop = asyncio.get_running_loop()
        host, port = url.raw_host or "", url.port or DEFAULT_PORTS[url.scheme]
        tls = self._context() if url.scheme == "https" else None
        if proxy is not None and proxy[0].scheme != "http":
            raise ValueError(f"a {proxy[0].scheme}:// proxy cannot be used: Keel speaks to proxies over http://")
        try:
            if proxy is None:
                addresses = await self.resolver(host, port) if self.resolver is not None else [host]
                error: OSError | None = None
                for address in addresses:
                    try:
                        _, conn = await loop.create_connection(lambda: _Conn(self, key), address, port, ssl=tls,
                                                               server_hostname=host if tls else None)
                        break
                    except OSError as exc:
                        error = exc
                else:
                    raise error or OSError(f"no address for {host}")
            elif tls is None:
                _, conn = await loop.create_connection(lambda: _Conn(self, key), proxy[0].raw_host,
                                                       proxy[0].port or 80)
            else:
                conn = await self._tunnel(key, host, port, proxy, tls)
        except WireError:
            raise
        except (OSError, ssl.SSLError) as exc:
            where = f"proxy {proxy[0].raw_host}:{proxy[0].port}" if proxy else f"{host}:{port}"
            raise ConnectFailed(f"cannot connect to {where}: {exc}") from None
        self._open.add(conn)
        return conn

    async def _tunnel(self, key: tuple[Any, ...], host: str, port: int, proxy: Proxy, tls: ssl.SSLContext) -> _Conn:
        loop = asyncio.get_running_loop()
        transport, tunnel = await loop.create_connection(_Tunnel, proxy[0].raw_host, proxy[0].port or 80)
        try:
            authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            auth = b"Proxy-Authorization: %s\r\n" % proxy[1].encode("latin-1") if proxy[1] else b""
            target = authority.encode()
            transport.write(b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (target, target, auth))
            status = await tunnel.status
            if status != 200:
                raise ConnectFailed(f"the proxy answered {status} to CONNECT {authority}")
            conn = _Conn(self, key)
            secure = await loop.start_tls(transport, conn, tls, server_hostname=host)
            if secure is None:
                raise ConnectFailed("the TLS session through the proxy could not start")
            conn.connection_made(secure)
            return conn
        except BaseException:
            transport.close()
            raise

    async def close(self) -> None:
        """Close every connection, idle or in use (calls in flight end with `ConnectionLost`); the client takes
        no more requests after it."""
        self.closed = True
        for conns in self._idle.values():
            for conn, _ in conns:
                conn.close()
        self._idle.clear()
        for conn in list(self._open):
            conn._error(ConnectionLost("the client was closed"))
