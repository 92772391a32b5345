"""`keel.core.server.run` sets up the process for serving (the event loop's thread waits at most
`GIL_SWITCH_INTERVAL_S` for the GIL) before the server starts, and exits non-zero when the app's startup
failed."""

from __future__ import annotations

import sys
from typing import Any

import pytest

from keel.core import server
from keel.core.settings import Settings


def test_run_shortens_the_gil_switch_interval_before_serving(monkeypatch, tmp_path):
    seen: list[float] = []

    async def serve(app: Any, settings: Settings, on_ready: Any = None, stop: Any = None) -> bool:
        seen.append(sys.getswitchinterval())
        on_ready("http://127.0.0.1:1")
        return True

    before = sys.getswitchinterval()
    monkeypatch.setattr(server, "serve", serve)
    ready: list[str] = []
    try:
        server.run(None, Settings(data_dir=tmp_path, embedded_models=False, port=0), on_ready=ready.append)
    finally:
        sys.setswitchinterval(before)
    assert seen == [server.GIL_SWITCH_INTERVAL_S] and ready


def test_run_exits_non_zero_when_startup_failed(monkeypatch, tmp_path):
    async def serve(app: Any, settings: Settings, on_ready: Any = None, stop: Any = None) -> bool:
        return False

    before = sys.getswitchinterval()
    monkeypatch.setattr(server, "serve", serve)
    try:
        with pytest.raises(SystemExit) as exc:
            server.run(None, Settings(data_dir=tmp_path, embedded_models=False, port=0))
    finally:
        sys.setswitchinterval(before)
    assert exc.value.code == 1
