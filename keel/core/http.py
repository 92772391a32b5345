"""HTTP plumbing shared by every capability: problem+json errors, request ids, body limits, access log."""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import Token
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request as StarletteRequest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from keel.core.db import store_unavailable
from keel.core.errors import (
    BadRequest, InternalError, KeelError, MalformedJSON, MethodNotAllowed, NotFound, PayloadTooLarge, ValidationFailed,
)
from keel.core.logs import client_request_id_var, request_id_var

log = logging.getLogger("keel.http")
PROBLEM = "application/problem+json"
Authenticate = Callable[[StarletteRequest], Awaitable[Any]]  # the caller of a request, or raises Unauthorized


RETRY_AFTER_DEFAULT_S = "1"  # a 429 or 503 that does not know when to come back still says when to retry


def error_headers(err: KeelError) -> dict[str, str]:
    """The error's own headers, and a Retry-After on every 429 and 503 (whatever shape its body takes)."""
    if err.status in (429, 503) and "Retry-After" not in err.headers:
        return {**err.headers, "Retry-After": RETRY_AFTER_DEFAULT_S}
    return err.headers


def problem_response(err: KeelError) -> Response:
    body = orjson.dumps(err.to_problem(request_id_var.get()))
    return Response(body, status_code=err.status, media_type=PROBLEM, headers=error_headers(err))


def _validation_error(exc: RequestValidationError | ValidationError) -> KeelError:
    errors = exc.errors()
    for e in errors:
        if e.get("type") == "json_invalid":
            return MalformedJSON(f"request body is not valid JSON: {e.get('ctx', {}).get('error', 'parse error')}",
                                 fix="send a JSON object with Content-Type: application/json")
    fields = []
    for e in errors:
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        fields.append({"field": ".".join(loc) or "(body)", "message": e.get("msg", "invalid")})
    summary = "; ".join(f"{f['field']}: {f['message']}" for f in fields[:5])
    err = ValidationFailed(f"request is invalid: {summary}", fix="correct the named fields")
    err.ids["errors"] = fields
    return err


