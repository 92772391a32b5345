"""Python tools from other packages: an entry point in the `keel.tools` group names a `Tool` (found the same
way `keel.providers` finds providers). A mandate uses one with `entry_point: <name>`; its arguments are
checked against the tool's own JSON Schema and the mandate's rules before it is called, like any tool.

A package ships one with, in its `pyproject.toml`:

    [project.entry-points."keel.tools"]
    crm_lookup = "acme_tools:CRMLookup"
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any, Protocol, runtime_checkable

from keel.core.errors import KeelError

GROUP = "keel.tools"


@runtime_checkable
class Tool(Protocol):
    """A tool Keel can call. `parameters` is the JSON Schema (type object) of its arguments; `call` gets
    arguments already checked against it and the mandate, and `context` (run id, agent, team, idempotency
    key — a side effect should be applied once per key); it returns JSON-serialisable data or raises a
    `KeelError` the model is told about. Semantics: Keel calls it only for allowed calls, at most once per
    key unless a crash falls between the effect and its checkpoint."""

    description: str
    parameters: dict[str, Any]

    async def call(self, arguments: dict[str, Any], context: dict[str, Any]) -> Any: ...


class ToolNotFound(KeelError):
    """No installed package provides the named tool."""

    code, status, title = "agent_tool_not_found", 422, "Tool not found"


_tools: dict[str, Tool] = {}


def register(name: str, tool: Tool) -> None:
    """Make `tool` available to mandates as `entry_point: <name>`."""
    _tools[name] = tool


def get(name: str) -> Tool:
    """The tool `name`, loading the `keel.tools` entry points on first use; ToolNotFound names the known ones."""
    if name not in _tools:
        for ep in entry_points(group=GROUP):
            if ep.name == name:
                obj = ep.load()
                register(name, obj() if isinstance(obj, type) else obj)
    if name not in _tools:
        known = sorted({ep.name for ep in entry_points(group=GROUP)} | set(_tools))
        raise ToolNotFound(f"no installed package provides the tool {name!r} (known: {', '.join(known) or 'none'})",
                           fix=f"install the package that registers it under [project.entry-points.\"{GROUP}\"]")
    tool = _tools[name]
    if not isinstance(tool, Tool) or not isinstance(tool.parameters, dict):
        raise ToolNotFound(f"the {GROUP} entry point {name!r} is not a tool (description, parameters, async call)",
                           fix="fix the package that registers it")
    return tool
