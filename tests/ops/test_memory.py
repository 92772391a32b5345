"""Memory an operator can plan with: the bundled embedder's memory stays near its model's size however
large the batches it has seen (ONNX Runtime's CPU arena kept each peak — 32 texts of 256 word pieces took
a process from 240 MB to 1.2 GB, for good), unless a deployment asks for the arena back. Run with the
allocator setting the images set and docs/scaling.md documents (MALLOC_MMAP_THRESHOLD_: without it glibc's
moving mmap threshold keeps 60-600 MB of freed activations, varying run to run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT

PROBE = """
import asyncio, json, sys, psutil
from keel.core.settings import DeploymentConfig
from keel.gateway.protocol import ProviderContext
from keel.gateway.providers.local_embed import LocalEmbedProvider
options = json.loads(sys.argv[1])
p = LocalEmbedProvider(DeploymentConfig(alias="e", provider="local_embed", kind="embedding", options=options),
                       ProviderContext(get_secret=lambda n: "", threads=1))
p.load()
rss = lambda: psutil.Process().memory_info().rss / 2**20
before = rss()
for words in (250, 120, 200):
    asyncio.run(p.embed([("budget ledger policy " * words)[: words * 7] + str(i) for i in range(32)]))
print(json.dumps({"growth_mb": rss() - before}))
"""


def growth(options: dict) -> float:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(options)], capture_output=True, text=True,
                         timeout=240, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])["growth_mb"]


def test_full_batches_leave_the_embedder_near_its_model_size() -> None:
    """Guards: the ONNX Runtime arena holding the largest batch's activations for the life of the process."""
    assert growth({}) < 100


def test_a_deployment_may_take_the_arena_back_and_a_wrong_value_is_refused() -> None:
    from keel.core.errors import ConfigError
    from keel.core.settings import DeploymentConfig
    from keel.gateway.protocol import ProviderContext
    from keel.gateway.providers.local_embed import LocalEmbedProvider

    ctx = ProviderContext(get_secret=lambda n: "", threads=1)
    on = LocalEmbedProvider(DeploymentConfig(alias="e", provider="local_embed", kind="embedding",
                                             options={"cpu_mem_arena": True}), ctx)
    assert on.load().get_session_options().enable_cpu_mem_arena is True
    try:
        LocalEmbedProvider(DeploymentConfig(alias="e", provider="local_embed", kind="embedding",
                                            options={"cpu_mem_arena": "yes"}), ctx)
    except ConfigError as exc:
        assert "options.cpu_mem_arena" in exc.detail
    else:
        raise AssertionError("a non-boolean cpu_mem_arena was accepted")
