"""Fakes served over TLS, and the loopback proxy in a thread of its own, for tests that drive a Keel server
process (its upstream traffic must cross a real TLS handshake, and a real proxy, to be checked).

>>> with TLSFakeOpenAI(tls=pki.server_context(require_client_cert=True)) as fake:   # fake.url is https://…
...     with ThreadedProxy() as proxy:                                                # proxy.url, proxy.heads
...         ...
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from typing import Any

from aiohttp import web

from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.proxy import LoopbackProxy


class TLSFakeOpenAI(FakeOpenAI):
    """The OpenAI fake behind TLS (`tls`: a server context, e.g. `PKI.server_context()`), answering on `host`
    (127.0.0.1 or localhost: both are in the test certificate). `client_certs` holds each request's client
    certificate subject (None without one); `refuse_with` makes every request a 401 whose message echoes
    the request's headers, as careless upstreams do, so a test can check that Keel scrubs its secrets."""

    def __init__(self, *, tls: ssl.SSLContext, host: str = "127.0.0.1", **kw: Any) -> None:
        super().__init__(**kw)
        self.tls, self.host = tls, host
        self.client_certs: list[Any] = []
        self.refuse_with = False

    def check_auth(self, request: web.Request) -> web.Response | None:
        cert = request.transport.get_extra_info("peercert") if request.transport else None
        self.client_certs.append(dict(x[0] for x in cert["subject"]) if cert else None)
        if self.refuse_with:
            return self.error_response(401, f"refused; you sent {dict(request.headers)}")
        return super().check_auth(request)

    async def serve(self, sock: socket.socket) -> None:
        self._stopping = asyncio.Event()
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_post("/_reset", self._reset)
        self.routes(app.router)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.SockSite(self._runner, sock, ssl_context=self.tls).start()
        port = sock.getsockname()[1]
        self.root = f"https://{self.host}:{port}"
        self.url = self.root + self.base_path


class ThreadedProxy:
    """`tests.fakes.proxy.LoopbackProxy` served from a background thread, for a test that is not async."""

    def __init__(self) -> None:
        self.proxy = LoopbackProxy()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="proxy", daemon=True)

    @property
    def url(self) -> str:
        return self.proxy.url

    @property
    def heads(self) -> list[bytes]:
        return list(self.proxy.heads)

    def request_lines(self) -> list[str]:
        return self.proxy.request_lines()

    def __enter__(self) -> ThreadedProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.proxy.__aenter__(), self._loop).result(10)
        return self

    async def _close(self) -> None:
        """Stop listening, then end the tunnels still open (a client's keep-alive connections)."""
        await self.proxy.__aexit__(None, None, None)
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
