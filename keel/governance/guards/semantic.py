"""Semantic features for the injection guard: sentence vectors from the embedding model Keel bundles.

The vectors come from the gateway's `local_embed` provider (all-MiniLM-L6-v2 int8 on ONNX Runtime, the
same one knowledge uses), built once per process on first use and shared by every guard instance — a
named singleton, since an ONNX session holds ~25 MB and loading it takes a moment. Texts are cut to
MAX_TOKENS word pieces: a guard judges sentence-sized segments, and the cost grows with the length.
"""

from __future__ import annotations

import threading

import numpy as np

from keel.core.settings import DeploymentConfig
from keel.gateway.protocol import ProviderContext
from keel.gateway.providers.local_embed import LocalEmbedProvider

MAX_TOKENS = 128
DIM = 384

_lock = threading.Lock()
_provider: LocalEmbedProvider | None = None


def provider() -> LocalEmbedProvider:
    """The process's guard embedder (one ONNX Runtime thread, so a guard never takes every core)."""
    global _provider
    with _lock:
        if _provider is None:
            cfg = DeploymentConfig(alias="guard-embed", provider="local_embed", options={"max_length": MAX_TOKENS})
            _provider = LocalEmbedProvider(cfg, ProviderContext(get_secret=lambda _name: "", threads=1))
        return _provider


def embed(texts: list[str]) -> np.ndarray:
    """Unit vectors, shape (len(texts), DIM), float32."""
    if not texts:
        return np.zeros((0, DIM), np.float32)
    return provider().embed_sync(texts)