def install_error_handlers(app: FastAPI, authenticate: Authenticate | None = None) -> None:
    """Every error, ours or the framework's, leaves as problem+json; nothing leaves as a traceback.
    `authenticate(request)` is asked first when a body is not even JSON (the framework decodes it before
    the route's own key check runs), so an anonymous caller gets 401, never a verdict on its body."""

    @app.exception_handler(KeelError)
    async def _keel(_req: Request, exc: KeelError) -> Response:
        return problem_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(req: Request, exc: RequestValidationError) -> Response:
        if authenticate is not None and any(e.get("type") == "json_invalid" for e in exc.errors()):
            try:
                await authenticate(req)
            except KeelError as err:
                return problem_response(err)
        return problem_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(req: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            err: KeelError = NotFound(f"no route {req.method} {req.url.path}", fix="see /openapi.json for routes")
        elif exc.status_code == 405:
            err = MethodNotAllowed(f"{req.method} is not allowed on {req.url.path}",
                                   fix=f"use one of: {exc.headers.get('Allow', '') if exc.headers else ''}")
        elif exc.status_code == 413:
            err = PayloadTooLarge("request body is too large")
        else:
            err = BadRequest(str(exc.detail))
            err.status = exc.status_code
        return problem_response(err)

    @app.exception_handler(Exception)
    async def _unexpected(_req: Request, exc: Exception) -> Response:
        if (down := store_unavailable(exc)) is not None:
            log.warning("store unavailable", extra={"error": str(exc).splitlines()[0][:300]})
            return problem_response(down)
        log.error("unhandled error", exc_info=exc)
        return problem_response(InternalError("Keel hit an internal error; the request id is in the log",
                                              fix="retry; if it persists, report the request id"))


HotEndpoint = Callable[[StarletteRequest], Awaitable[Response]]
# Scope key of `send_now(response)`, set for the hot endpoints by `RequestContext`: it starts writing an
# answer before the endpoint returns (its bookkeeping goes on after); the endpoint then returns that response.
SEND_NOW = "keel.send_now"
FastParse = Callable[[Any], Any]


def hot_json_endpoint(model: type[BaseModel], handler: Callable[[Any, StarletteRequest, Any], Awaitable[Response]],
                      fast: FastParse | None = None, authenticate: Authenticate | None = None) -> HotEndpoint:
    """Wrap `handler(body, request, caller)` for the hot path, with every error as the same problem+json the
    framework path gives. The caller is authenticated first (`authenticate(request)`, so an anonymous
    malformed body is a 401, not a 422); the body is then decoded as strict JSON (RFC 8259: no NaN, no
    lone surrogates, UTF-8 only). `fast(data)` may turn a body of the common shape into what the handler
    takes (None when unsure); any other body is validated by pydantic, whose model the handler then gets."""

    async def endpoint(request: StarletteRequest) -> Response:
        try:
            caller = await authenticate(request) if authenticate is not None else None
            raw = await read_body(request.receive)
            try:
                data = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise MalformedJSON(f"request body is not valid JSON: {exc}",
                                    fix="send a JSON object with Content-Type: application/json") from None
            refuse_deep(raw, data)
            body = fast(data) if fast is not None else None
            if body is None:
                try:
                    body = model.model_validate(data)
                except ValidationError as exc:
                    raise _validation_error(exc) from None
            return await handler(body, request, caller)
        except KeelError as exc:
            return problem_response(exc)
        except _BodyTooLarge:
            raise
        except Exception as exc:  # the same last resort as the framework's handler: log it, never leak it
            if (down := store_unavailable(exc)) is not None:
                log.warning("store unavailable", extra={"error": str(exc).splitlines()[0][:300]})
                return problem_response(down)
            log.error("unhandled error", exc_info=exc)
            return problem_response(InternalError("Keel hit an internal error; the request id is in the log",
                                                  fix="retry; if it persists, report the request id"))

    return endpoint


_B36 = "0123456789abcdefghijklmnopqrstuvwxyz"
_B36_PAIRS = [x + y for x in _B36 for y in _B36]
Tokens = tuple[Token[str | None], Token[str | None]]  # the request id's and the client's id's, for `end`
_CLIENT_ID = re.compile(rb"[!-~]{1,128}")  # a client's request id: visible ASCII, safe to echo and to log


def request_id() -> str:
    """A fresh id shaped like `new_id("req")`'s (`req_`, 9 base-36 time characters, 13 random ones), for
    less: the time in two-character steps, and 52 random bits from `random` (an id, not a secret)."""
    ms = time.time_ns() // 1_000_000
    high, low = divmod(ms, 1296**4)
    p = _B36_PAIRS
    return (f"req_{_B36[high % 36]}{p[low // 1296**3]}{p[low // 1296**2 % 1296]}{p[low // 1296 % 1296]}"
            f"{p[low % 1296]}{random.getrandbits(52):013x}")


def settle_heap() -> None:
    """Once the app has started: move everything that lives as long as the process (modules, settings,
    caches) out of the collector's reach, and collect young objects less often. Requests free almost all
    they allocate by reference counting; without this, each full collection re-walks the whole heap."""
    gc.freeze()
    _, g1, g2 = gc.get_threshold()
    gc.set_threshold(max(gc.get_threshold()[0], 10_000), g1, g2)


class RequestContext:
    """Pure ASGI middleware: request id in and out, body-size limit, one JSON access line.

    `hot` maps `(method, path)` of the busiest endpoints (chat completions, embeddings) to endpoints
    served here directly: the framework's router and dependency solver cost more per call than the
    rest of the gateway. They stay declared on the framework too, for the OpenAPI document.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, log_requests: bool = True,
                 hot: dict[tuple[str, str], HotEndpoint] | None = None) -> None:
        # Outermost layer: hot endpoints skip the framework's whole middleware stack as well.
        self.app = app
        self.max_body = max_body_bytes
        self.log_requests = log_requests
        self.hot = hot if hot is not None else {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self.app(scope, receive, self._lifespan_send(send))
                return
            await self.app(scope, receive, send)
            return
        length = None
        for k, v in scope["headers"]:
            if k == b"content-length":
                length = int(v) if v.isdigit() else None
                break
        ids, token, start = self.begin(scope)
        status_holder: dict[str, Any] = {"status": 0}

        seen = 0
        too_large = False

        async def send_wrapped(message: Message) -> None:
            if too_large and not status_holder.get("ours"):
                return  # the app's answer to a truncated body is replaced by our 413 below
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                message["headers"] = list(message.get("headers", [])) + ids
                if status_holder.get("ours"):
                    # The body is left unread: the connection cannot carry another request, so say so
                    # (a client that reused it met a closed socket instead of an answer).
                    message["headers"].append((b"connection", b"close"))
            await send(message)

        async def receive_limited() -> Message:
            nonlocal seen, too_large
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    too_large = True
                    raise _BodyTooLarge()
            return message

        try:
            if length is not None and length > self.max_body:
                status_holder["ours"] = True
                await problem_response(self._too_large(length))(scope, receive, send_wrapped)
                return
            try:
                hot = self.hot.get((scope["method"], scope["path"]))
                if hot is not None:
                    scope["app"] = self.app
                    early: list[asyncio.Future[None]] = []
                    scope[SEND_NOW] = lambda response: early.append(
                        asyncio.ensure_future(response(scope, receive_limited, send_wrapped)))
                    try:
                        response = await hot(StarletteRequest(scope, receive_limited))
                    finally:
                        del scope[SEND_NOW]  # the closure refers to the scope: no cycle left for the collector
                    if early:
                        await early[0]
                    else:
                        await response(scope, receive_limited, send_wrapped)
                else:
                    await self.app(scope, receive_limited, send_wrapped)
            except _BodyTooLarge:
                pass
            if too_large and status_holder["status"] == 0:
                status_holder["ours"] = True
                await problem_response(self._too_large(seen))(scope, receive, send_wrapped)
        finally:
            self.end(scope, status_holder["status"], token, start)

    @staticmethod
    def begin(scope: Scope) -> tuple[list[tuple[bytes, bytes]], Tokens, float]:
        """Set the request's ids for logs and return the response headers that carry them, and its start.

        Keel's id is always Keel's own: it keys the usage ledger, so requests can never share a row. The
        client's id (`x-client-request-id`, else `x-request-id`) is kept beside it for correlation and
        echoed as `x-client-request-id`; one that is not 1-128 visible ASCII characters is ignored rather
        than refused, since it serves only the client's own correlation."""
        client = fallback = None
        for k, v in scope["headers"]:
            if k == b"x-client-request-id":
                client = v
                break
            if k == b"x-request-id" and fallback is None:
                fallback = v
        if client is None:
            client = fallback
        rid = request_id()
        ids = [(b"x-request-id", rid.encode("ascii"))]
        crid = None
        if client is not None and _CLIENT_ID.fullmatch(client):
            ids.append((b"x-client-request-id", client))
            crid = client.decode("ascii")
        return ids, (request_id_var.set(rid), client_request_id_var.set(crid)), time.perf_counter()

    def end(self, scope: Scope, status: int, token: Tokens, start: float) -> None:
        """The access line, then the request's ids unset."""
        if self.log_requests and log.isEnabledFor(logging.INFO):
            log.info("request", extra={"method": scope["method"], "path": scope["path"], "status": status,
                                       "ms": round((time.perf_counter() - start) * 1000, 2)})
        request_id_var.reset(token[0])
        client_request_id_var.reset(token[1])

    @staticmethod
    def _lifespan_send(send: Send) -> Send:
        async def lifespan_send(message: Message) -> None:
            await send(message)
            if message["type"] == "lifespan.startup.complete":
                settle_heap()

        return lifespan_send

    def _too_large(self, size: int) -> PayloadTooLarge:
        return PayloadTooLarge(f"request body of {size} bytes is over the limit of {self.max_body} bytes",
                               fix="send a smaller body, or raise KEEL_MAX_BODY_BYTES")


class _BodyTooLarge(Exception):
    """Raised inside receive() when a chunked body passes the limit."""


class StreamedResponse(Response):
    """A streamed answer (SSE) written straight to the server: what `body` yields is sent as it comes.
    A client that goes away cancels the writing, so the iterator's cleanup runs at once. Unlike
    StreamingResponse it needs no task group per request, only one task that waits for the disconnect."""

    def __init__(self, body: AsyncIterator[bytes], media_type: str, headers: dict[str, str]) -> None:
        self.body_iterator = body
        self.status_code = 200
        self.media_type = media_type
        self.background = None
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        ended = gone = False

        async def watch() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            if not ended:
                gone = True
                task.cancel()

        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        watcher = asyncio.ensure_future(watch())
        try:
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            ended = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not gone:
                raise
            task.uncancel()  # the client left: the stream was cut short on purpose, the request is over
        finally:
            ended = True
            watcher.cancel()


class JSONAnswer(Response):
    """A 200 JSON answer already serialised, for the hot endpoints: its header list is built directly
    (the framework's `init_headers` costs about as much as the rest of sending it)."""

    media_type = "application/json"

    def __init__(self, body: bytes, headers: dict[str, str]) -> None:
        self.status_code = 200
        self.body = body
        self.background = None
        self.raw_headers = [(b"content-length", b"%d" % len(body)), (b"content-type", b"application/json"),
                            *((k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items())]


async def read_body(receive: Receive) -> bytes:
    """A request's whole body straight from the ASGI `receive`, for the hot endpoints: what Starlette's
    `Request.body()` gives (ClientDisconnect if the client left), without its stream generator (~4 µs a call).
    The request's own `body()` must not be called after it."""
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientDisconnect()
    body = message.get("body", b"")
    if not message.get("more_body", False):
        return body
    parts = [body]
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)


def refuse_deep(raw: bytes, data: Any) -> None:
    """400 when the parsed body `data` nests deeper than orjson writes (254 levels; it reads 1024): such a body
    could be neither sent upstream, stored nor cached, and walking it would recurse past Python's limit. Checked
    by writing it, only for a body with that many brackets at all (an ordinary one costs two byte counts)."""
    if raw.count(b"[") + raw.count(b"{") < 254:
        return
    try:
        orjson.dumps(data)
    except orjson.JSONEncodeError:
        raise BadRequest("request body nests deeper than 254 levels", fix="send JSON nested less deeply") from None


async def bounded_json(request: StarletteRequest, max_bytes: int, too_large: str, fix: str) -> Any:
    """The request's body as strict JSON; over `max_bytes` it is a 400 saying `too_large` and `fix`."""
    raw = await request.body()
    if len(raw) > max_bytes:
        raise BadRequest(too_large, fix=fix)
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise MalformedJSON(f"request body is not valid JSON: {exc}", fix="send a JSON object") from None
    refuse_deep(raw, data)
    return data


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    if status == 204:
        return Response(status_code=204, headers=headers)
    return Response(orjson.dumps(data), status_code=status, media_type="application/json", headers=headers)
