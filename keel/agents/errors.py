"""Errors a mandate author or an agent run's caller can cause."""

from __future__ import annotations

from typing import Any

from keel.core.errors import KeelError
from keel.workflows.errors import format_location

MANDATE_DOCS = "see docs/agents.md for the mandate format"


class MandateError(KeelError):
    """The mandate is invalid; `errors` lists every problem with its line, column and field."""

    code, status, title = "agent_mandate_invalid", 422, "Invalid agent mandate"

    def __init__(self, errors: list[dict[str, Any]], **ids: Any) -> None:
        if not errors:
            raise ValueError("MandateError needs at least one error")
        detail = format_location(errors[0])
        if len(errors) > 1:
            detail += f" (and {len(errors) - 1} more)"
        super().__init__(detail, fix=MANDATE_DOCS, errors=list(errors), **ids)
        self.errors = list(errors)


class AgentPaused(KeelError):
    """The agent's kill switch is on: no run starts and no run acts until it is resumed."""

    code, status, title = "agent_paused", 409, "Agent paused"
