"""The router: picks the deployment that serves a call (the terminal step of the governed path)."""

from __future__ import annotations

from typing import Any

from keel.core.settings import Settings
from keel.gateway.pipeline import Call, Gateway, pick_weighted


class Router:
    """Weighted choice among an alias's deployments."""

    def __init__(self, gateway: Gateway, settings: Settings) -> None:
        self.gateway = gateway
        self.settings = settings

    async def call(self, call: Call) -> Any:
        cfg = pick_weighted(self.gateway.resolve(call))
        return await self.gateway.invoke(call, cfg)
