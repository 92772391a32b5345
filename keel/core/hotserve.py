"""The server's HTTP/1.1 protocol: uvicorn's httptools protocol, with the hot endpoints (chat completions,
embeddings) served without the ASGI request cycle.

Measured on the gateway's path at concurrency 1 (`bench/gateway.py`), uvicorn's cycle — scope, receive
and send messages, per-message header checks, a second write for the body — and the middleware around
it cost about a quarter of what Keel adds to a call. A request qualifies when it is `POST` to a hot
path with a `Content-Length` body within the limit, no `Expect`, no upgrade, and nothing ahead of it
on the connection; the endpoint then gets the whole body at once and its answer leaves in one write.
Every other request (chunked bodies, pipelined ones, query strings, other routes) takes uvicorn's
path unchanged, where `RequestContext` serves the same endpoints: the two paths answer alike.

A qualifying request that arrives whole in one read, between messages, is taken apart here (`_whole`)
without llhttp's Python callback per header; anything the strict pattern does not accept goes to llhttp,
and so does everything after a request that llhttp would not follow with another (`Connection: close`).

The edge's limits live here too: a head over `max_header_bytes` or `max_headers` is answered 431 and the
connection closes, before any endpoint or auth runs (uvicorn's httptools protocol has no such limit). An
`Upgrade` request is answered as an ordinary one and then the connection closes: llhttp reads whatever
follows it as another protocol, so no byte after it may ever be served as a request (request smuggling).
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

import orjson
from starlette.requests import Request as StarletteRequest
from starlette.responses import Response
from uvicorn.protocols.http.httptools_impl import HEADER_RE, HEADER_VALUE_RE, STATUS_LINE, HttpToolsProtocol

from keel.core.errors import HeadersTooLarge
from keel.core.http import PROBLEM, SEND_NOW, HotEndpoint, RequestContext, StreamedResponse

log = logging.getLogger("keel.http")

# A hot request's head as `_whole` takes it: `POST`, an origin-form target without a query, HTTP/1.1,
# header lines whose names are tokens and whose values hold no control character but tab.
_REQUEST = re.compile(rb"POST (/[!-~]*) HTTP/1\.1(?:\r\n[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t -~\x80-\xff]*)*")
_NOT_WHOLE = frozenset({b"transfer-encoding", b"expect", b"upgrade"})


class _Hot:
    """One request on the hot path, in the shape uvicorn's protocol reads off `cycle` (it marks a lost
    connection through `disconnected` and `message_event.set()`, and a draining server through
    `keep_alive`)."""

    __slots__ = ("body", "disconnected", "endpoint", "ids", "keep_alive", "response_complete", "scope", "sent",
                 "streaming", "task")

    def __init__(self, endpoint: HotEndpoint, scope: dict[str, Any], keep_alive: bool) -> None:
        self.endpoint = endpoint
        self.scope = scope
        self.keep_alive = keep_alive
        self.body: list[bytes] = []
        self.disconnected = False
        self.response_complete = False
        self.streaming = False
        self.task: asyncio.Task[None] | None = None
        self.ids: list[tuple[bytes, bytes]] = []  # `x-request-id` and the client's `x-client-request-id`
        self.sent: Response | None = None  # an answer written before the endpoint returned (`SEND_NOW`)

    @property
    def message_event(self) -> _Hot:
        return self

    def set(self) -> None:
        """The connection is gone: a stream stops at once (its cleanup meters it as cancelled); a plain
        call runs to its end, so its row and settlement are written, and its answer is dropped."""
        if self.streaming and not self.response_complete and self.task is not None:
            self.task.cancel()


class HotProtocol(HttpToolsProtocol):
    """`context` (set by `protocol_for`) holds the hot endpoints, the body limit and the access log;
    `max_header_bytes` and `max_headers` bound a request's head."""

    context: RequestContext
    paths: frozenset[bytes]
    max_header_bytes: int
    max_headers: int
    _hot: _Hot | None = None  # the hot request in flight, even once a pipelined one became `cycle`
    _mid = False  # llhttp is inside a message (it began one and has not completed it)
    _in_head = False  # … and inside its head
    _head_bytes = 0  # bytes of the reads that fell wholly inside the current head
    _completed = False  # a message ended inside the current read (so not all of the read is the open head)
    _upgrade = False  # the message llhttp is in asks for an upgrade
    _reusable = True  # the last request leaves the connection open for another that llhttp would parse
    _done = False  # nothing more on this connection is HTTP: an upgrade request or a refused head came

    def data_received(self, data: bytes) -> None:
        if self._done:
            return  # what follows an upgrade request or a refused head is never read as a request
        self._completed = False
        if self._mid or not self._reusable or not self._whole(data):
            super().data_received(data)
        if self._in_head and not self._done and not self._completed:  # all of this read is an open head
            self._head_bytes += len(data)
            if self._head_bytes > self.max_header_bytes:
                self._refuse_head()

    def on_message_begin(self) -> None:
        self._mid = self._in_head = True
        self._head_bytes = 0
        super().on_message_begin()

    def _whole(self, data: bytes) -> bool:
        """Serve `data` if it is exactly one qualifying request (the conditions of `on_headers_complete`
        and `_qualifies`); False, having changed nothing, for llhttp to parse it instead."""
        cycle = self.cycle
        if (cycle is not None and not cycle.response_complete) or self.pipeline or self.limit_concurrency is not None:
            return False
        end = data.find(b"\r\n\r\n")
        if (end < 0 or end > self.max_header_bytes or (m := _REQUEST.fullmatch(data, 0, end)) is None
                or (url := m.group(1)) not in self.paths):
            return False
        headers: list[tuple[bytes, bytes]] = []
        length = None
        keep_alive = True
        lines = data[m.end(1) + 11:end].split(b"\r\n")
        if len(lines) > self.max_headers:
            return False  # llhttp's path answers 431
        for line in lines:
            name, _, value = line.partition(b":")
            name, value = name.lower(), value.strip(b" \t")
            if name == b"content-length":
                if length is not None or not value.isdigit():
                    return False
                length = int(value)
            elif name in _NOT_WHOLE:
                return False
            elif name == b"connection":
                tokens = value.lower()
                if b"upgrade" in tokens:
                    return False
                keep_alive = keep_alive and b"close" not in tokens
            headers.append((name, value))
        if length is None or length > self.context.max_body or length != len(data) - end - 4:
            return False
        endpoint = self.context.hot.get(("POST", url.decode("ascii")))
        if endpoint is None:
            return False
        self._unset_keepalive_if_required()
        self._reusable = keep_alive
        self.url, self.headers, self.expect_100_continue = url, headers, False
        self.scope = scope = {  # type: ignore[typeddict-item]  # what uvicorn's callbacks would have built
            "type": "http", "asgi": {"version": self.asgi_version, "spec_version": "2.3"}, "http_version": "1.1",
            "server": self.server, "client": self.client, "scheme": self.scheme, "root_path": self.root_path,
            "headers": headers, "state": self.app_state.copy(), "method": "POST", "path": url.decode("ascii"),
            "raw_path": url, "query_string": b""}
        self.cycle = self._hot = hot = _Hot(endpoint, scope, keep_alive)  # type: ignore[assignment]
        if length:
            hot.body.append(data[end + 4:])
        self.on_message_complete()
        return True

    def on_headers_complete(self) -> None:
        if self._done:
            return
        self._in_head = False
        headers = self.headers
        if (len(headers) > self.max_headers
                or len(self.url) + sum(len(n) + len(v) + 4 for n, v in headers) > self.max_header_bytes):
            self._refuse_head()
            return
        self._upgrade = upgrade = self.parser.should_upgrade()
        self._reusable = not upgrade and self.parser.should_keep_alive()
        cycle = self.cycle
        endpoint = None
        if (self.url in self.paths and (cycle is None or cycle.response_complete) and not self.expect_100_continue
                and self.limit_concurrency is None and self.parser.get_method() == b"POST" and not upgrade):
            endpoint = self._qualifies()
        if endpoint is None:
            super().on_headers_complete()
            if upgrade:  # answered as an ordinary request; llhttp takes what follows as another protocol
                self.cycle.keep_alive = False
            return
        scope: dict[str, Any] = self.scope  # type: ignore[assignment]
        version = self.parser.get_http_version()
        scope["method"] = "POST"
        scope["path"] = self.url.decode("ascii")
        scope["raw_path"] = self.url
        scope["query_string"] = b""
        if version != "1.1":
            scope["http_version"] = version
        self.cycle = self._hot = _Hot(endpoint, scope, version != "1.0" and self.parser.should_keep_alive())  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        hot = self._hot
        if hot is not None and hot is not self.cycle and not hot.response_complete:
            hot.disconnected = True
            hot.set()
        super().connection_lost(exc)

    def _qualifies(self) -> HotEndpoint | None:
        length = None
        for name, value in self.headers:
            if name == b"content-length":
                if length is not None or not value.isdigit():
                    return None
                length = int(value)
            elif name == b"transfer-encoding":
                return None
        if length is None or length > self.context.max_body:
            return None  # uvicorn's path answers 413 and handles chunked bodies
        return self.context.hot.get(("POST", self.url.decode("ascii")))

    def on_body(self, body: bytes) -> None:
        if self._done:
            return
        if type(self.cycle) is _Hot:
            self.cycle.body.append(body)  # at most Content-Length bytes, within the limit
        else:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._done:
            return
        self._mid = False
        self._completed = True
        hot = self.cycle
        if type(hot) is not _Hot:
            super().on_message_complete()
            self._done = self._upgrade
            return
        task = hot.task = self.loop.create_task(self._serve(hot))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    def _refuse_head(self) -> None:
        """431 for a head over the limits, and nothing more read from the connection. An answer still being
        written goes out first and the connection closes after it (then the refused request gets none)."""
        self._done = True
        self._in_head = False
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.keep_alive = False
            return
        err = HeadersTooLarge(f"the request's headers are over the limit of {self.max_header_bytes} bytes or "
                              f"{self.max_headers} fields", fix="send fewer or smaller headers, or raise "
                              "KEEL_MAX_HEADER_BYTES / KEEL_MAX_HEADERS")
        body = orjson.dumps(err.to_problem())
        out = [STATUS_LINE[431]]
        for name, value in self.server_state.default_headers:
            out += (name, b": ", value, b"\r\n")
        out += (b"content-type: ", PROBLEM.encode(), b"\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body),
                body)
        self.transport.write(b"".join(out))
        # Closing with the client's bytes still unread would reset the connection, and the client could lose
        # the answer: end the sending side now, and close once the client does (or after the keep-alive time).
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(self.timeout_keep_alive, self.transport.close)

    async def _serve(self, hot: _Hot) -> None:
        scope = hot.scope
        body = b"".join(hot.body)
        hot.body = []
        ctx = self.context
        scope["app"] = ctx.app
        scope[SEND_NOW] = lambda response: self._send_now(hot, response)
        hot.ids, token, start = ctx.begin(scope)
        status = 0
        started = False

        async def receive() -> dict[str, Any]:
            nonlocal body
            if body is None:
                return {"type": "http.disconnect"}
            out, body = body, None
            return {"type": "http.request", "body": out, "more_body": False}

        try:
            request = StarletteRequest(scope, receive)
            request._body = body  # what `request.body()` returns once read: here it is read already
            response = await hot.endpoint(request)
            if hot.sent is not None:
                if response is not hot.sent:  # the work after the answer failed; the client has its answer
                    log.error("a second answer to one request was dropped", extra={"status": response.status_code})
                status = hot.sent.status_code
            elif isinstance(response, StreamedResponse):
                head = self._head(hot, response, chunked=True)
                status, started = response.status_code, True
                await self._stream(hot, response, head)
            else:
                self._send_now(hot, response)  # a header it cannot carry raises before anything is written
                status = response.status_code
            self._complete(hot)
        except asyncio.CancelledError:
            if not hot.disconnected:
                if not hot.response_complete:  # once answered, the connection may be serving the next request
                    self.transport.close()
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]  # the client left mid-stream
        except Exception as exc:  # the endpoint answers its own errors; this is a fault in writing
            log.error("unhandled error", exc_info=exc)
            if not hot.response_complete:
                if not started and not hot.disconnected:
                    status = 500
                    self._write(hot, STATUS_LINE[500] + b"content-type: text/plain; charset=utf-8\r\n"
                                b"content-length: 21\r\nconnection: close\r\n\r\nInternal Server Error")
                self.transport.close()
        finally:
            ctx.end(scope, status, token, start)
            # Break the request's reference cycles (scope ↔ hot, hot ↔ task), so reference counting frees
            # it at once instead of leaving ~20 objects a request to the cyclic collector.
            scope.pop(SEND_NOW, None)
            hot.task = None

    def _head(self, hot: _Hot, response: Response, chunked: bool) -> bytes:
        out = [STATUS_LINE[response.status_code]]
        for name, value in self.server_state.default_headers:  # `date`, kept current by the server
            out += (name, b": ", value, b"\r\n")
        for name, value in response.raw_headers:
            if HEADER_RE.search(name) or HEADER_VALUE_RE.search(value):
                raise RuntimeError(f"response header {name!r} has a character HTTP does not allow there")
            out += (name, b": ", value, b"\r\n")
        for name, value in hot.ids:
            out += (name, b": ", value, b"\r\n")
        if chunked:
            out.append(b"transfer-encoding: chunked\r\n")
        if not hot.keep_alive:
            out.append(b"connection: close\r\n")
        out.append(b"\r\n")
        return b"".join(out)

    def _send_now(self, hot: _Hot, response: Response) -> None:
        """Write a whole answer at once, before the endpoint returns (it then returns this response). The
        request counts as answered from here: the connection may take its next request at once."""
        self._write(hot, self._head(hot, response, chunked=False) + response.body)
        hot.sent = response
        self._complete(hot)

    def _write(self, hot: _Hot, data: bytes) -> None:
        if not hot.disconnected and not self.transport.is_closing():
            self.transport.write(data)

    async def _stream(self, hot: _Hot, response: StreamedResponse, head: bytes) -> None:
        hot.streaming = True
        if hot.disconnected:  # gone before the first delta: cut at the stream's first wait, so it meters itself
            hot.set()
        self._write(hot, head)
        async for chunk in response.body_iterator:
            if self.flow.write_paused and not hot.disconnected:
                await self.flow.drain()
            if chunk:
                self._write(hot, b"%x\r\n%b\r\n" % (len(chunk), chunk))
        self._write(hot, b"0\r\n\r\n")

    def _complete(self, hot: _Hot) -> None:
        if hot.response_complete:
            return
        hot.response_complete = True
        self._hot = None
        if hot.disconnected:
            return
        if not hot.keep_alive:
            self.transport.close()
        self.on_response_complete()


def protocol_for(context: RequestContext, max_header_bytes: int, max_headers: int) -> type[HotProtocol]:
    """The protocol class uvicorn builds per connection, bound to this app's hot endpoints and head limits."""
    paths = frozenset(path.encode("ascii") for method, path in context.hot if method == "POST")
    return type("KeelHttpProtocol", (HotProtocol,), {"context": context, "paths": paths,
                                                     "max_header_bytes": max_header_bytes, "max_headers": max_headers})
