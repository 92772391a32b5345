"""Start the server: settings validated, store migrated, then — only then — the port is bound.

The HTTP server is granian's embeddable server (hyper underneath) on Keel's own uvloop event loop, through
its public API: it parses requests, bounds their heads while they arrive (431) and frames bodies;
`keel.core.edge.Edge` adds what RFC 9112 leaves to the application. Chosen over uvicorn by an A/B in
`bench/gateway.py` and because uvicorn's httptools protocol buffers a request head without any limit.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
import sys
import threading
from typing import Any, Callable

import uvloop
from granian.constants import HTTPModes, Interfaces
from granian.http import HTTP1Settings
from granian.log import LogLevels
from granian.server.embed import Server

from keel.core.edge import Edge
from keel.core.logs import configure_logging
from keel.core.settings import Settings

log = logging.getLogger("keel.server")


def log_sources(settings: Settings, sources: dict[str, str]) -> None:
    """Log where each non-default setting came from (never its value if it is a secret)."""
    for name, source in sorted(sources.items()):
        value = getattr(settings, name, None)
        shown = "***" if name in ("master_key", "bootstrap_admin_key") else value
        if name == "models":
            shown = [m.alias for m in settings.models]
        log.info("setting", extra={"setting": name, "source": source, "value": str(shown)})


# How long the event loop's thread may wait for the GIL while a worker thread (a ledger or budget flush in
# SQLAlchemy) holds it: CPython's default is 5 ms; requests that met a flush set the added p99 (bench/gateway.py).
GIL_SWITCH_INTERVAL_S = 0.0005
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# The garbage collector while serving: what startup built (modules, the app, its services, ~10^6 objects) is
# frozen out of every later collection, and the young generation is collected after 7,000 net allocations
# instead of 700, so the objects of requests still in flight are not promoted to be rescanned by full
# collections. Requests make almost no cyclic garbage, and full collections over the startup objects had
# cost a large share of a request's CPU (both measured in bench/README.md).
GC_YOUNG_THRESHOLD = 7000
# granian's own log lines go through Keel's handlers (configure_logging), its errors only.
GRANIAN_LOGS = {"version": 1, "disable_existing_loggers": False,
                "loggers": {"_granian": {"handlers": [], "propagate": True}}}


def _port(settings: Settings) -> int:
    if settings.port:
        return settings.port
    with socket.socket() as s:  # port 0: a free one, chosen here so the URL is known before serving
        s.bind((settings.host, 0))
        return s.getsockname()[1]


async def serve(app: Any, settings: Settings, on_ready: Callable[[str], None] | None = None,
                stop: asyncio.Event | None = None) -> bool:
    """Serve `app` until `stop` is set, or SIGINT/SIGTERM in the main thread; in-flight requests finish
    and the app's shutdown hooks run. False if the app's startup failed (nothing was served)."""
    loop = asyncio.get_running_loop()
    port = _port(settings)
    started = asyncio.Event()
    edge = Edge(app, settings.max_header_bytes, settings.max_headers, on_started=started.set)
    server = Server(edge, address=settings.host, port=port, interface=Interfaces.ASGI, http=HTTPModes.http1,
                    websockets=False, backlog=1024, log_access=False, log_level=LogLevels.error,
                    log_dictconfig=GRANIAN_LOGS,
                    # hyper's read buffer: a head that does not fit is refused with 431 while it arrives
                    http1_settings=HTTP1Settings(max_buffer_size=max(settings.max_header_bytes, 8192)))
    task = asyncio.create_task(server.serve())
    main = threading.current_thread() is threading.main_thread()
    if main:
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, server.stop)
    watchers = [asyncio.ensure_future(started.wait())]
    if stop is not None:
        watchers.append(asyncio.ensure_future(stop.wait()))
    await asyncio.wait([task, watchers[0]], return_when=asyncio.FIRST_COMPLETED)
    if started.is_set():
        settle_heap()
        if on_ready is not None:
            on_ready(f"http://{settings.host}:{port}")
    if stop is not None:
        await asyncio.wait([task, watchers[1]], return_when=asyncio.FIRST_COMPLETED)
        server.stop()
    try:
        await task
    finally:
        for w in watchers:
            w.cancel()
        if main:
            for sig in STOP_SIGNALS:
                loop.remove_signal_handler(sig)
    return started.is_set()


def settle_heap() -> None:
    """Once the app has started: collect what startup left, freeze the rest out of later collections."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def run(app: Any, settings: Settings, on_ready: Callable[[str], None] | None = None) -> None:
    """Serve `app` in this process; SIGINT/SIGTERM drain requests, run shutdown and exit 0."""
    configure_logging(settings.log_level)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    if not uvloop.run(serve(app, settings, on_ready)):
        raise SystemExit(1)
