"""The request edge in plain ASGI: what RFC 9112 asks of a server and the HTTP server leaves to the app.

Runs outermost, before the request id, any endpoint or auth: a head over `max_header_bytes` or
`max_headers` answers 431, an HTTP/1.1 request without exactly one `Host` answers 400, and both close the
connection. An `Upgrade` request (Keel accepts none) is answered as an ordinary one and then the connection
closes, so a proxy that tunnels what follows an upgrade can never have those bytes served as requests. So does a
request with a chunked body: the HTTP server reads a trailer line on to the next CRLF (a bare LF inside it
included), so the bytes after a last chunk can be trailers to it and the next request to a proxy that ends lines
at an LF; closing, none of them is ever read as a request. An error after an answer went out whole ends that
request only: the connection goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from keel.core.errors import BadRequest, HeadersTooLarge, InternalError, KeelError

log = logging.getLogger("keel.http")
PROBLEM = b"application/problem+json"
CLOSE = (b"connection", b"close")


class Edge:
    """Pure ASGI middleware holding the edge's rules (see the module docstring)."""

    def __init__(self, app: ASGIApp, max_header_bytes: int, max_headers: int,
                 on_started: Callable[[], None] | None = None) -> None:
        self.app = app
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers
        self.on_started = on_started  # called once the app's startup hooks have all run

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, self._lifespan_send(send) if scope["type"] == "lifespan" else send)
            return
        refusal = self.refusal(scope)
        if refusal is not None:
            await _answer(refusal, send)
            return
        close = False
        for name, _ in scope["headers"]:
            if name == b"upgrade" or name == b"transfer-encoding":
                close = True
                break
        state = {"started": False, "complete": False, "status": 0}

        async def edge_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["started"], state["status"] = True, message["status"]
                if close:
                    message["headers"] = [*message.get("headers", ()), CLOSE]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                state["complete"] = True
            await send(message)

        try:
            await self.app(scope, receive, edge_send)
        except Exception as exc:
            if state["complete"]:
                # The client has its whole answer; only a 500 the framework wrote was logged where it was written.
                if state["status"] != 500:
                    log.error("error after the answer was sent", exc_info=exc)
                return
            if state["started"]:
                raise  # half an answer cannot be ended cleanly: the server aborts the connection
            log.error("unhandled error", exc_info=exc)
            await _answer(InternalError("Keel hit an internal error; the request id is in the log",
                                        fix="retry; if it persists, report the request id"), send)

    def _lifespan_send(self, send: Send) -> Send:
        async def lifespan_send(message: Message) -> None:
            await send(message)
            if message["type"] == "lifespan.startup.complete" and self.on_started is not None:
                self.on_started()

        return lifespan_send

    def refusal(self, scope: Scope) -> KeelError | None:
        """The error a request's head earns before anything else runs, or None."""
        headers = scope["headers"]
        size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
        hosts = 0
        host = b""
        for name, value in headers:
            size += len(name) + len(value) + 4
            if name == b"host":
                hosts += 1
                host = value
        if len(headers) > self.max_headers or size > self.max_header_bytes:
            return HeadersTooLarge(f"the request's headers are over the limit of {self.max_header_bytes} bytes or "
                                   f"{self.max_headers} fields", fix="send fewer or smaller headers, or raise "
                                   "KEEL_MAX_HEADER_BYTES / KEEL_MAX_HEADERS")
        # An empty Host names no http URI (RFC 9110, 4.2.1); the server may also stand one in for a missing one.
        if hosts > 1 or (not host and scope.get("http_version") == "1.1"):
            return BadRequest("an HTTP/1.1 request needs exactly one Host header, not empty (RFC 9112, section 3.2)",
                              fix="send one Host header naming this server")
        return None


async def _answer(err: KeelError, send: Send) -> None:
    """A problem answer that ends the connection."""
    body = orjson.dumps(err.to_problem())
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", PROBLEM), (b"content-length", b"%d" % len(body)), CLOSE]})
    await send({"type": "http.response.body", "body": body})
