"""The provider registry. Built-in providers register exactly as a third-party plugin would:
`register("name", factory)`, or an entry point in the `keel.providers` group."""

from __future__ import annotations

import importlib
import logging
from importlib.metadata import entry_points

from keel.core.errors import ConfigError
from keel.gateway.protocol import ProviderFactory

log = logging.getLogger("keel.gateway.registry")

_factories: dict[str, ProviderFactory] = {}
_BUILTINS = {
    "local": "keel.gateway.providers.local_llama:LocalLlamaProvider",
    "local_embed": "keel.gateway.providers.local_embed:LocalEmbedProvider",
    "openai_compatible": "keel.gateway.providers.openai_compatible:OpenAICompatibleProvider",
    "anthropic": "keel.gateway.providers.anthropic:AnthropicProvider",
    "local_rerank": "keel.gateway.providers.local_rerank:LocalRerankProvider",
    "rerank_api": "keel.gateway.providers.rerank_api:RerankAPIProvider",
    "azure_openai": "keel.gateway.providers.azure_openai:AzureOpenAIProvider",
    "gemini": "keel.gateway.providers.gemini:GeminiProvider",
    "bedrock": "keel.gateway.providers.bedrock:BedrockProvider",
    **{name: f"keel.gateway.providers.presets:{name.upper()}" for name in (
        "vllm", "ollama", "tgi", "mistral", "groq", "together", "fireworks", "deepseek", "openrouter")},
}
_loaded_entry_points = False


def register(name: str, factory: ProviderFactory) -> None:
    """Make a provider available to `keel.yaml` under `provider: <name>`."""
    _factories[name] = factory


def _load(spec: str) -> ProviderFactory:
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def get(name: str) -> ProviderFactory:
    global _loaded_entry_points
    if name in _factories:
        return _factories[name]
    if name in _BUILTINS:
        register(name, _load(_BUILTINS[name]))
        return _factories[name]
    if not _loaded_entry_points:
        _loaded_entry_points = True
        for ep in entry_points(group="keel.providers"):
            register(ep.name, ep.load())
        if name in _factories:
            return _factories[name]
    raise ConfigError(f"unknown provider {name!r}",
                      fix=f"use one of: {', '.join(sorted(set(_BUILTINS) | set(_factories)))}, or install its plugin")


def names() -> list[str]:
    return sorted(set(_BUILTINS) | set(_factories))
