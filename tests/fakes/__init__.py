"""Loopback fake upstreams: real aiohttp servers that speak the OpenAI and Anthropic APIs, and fail on command.

Run one in a background thread (`with FakeOpenAI() as fake: … fake.url …`) or as a subprocess
(`python -m tests.fakes.openai_upstream --port N --latency-ms 20`, from the repository root; it prints
`listening on URL`, URL being the provider's base_url; SIGTERM stops it with exit code 0).
Options (keyword or `--flag`): latency_ms (before every answer), chunk_delay_ms (between streamed events),
api_key (when set, a request with another key gets a 401), retry_after, reply, hang_s.

Faults (a name; the fake plays it instead of a normal answer):
  `400`, `401`, `429`, `500`, `529`, … any status: that status with the protocol's error body;
                 `429` adds `retry-after: <retry_after>` (default 2 seconds)
  `hang`         no answer until `hang_s` (default 30 s) passes or the fake stops
  `hang-mid`     streaming: two events, then silence (an idle timeout)
  `reset`        non-streaming: the connection is aborted with no answer; streaming: two events, then aborted
  `malformed`    non-streaming: 200 with truncated JSON; streaming: two events, then `data: {not json`
  `no-done`      streaming: the body ends cleanly after the content, without finish, usage or terminal event
  `no-usage`     OpenAI: the answer carries no usage
  `error-event`  streaming: two events, then the protocol's in-stream error event

Choosing a fault, first match wins:
  1. queued: `fake.fail_next("500", times=2)` or `POST /_control {"fault": "500", "times": 2}`
     (`times: -1` = every request until `/_reset`)
  2. request header `x-fake-fault: 500`
  3. model name `fault:500` (so a deployment can be wired to fail)

Other control: `POST /_control {"latency_ms": 5, "retry_after": "3"}`; `POST /_reset` zeroes the counters
and clears faults; `GET /_stats` → `{"requests", "paths", "faults", "disconnects"}` (`?detail=1` adds the
last 50 requests with their headers, bodies and client address, which shows keep-alive reuse). In a thread, `fake.stats()` and `fake.received` give the
same. `requests` counts every API request received, faulted or not, so a test can prove none was sent twice;
`disconnects` counts streams the client closed before their end.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import socket
import threading
from collections import Counter, deque
from typing import Any, ClassVar

import orjson
from aiohttp import web

DEFAULT_REPLY = "Hello from the fake upstream. It answers quickly and always the same way."
SAMPLES = {"string": "Paris", "integer": 1, "number": 1.5, "boolean": True, "array": [], "object": {}}
MID_STREAM = ("reset", "hang-mid", "malformed", "error-event")


def words_of(text: str) -> list[str]:
    """Split a reply into word-sized pieces (with their trailing spaces): one piece = one token = one event."""
    return re.findall(r"\S+\s*", text) or [text]


def sample_args(schema: dict[str, Any] | None) -> dict[str, Any]:
    """Plausible arguments for a JSON schema: the first enum value or a sample of each property's type."""
    props = (schema or {}).get("properties") or {}
    return {k: (v.get("enum") or [SAMPLES.get(v.get("type"), "x")])[0] for k, v in props.items()}


