"""`keel.core.server.run` sets up the process for serving (the event loop's thread waits at most
`GIL_SWITCH_INTERVAL_S` for the GIL) before uvicorn starts."""

from __future__ import annotations

import sys

from keel.core import server
from keel.core.settings import Settings


def test_run_shortens_the_gil_switch_interval_before_serving(monkeypatch, tmp_path):
    seen: list[float] = []

    class Started:
        started, servers = True, []

        def __init__(self, config: object) -> None:
            pass

        async def serve(self) -> None:
            seen.append(sys.getswitchinterval())

    before = sys.getswitchinterval()
    monkeypatch.setattr(server, "_Server", Started)
    ready: list[str] = []
    try:
        server.run(None, Settings(data_dir=tmp_path, embedded_models=False, port=0), on_ready=ready.append)
    finally:
        sys.setswitchinterval(before)
    assert seen == [server.GIL_SWITCH_INTERVAL_S] and ready
