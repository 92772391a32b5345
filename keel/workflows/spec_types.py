"""The parsed spec's types: what `parse_spec` builds and the engine interprets (a leaf: no parsing here)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

DEFAULT_MAX_WAIT_S = 3600.0  # a workflow's `max_wait` when it sets none: providers go down for minutes


def _dropnone(d: dict[str, Any]) -> dict[str, Any]:
    return {k: copy.deepcopy(v) for k, v in d.items() if v is not None}


@dataclass(frozen=True)
class StepSpec:
    """One validated step; `config` holds its type-specific fields with defaults filled in."""

    id: str
    type: str
    when: str | None
    retries: int
    backoff_s: float
    timeout_s: float | None
    config: dict[str, Any]
    line: int

    def to_dict(self) -> dict[str, Any]:
        """The step as spec YAML would write it (None values left out)."""
        head = {"id": self.id, "type": self.type, "when": self.when, "timeout_s": self.timeout_s,
                "retries": {"max_attempts": self.retries, "backoff_s": self.backoff_s}}
        return _dropnone({**head, **self.config})


@dataclass(frozen=True)
class TriggerSpec:
    """A webhook (`config = {"secret": name}`) or schedule (`{"cron": ..., "inputs": {...}}`) trigger."""

    type: str
    config: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return _dropnone({"type": self.type, **self.config})


@dataclass(frozen=True)
class WorkflowSpec:
    """A parsed, validated workflow; build it with `parse_spec`."""

    name: str
    description: str
    inputs_schema: dict[str, Any]
    vars: dict[str, Any]
    allow_hosts: tuple[str, ...]
    triggers: tuple[TriggerSpec, ...]
    steps: tuple[StepSpec, ...]
    source: str
    max_wait_s: float = DEFAULT_MAX_WAIT_S  # longest a step waits for an unavailable provider (see waits.py)

    def step(self, step_id: str) -> StepSpec:
        """The step with this id; KeyError if there is none."""
        return self.steps[self.index(step_id)]

    def index(self, step_id: str) -> int:
        """Position of the step in `steps`; KeyError if there is none."""
        for i, s in enumerate(self.steps):
            if s.id == step_id:
                return i
        raise KeyError(f"workflow '{self.name}' has no step '{step_id}'")

    def to_dict(self) -> dict[str, Any]:
        """Normalised spec as plain data; `parse_spec(yaml.safe_dump(d))` gives the same spec back."""
        return {"name": self.name, "description": self.description,
                "inputs": copy.deepcopy(self.inputs_schema), "vars": copy.deepcopy(self.vars),
                "allow_hosts": list(self.allow_hosts), "max_wait": self.max_wait_s,
                "triggers": [t.to_dict() for t in self.triggers],
                "steps": [s.to_dict() for s in self.steps]}