def estimate(messages: Any) -> int:
    """About four characters a token, at least one."""
    return max(1, len(orjson.dumps(messages)) // 4)


def bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


class FakeUpstream:
    """Base of a fake: faults, counters, and running in a thread or as a process; subclasses add the API."""

    base_path: ClassVar[str] = ""

    def __init__(self, *, latency_ms: float = 0.0, chunk_delay_ms: float = 0.0, api_key: str | None = None,
                 retry_after: str = "2", hang_s: float = 30.0, reply: str = DEFAULT_REPLY) -> None:
        self.latency = latency_ms / 1000
        self.chunk_delay = chunk_delay_ms / 1000
        self.api_key = api_key
        self.retry_after = retry_after
        self.hang_s = hang_s
        self.words = words_of(reply)
        self.root = self.url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.reset()

    # -- subclass hooks ------------------------------------------------------------------------------------
    def routes(self, router: web.UrlDispatcher) -> None:
        raise NotImplementedError

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        raise NotImplementedError

    def error_event(self) -> bytes:
        raise NotImplementedError

    def check_auth(self, request: web.Request) -> web.Response | None:
        return None

    # -- control and counters ------------------------------------------------------------------------------
    def reset(self) -> None:
        self.requests = 0
        self.paths: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.disconnects = 0
        self.received: deque[dict[str, Any]] = deque(maxlen=50)
        self.queue: deque[str] = deque()
        self.sticky: str | None = None

    def fail_next(self, fault: str, times: int = 1) -> None:
        if times < 0:
            self.sticky = fault
        else:
            self.queue.extend([fault] * times)

    def stats(self) -> dict[str, Any]:
        return {"requests": self.requests, "paths": dict(self.paths), "faults": dict(self.faults),
                "disconnects": self.disconnects}

    def record(self, request: web.Request, body: Any) -> str | None:
        """Count the request and pick its fault, if any."""
        self.requests += 1
        self.paths[request.path] += 1
        self.received.append({"path": request.path, "headers": dict(request.headers), "body": body,
                              "peer": request.transport.get_extra_info("peername") if request.transport else None})
        fault = (self.queue.popleft() if self.queue else self.sticky) or request.headers.get("x-fake-fault")
        model = body.get("model") if isinstance(body, dict) else None
        if not fault and isinstance(model, str) and model.startswith("fault:"):
            fault = model[6:]
        if fault:
            self.faults[fault] += 1
        return fault

    async def _stats(self, request: web.Request) -> web.Response:
        out = self.stats()
        if request.query.get("detail"):
            out["received"] = list(self.received)
        return web.Response(body=orjson.dumps(out), content_type="application/json")

    async def _control(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read() or b"{}")
        if "fault" in body:
            self.fail_next(body["fault"], int(body.get("times", 1)))
        if "latency_ms" in body:
            self.latency = float(body["latency_ms"]) / 1000
        if "retry_after" in body:
            self.retry_after = str(body["retry_after"])
        return web.Response(body=orjson.dumps({"ok": True, "queued": list(self.queue), "sticky": self.sticky}),
                            content_type="application/json")

    async def _reset(self, _request: web.Request) -> web.Response:
        self.reset()
        return web.Response(body=b'{"ok": true}', content_type="application/json")

    # -- answering -----------------------------------------------------------------------------------------
    @staticmethod
    def json(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
        return web.Response(body=orjson.dumps(doc), status=status, headers=headers, content_type="application/json")

    def error_response(self, status: int, message: str) -> web.Response:
        headers = {"retry-after": self.retry_after} if status == 429 else None
        return self.json(self.error_body(status, message), status, headers)

    async def hang(self) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), self.hang_s)
        except TimeoutError:
            return

    async def prelude(self, request: web.Request) -> tuple[Any, str | None, web.StreamResponse | None]:
        """Read and count the request; return (body, fault, an early answer or None to answer normally)."""
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            body = None
        fault = self.record(request, body)
        if not isinstance(body, dict):
            return body, fault, self.error_response(400, "the request body is not a JSON object")
        if denied := self.check_auth(request):
            return body, fault, denied
        if self.latency:
            await asyncio.sleep(self.latency)
        return body, fault, await self._early_fault(request, fault, bool(body.get("stream")))

    async def _early_fault(self, request: web.Request, fault: str | None, stream: bool) -> web.StreamResponse | None:
        if fault is None:
            return None
        if fault.isdigit():
            return self.error_response(int(fault), f"fake upstream fault {fault}")
        if fault == "hang":
            await self.hang()
            return self.error_response(504, "fake upstream hung")
        if fault == "reset" and not stream:
            request.transport.abort()
            return web.Response(status=500)  # never reaches the client
        if fault == "malformed" and not stream:
            return web.Response(body=b'{"id": "broken", "choices": [{"mess', content_type="application/json")
        return None  # stream faults are played by send_events

    async def send_events(self, request: web.Request, events: list[bytes], fault: str | None) -> web.StreamResponse:
        """Write SSE events one by one, playing a mid-stream fault after the second."""
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        try:
            for i, event in enumerate(events):
                if i == 2 and fault in MID_STREAM:
                    if fault == "reset":
                        request.transport.abort()
                        return resp
                    if fault == "hang-mid":
                        await self.hang()
                    await resp.write(b"data: {not json\n\n" if fault == "malformed" else self.error_event())
                    break
                await resp.write(event)
                if self.chunk_delay:
                    await asyncio.sleep(self.chunk_delay)
            await resp.write_eof()
        except ConnectionResetError:
            self.disconnects += 1
        return resp

    # -- running -------------------------------------------------------------------------------------------
    async def serve(self, sock: socket.socket) -> None:
        self._stopping = asyncio.Event()
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_get("/_stats", self._stats)
        app.router.add_post("/_control", self._control)
        app.router.add_post("/_reset", self._reset)
        self.routes(app.router)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()
        host, port = sock.getsockname()[:2]
        self.root = f"http://{host}:{port}"
        self.url = self.root + self.base_path

    async def shutdown(self) -> None:
        self._stopping.set()
        await self._runner.cleanup()

    def start(self, host: str = "127.0.0.1", port: int = 0) -> FakeUpstream:
        """Serve from a background thread with its own event loop; `url` is set on return."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=type(self).__name__, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.serve(bind(host, port)), self._loop).result(10)
        return self

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        asyncio.run_coroutine_threadsafe(self.shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._loop = self._thread = None

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @classmethod
    def main(cls, argv: list[str] | None = None) -> None:
        """Command line: serve until SIGTERM/SIGINT (uvloop when installed)."""
        parser = argparse.ArgumentParser(description=cls.__doc__)
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=0)
        parser.add_argument("--latency-ms", type=float, default=0.0, help="fixed delay before every answer")
        parser.add_argument("--chunk-delay-ms", type=float, default=0.0, help="delay between streamed events")
        parser.add_argument("--api-key", default=None, help="when set, requests must carry this key")
        parser.add_argument("--retry-after", default="2")
        parser.add_argument("--reply", default=DEFAULT_REPLY)
        parser.add_argument("--hang-s", type=float, default=30.0, help="how long the `hang` faults last")
        args = parser.parse_args(argv)
        fake = cls(latency_ms=args.latency_ms, chunk_delay_ms=args.chunk_delay_ms, api_key=args.api_key,
                   retry_after=args.retry_after, reply=args.reply, hang_s=args.hang_s)

        async def run() -> None:
            await fake.serve(bind(args.host, args.port))
            print(f"listening on {fake.url}", flush=True)
            stop = asyncio.Event()
            for sig in (signal.SIGINT, signal.SIGTERM):
                asyncio.get_running_loop().add_signal_handler(sig, stop.set)
            await stop.wait()
            await fake.shutdown()

        try:
            import uvloop
        except ImportError:
            asyncio.run(run())
        else:
            uvloop.run(run())
