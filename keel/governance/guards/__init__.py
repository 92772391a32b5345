"""Guards: one protocol (`base.Guard`), one module per guard, registered like a third-party guard would be."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from keel.governance.guards.base import Guard
from keel.governance.guards.injection import InjectionGuard
from keel.governance.guards.pii import PiiGuard
from keel.governance.guards.secrets import SecretsGuard

_factories: dict[str, Callable[..., Guard]] = {}


def register(name: str, factory: Callable[..., Guard]) -> None:
    """Make a guard available to policies under `name` (built-ins use this too)."""
    _factories[name] = factory


def build(name: str, **options: Any) -> Guard:
    return _factories[name](**options)


def names() -> list[str]:
    return sorted(_factories)


register("pii", PiiGuard)  # the built-ins register as a third-party guard would
register("secrets", SecretsGuard)
register("injection", InjectionGuard)
