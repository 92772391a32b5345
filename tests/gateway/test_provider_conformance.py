"""Every built-in provider runs the provider conformance suite (`tests/gateway/conformance.py`) against a
real backend or a loopback fake of its wire format. This is the index: a chat or embedding provider added to
the registry without a `ProviderConformance` subclass fails here, naming it (rerankers, `can_rerank`, have
their own tests)."""

from __future__ import annotations

import importlib

from keel.gateway import registry
from tests.gateway.conformance import ProviderConformance

SUITES = {  # provider name → "test module:conformance class" that runs the suite against it
    "local": "tests.gateway.test_local_conformance:TestLocalLlamaConformance",
    "local_embed": "tests.gateway.test_local_embed:TestLocalEmbedConformance",
    "openai_compatible": "tests.gateway.test_openai_compatible:TestOpenAICompatibleConformance",
    "anthropic": "tests.gateway.test_anthropic:TestAnthropicConformance",
    "azure_openai": "tests.gateway.test_providers_openai_kinds:TestAzureOpenAIConformance",
    "gemini": "tests.gateway.test_providers_gemini:TestGeminiConformance",
    "bedrock": "tests.gateway.test_providers_bedrock:TestBedrockConformance",
    **{name: f"tests.gateway.test_providers_openai_kinds:Test{name.title()}Conformance" for name in (
        "vllm", "ollama", "tgi", "mistral", "groq", "together", "fireworks", "deepseek", "openrouter")},
}


def test_every_built_in_provider_has_a_conformance_suite():
    chat_or_embed = {n for n in registry.names() if not getattr(registry.get(n), "can_rerank", False)}
    missing = sorted(chat_or_embed - set(SUITES))
    assert not missing, f"providers without a conformance suite: {missing} (subclass ProviderConformance)"
    for name, spec in SUITES.items():
        module, _, cls = spec.partition(":")
        suite = getattr(importlib.import_module(module), cls)
        assert issubclass(suite, ProviderConformance), name
        assert registry.get(name).name == name
        flags = ("supports_tools", "supports_json_mode", "can_stream", "can_embed")
        declared = tuple(getattr(registry.get(name), f) for f in flags)
        assert declared == tuple(getattr(suite, f) for f in flags), (name, "flags differ from what its suite expects")
