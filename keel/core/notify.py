"""Changes reach every process on one store at once: a writer publishes a topic (`deployments`, `keys`, …), and each
process's `ChangeFeed` calls what it subscribed to that topic (reload a cache, drop trusted keys).

On PostgreSQL this is LISTEN/NOTIFY on one channel, through a dedicated psycopg connection in a thread; after a
lost connection every subscriber runs once (what was published meanwhile is not replayed). On SQLite one process
serves the store, so publishing is a no-op and the writer's own process refreshes itself as before.

    feed = ChangeFeed(store); feed.subscribe("deployments", deployments.reload)
    await feed.start()                     # ... publish(store, "deployments") in any process
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable

import sqlalchemy as sa

from keel.core.db import Store

log = logging.getLogger("keel.notify")
CHANNEL = "keel_changes"
RECONNECT_S = 1.0


def publish(store: Store, topic: str) -> None:
    """Tell every process on `store` that `topic` changed (after the writer's transaction committed)."""
    if store.dialect != "postgresql":
        return
    with store.engine.begin() as conn:
        conn.execute(sa.text("SELECT pg_notify(:channel, :topic)"), {"channel": CHANNEL, "topic": topic})


class ChangeFeed:
    """This process's subscriptions to published topics; handlers run in the listener's thread (they are the
    same thread-safe refreshes a writer runs on its own process)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.handlers: dict[str, list[Callable[[], None]]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.listening = threading.Event()  # set while LISTEN is in effect

    def subscribe(self, topic: str, handler: Callable[[], None]) -> None:
        self.handlers.setdefault(topic, []).append(handler)

    def dispatch(self, topic: str) -> None:
        for handler in self.handlers.get(topic, ()):
            try:
                handler()
            except Exception:  # one failing refresh must not stop the others or the listener
                log.exception("refresh after a published change failed", extra={"topic": topic})

    async def start(self) -> None:
        if self.store.dialect != "postgresql" or not self.handlers:
            return
        self._thread = threading.Thread(target=self._listen, name="keel-changes", daemon=True)
        self._thread.start()
        await asyncio.to_thread(self.listening.wait, 10)

    async def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5)
            self._thread = None

    def _listen(self) -> None:
        import psycopg

        conninfo = self.store.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        first = True
        while not self._stop.is_set():
            try:
                with contextlib.closing(psycopg.connect(conninfo, autocommit=True)) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self.listening.set()
                    if not first:  # changes published while not listening are lost: refresh everything once
                        for topic in list(self.handlers):
                            self.dispatch(topic)
                    first = False
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=0.5):
                            self.dispatch(note.payload)
            except psycopg.Error as exc:
                self.listening.clear()
                log.warning("change feed lost its connection; reconnecting", extra={"error": type(exc).__name__})
                self._stop.wait(RECONNECT_S)
