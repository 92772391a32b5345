"""What the multi-process tests share: a real `redis-server` (or `valkey-server`) from Debian, started per module."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator

import pytest

from conftest import eventually, free_port, listening

REDIS = shutil.which("redis-server") or shutil.which("valkey-server")


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    if REDIS is None:
        pytest.skip("redis-server (or valkey-server) not installed: `make test-deps` installs it")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="keel-redis-") as work:
        proc = subprocess.Popen([REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                                 "no", "--dir", work], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            eventually(lambda: listening(port), timeout=20)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            proc.wait(10)
