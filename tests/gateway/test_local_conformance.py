"""The provider conformance suite (`tests/gateway/conformance.py`) against the `local` provider: llama.cpp
in-process with the bundled SmolLM2 model, held to the same semantics as the HTTP providers."""

from __future__ import annotations

import subprocess
import sys

import pytest

from keel.core.settings import DeploymentConfig
from keel.gateway.providers.local_llama import LocalLlamaProvider

from .conformance import ProviderConformance
from .test_local_llama import CTX, DECODE_PROBE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llama_decodes() -> None:
    """Skip where llama.cpp dies on its first decode (test_local_llama's build test says why)."""
    probe = subprocess.run([sys.executable, "-c", DECODE_PROBE], capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        pytest.skip("llama.cpp dies on decode on this machine; see test_llama_cpp_build_decodes")


class TestLocalLlamaConformance(ProviderConformance):
    supports_tools = True
    supports_json_mode = True
    can_stream = True
    can_embed = False

    @pytest.fixture
    def provider_factory(self, llama_decodes):
        return lambda: LocalLlamaProvider(DeploymentConfig(alias="local-chat", provider="local",
                                                           model="SmolLM2-135M-Instruct", context_window=1024), CTX)
