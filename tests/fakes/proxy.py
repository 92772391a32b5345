"""A tiny loopback HTTP proxy for tests, run in the test's event loop: `CONNECT host:port` tunnels (HTTPS
through a proxy) and absolute-form requests forwarded to their origin (plain HTTP through a proxy). It
records each head it was asked, so a test can tell whether a client went through it, and how.

A forwarded connection stays bound to the first request's origin (enough for one upstream per test).

>>> async with LoopbackProxy() as proxy:
...     os.environ["HTTPS_PROXY"] = proxy.url
...     ...
...     assert proxy.heads[0].startswith(b"CONNECT 127.0.0.1:")
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


class LoopbackProxy:
    """An HTTP/1.1 proxy on 127.0.0.1; `heads` holds each request head it received (request line and headers)."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> LoopbackProxy:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    def request_lines(self) -> list[str]:
        return [head.split(b"\r\n", 1)[0].decode("latin-1") for head in self.heads]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        self.heads.append(head)
        line, rest = head.split(b"\r\n", 1)
        method, target, version = line.decode("latin-1").split(" ")
        try:
            if method == "CONNECT":
                host, port = target.rsplit(":", 1)
                up_reader, up_writer = await asyncio.open_connection(host.strip("[]"), int(port))
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                url = urlsplit(target)
                up_reader, up_writer = await asyncio.open_connection(url.hostname, url.port or 80)
                path = (url.path or "/") + (f"?{url.query}" if url.query else "")
                up_writer.write(f"{method} {path} {version}\r\n".encode("latin-1") + rest)
        except OSError:
            writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
