"""Mandates: parse an agent's YAML into a validated `Mandate`, reporting every problem with its line.

A mandate is the agent's security boundary: the tools it may call (each with a JSON Schema for its
arguments, rules over them, allow-lists and call counts), the collections it may read, its budgets, which
calls need a person's approval. Whatever the model asks for, only what the mandate allows happens.

Example: `parse_mandate("name: helper\\nmodel: local-chat\\ngoal: answer\\ntools: {retrieve: {}}").tools`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from keel.agents import plugins
from keel.agents.errors import MandateError
from keel.agents.rules import Rule, parse_rule, valid_host_entry, valid_recipient_entry
from keel.core.errors import KeelError
from keel.core import yamlsafe
from keel.identity.principal import ROLES
from keel.observe.prompts import split_ref
from keel.workflows.spec_checks import NAME, SECRET_NAME, Checker, Path, kind_of

AGENT_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,47}$")  # an approval's `workflow` column holds `agent:<name>`
TOOL_NAME = re.compile(r"^[a-zA-Z][a-zA-Z0-9_-]{0,63}$")
TABLE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
TOP_KEYS = ("name", "description", "goal", "instructions", "prompt", "model", "collections", "tools", "budgets", "approvals",
            "mcp_servers", "memory")
THREADS = ("run", "user")  # memory.thread: the conversation is the run's own, or continues the end user's
BUDGET_KEYS = ("steps", "tokens", "cost", "wall_time", "max_tokens_per_call", "cost_per_day", "max_wait")
APPROVAL_KEYS = ("tool", "when", "approvers", "timeout")
HTTP_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]
BUILTIN_SCHEMAS: dict[str, dict[str, Any]] = {
    "retrieve": {"type": "object", "additionalProperties": False, "required": ["query"], "properties": {
        "query": {"type": "string", "minLength": 1, "maxLength": 2000},
        "collections": {"type": "array", "items": {"type": "string"}, "maxItems": 20},
        "top_k": {"type": "integer", "minimum": 1, "maximum": 20}}},
    "http": {"type": "object", "additionalProperties": False, "required": ["url"], "properties": {
        "method": {"type": "string", "enum": HTTP_METHODS}, "url": {"type": "string", "maxLength": 2000},
        "body": {}}},
    "record": {"type": "object", "additionalProperties": False, "required": ["table", "data"], "properties": {
        "table": {"type": "string", "pattern": TABLE.pattern}, "data": {"type": "object"},
        "key": {"type": "string", "maxLength": 300}}},
    "notify": {"type": "object", "additionalProperties": False, "required": ["to", "subject"], "properties": {
        "to": {"type": "string", "maxLength": 320}, "subject": {"type": "string", "maxLength": 300},
        "body": {"type": "string", "maxLength": 20000}}},
    "ask_human": {"type": "object", "additionalProperties": False, "required": ["question"], "properties": {
        "question": {"type": "string", "minLength": 1, "maxLength": 4000}}},
    "answer": {"type": "object", "additionalProperties": False, "required": ["question"], "properties": {
        "question": {"type": "string", "minLength": 1, "maxLength": 2000},
        "collections": {"type": "array", "items": {"type": "string"}, "maxItems": 20}}},
    "start_workflow": {"type": "object", "additionalProperties": False, "required": ["workflow"], "properties": {
        "workflow": {"type": "string", "maxLength": 64}, "inputs": {"type": "object"}}},
    "remember": {"type": "object", "additionalProperties": False, "required": ["note"], "properties": {
        "note": {"type": "string", "minLength": 1, "maxLength": 2000}}},
    "recall": {"type": "object", "additionalProperties": False, "required": ["query"], "properties": {
        "query": {"type": "string", "minLength": 1, "maxLength": 500}}},
}
BUILTIN_DESCRIPTIONS = {
    "retrieve": "Search the knowledge collections this agent may read; returns the best passages.",
    "http": "Call an HTTP API on an allowed host.",
    "record": "Write a row into one of Keel's record tables.",
    "notify": "Send an email to an allowed recipient.",
    "ask_human": "Ask a person a question and wait for the answer.",
    "answer": "Answer a question from the knowledge collections this agent may read, with citations.",
    "start_workflow": "Start one of the workflows this agent may start, with its inputs.",
    "remember": "Keep a note for later runs of this agent (long-term memory).",
    "recall": "Find notes earlier runs of this agent kept.",
}
# the keys each kind of tool takes besides description, rules and call counts
KIND_KEYS = {"retrieve": (), "http": ("allow_hosts", "methods", "headers"), "record": ("tables",),
             "notify": ("allow_recipients",), "ask_human": (), "endpoint": ("endpoint", "parameters", "headers"),
             "python": ("entry_point",), "mcp": ("mcp", "tool"), "answer": (), "start_workflow": ("workflows",),
             "remember": (), "recall": ()}
COMMON_TOOL_KEYS = ("description", "rules", "max_calls_per_run", "max_calls_per_day")


@dataclass(frozen=True)
class ToolSpec:
    """One tool the mandate allows: a built-in (`kind` = its name), an HTTP `endpoint` that takes the arguments, or
    a Python tool (`python`) from a `keel.tools` entry point."""

    name: str
    kind: str
    description: str
    parameters: dict[str, Any]
    rules: tuple[Rule, ...] = ()
    allow_hosts: tuple[str, ...] = ()
    methods: tuple[str, ...] = ("GET",)
    allow_recipients: tuple[str, ...] = ()
    tables: tuple[str, ...] = ()
    max_calls_per_run: int | None = None
    max_calls_per_day: int | None = None
    endpoint: str | None = None
    headers: dict[str, str] = field(default_factory=dict)  # header → vault secret name
    entry_point: str | None = None
    mcp_server: str | None = None  # kind `mcp`: the mandate's `mcp_servers` entry, and the tool's name there
    remote: str | None = None
    workflows: tuple[str, ...] = ()  # start_workflow: the workflows it may start

    @cached_property
    def validator(self) -> Draft202012Validator:
        """The checker of its arguments, built once (every call of the tool is checked with it)."""
        return Draft202012Validator(self.parameters)

    @cached_property
    def quick_to_check(self) -> bool:
        """Whether checking a short call's arguments takes time bounded by their length: not with `uniqueItems`
        (pairwise over a list the model writes), whose calls are checked off the event loop whatever their size."""
        return "uniqueItems" not in json.dumps(self.parameters)

    def openai(self) -> dict[str, Any]:
        """The tool as OpenAI's `tools` entry."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


@dataclass(frozen=True)
class McpServerSpec:
    """An MCP server the mandate's `mcp` tools use: `command`, the name of a command an admin allowed
    (setting `mcp_commands`), run over stdio; or `url`, streamable HTTP, with `headers` from the team's vault."""

    name: str
    command: str | None = None
    url: str | None = None
    headers: dict[str, str] = field(default_factory=dict)  # header → vault secret name


@dataclass(frozen=True)
class ApprovalRule:
    """Calls of `tool` (where `when` holds, or all) wait for a person with one of `approvers`' roles."""

    tool: str
    when: Rule | None
    approvers: tuple[str, ...]
    timeout_s: float


@dataclass(frozen=True)
class Budgets:
    """Per-run limits; the run stops (logged, with the budget's name) when one is spent."""

    steps: int = 10
    tokens: int = 20000
    cost: float | None = None
    wall_time_s: float = 300.0
    max_tokens_per_call: int = 1024
    cost_per_day: float | None = None  # all runs of the agent, the last 24 hours
    max_wait_s: float | None = None  # longest a model call waits for an unavailable provider (None: as workflows)


@dataclass(frozen=True)
class Mandate:
    """A parsed, validated mandate; build it with `parse_mandate`."""

    name: str
    description: str
    goal: str
    instructions: str
    model: str
    collections: tuple[str, ...]
    tools: dict[str, ToolSpec]
    budgets: Budgets
    approvals: tuple[ApprovalRule, ...]
    source: str
    mcp_servers: dict[str, McpServerSpec] = field(default_factory=dict)
    thread: str = "run"  # memory.thread: `user` continues the end user's conversation across runs
    prompt: str | None = None  # a registry prompt (name@label): its messages replace goal + instructions as system

    def secret_refs(self) -> list[tuple[str, str, str]]:
        """(secret, field, use) for every vault secret the tools (and MCP servers) send as a header."""
        return [(secret, f"tools.{t.name}.headers.{h}", "http_header") for t in self.tools.values()
                for h, secret in t.headers.items()] + [
            (secret, f"mcp_servers.{s.name}.headers.{h}", "http_header") for s in self.mcp_servers.values()
            for h, secret in s.headers.items()]

    def approval_for(self, tool: str, args: Any, run: dict[str, Any] | None = None) -> tuple[int, ApprovalRule] | None:
        """The first approval rule that sends this call to a person; `when` sees the arguments and, as `run.cost`,
        `run.tokens` and `run.steps`, what the run spent so far."""
        seen = {**args, "run": run or {}} if isinstance(args, dict) else args
        for i, a in enumerate(self.approvals):
            if a.tool == tool and (a.when is None or a.when.holds(seen)):
                return i, a
        return None


def _load(text: str) -> tuple[yaml.Node | None, Any]:
    return yamlsafe.load(text)  # alias bombs and deep nesting are refused before anything walks them


def _int(ck: Checker, raw: dict[str, Any], path: Path, key: str, hi: int) -> int | None:
    return ck.number(raw, path, key, None, 1, hi, integer=True)


def _tool(ck: Checker, name: Any, raw: Any) -> ToolSpec | None:
    path: Path = ("tools", str(name))
    if not isinstance(name, str) or not TOOL_NAME.match(name):
        ck.error(path, f"tool name {name!r} must match {TOOL_NAME.pattern}", at_key=True)
        return None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        ck.error(path, f"a tool must be a mapping (got {kind_of(raw)})")
        return None
    kind = name if name in BUILTIN_SCHEMAS else "python" if "entry_point" in raw else "mcp" if "mcp" in raw \
        else "endpoint"
    ck.unknown_keys(raw, path, COMMON_TOOL_KEYS + KIND_KEYS[kind],
                    f"the built-in tool {name}" if kind in BUILTIN_SCHEMAS else f"a{'n' if kind == 'endpoint' else ''} "
                                                                                  f"{kind} tool")
    entry_point, plugin = None, None
    if kind == "python":
        endpoint, params = None, {"type": "object"}
        entry_point = ck.text(raw, path, "entry_point", required=True, template=False, pattern=TOOL_NAME)
        if entry_point is not None:
            try:
                plugin = plugins.get(entry_point)
                params = {"additionalProperties": False, **plugin.parameters}
                Draft202012Validator.check_schema(params)
                if params.get("type") != "object":
                    raise ValueError("its parameters are not a JSON Schema with type: object")
            except (KeelError, SchemaError, ValueError) as exc:
                ck.error(path + ("entry_point",), getattr(exc, "detail", None) or getattr(exc, "message", str(exc)))
    elif kind == "mcp":  # the schema and description come from the server's listing when a run starts
        endpoint, params = None, {"type": "object"}
        ck.text(raw, path, "mcp", required=True, template=False, pattern=TOOL_NAME)
        ck.text(raw, path, "tool", template=False, pattern=TOOL_NAME)
    elif kind == "endpoint":
        endpoint = ck.text(raw, path, "endpoint", required=True, template=False)
        if endpoint is not None and not re.match(r"^https?://[^/\s]+", endpoint):
            ck.error(path + ("endpoint",), f"{endpoint!r} is not an http(s) URL (a tool that is not built in "
                                           f"({', '.join(BUILTIN_SCHEMAS)}) is an HTTP endpoint Keel POSTs to)")
        params = ck.schema(raw, path, "parameters", None)
        if raw.get("parameters") is None:
            ck.missing(path, "parameters")
        if params is not None and params.get("type") != "object":
            ck.error(path + ("parameters",), "must be a JSON Schema with type: object")
        params = {"additionalProperties": False, **(params or {"type": "object"})}
    else:
        endpoint, params = None, BUILTIN_SCHEMAS[kind]
    description = ck.text(raw, path, "description", template=False) or BUILTIN_DESCRIPTIONS.get(kind) or (
        str(plugin.description) if plugin is not None else name)
    rules = []
    for j, text in enumerate(ck.str_list(raw, path, "rules", default=[], allow_empty=True) or []):
        try:
            rules.append(parse_rule(text, name, params))
        except ValueError as exc:
            ck.error(path + ("rules", j), str(exc))
    hosts = tuple(h.strip().lower() for h in ck.str_list(raw, path, "allow_hosts", default=[]) or [])
    for j, h in enumerate(hosts):
        if not valid_host_entry(h):
            ck.error(path + ("allow_hosts", j), f"{h!r} is not 'host', 'host:port' or '*.domain'")
    if kind == "http" and not hosts:
        ck.missing(path, "allow_hosts")
    recipients = tuple(ck.str_list(raw, path, "allow_recipients", default=[]) or [])
    for j, r in enumerate(recipients):
        if not valid_recipient_entry(r):
            ck.error(path + ("allow_recipients", j), f"{r!r} is not 'name@domain' or '*@domain'")
    if kind == "notify" and not recipients:
        ck.missing(path, "allow_recipients")
    tables = tuple(ck.str_list(raw, path, "tables", default=[]) or [])
    for j, t in enumerate(tables):
        if not TABLE.match(t):
            ck.error(path + ("tables", j), f"table {t!r} must match {TABLE.pattern}")
    if kind == "record" and not tables:
        ck.missing(path, "tables")
    headers = ck.mapping(raw, path, "headers", default={}) or {}
    for h, ref in headers.items():
        if not isinstance(ref, dict) or set(ref) != {"secret"} or not isinstance(ref["secret"], str) \
                or not SECRET_NAME.match(ref["secret"]):
            ck.error(path + ("headers", h), "a header's value is {secret: NAME}, a vault secret of the agent's team")
    methods = tuple(ck.str_list(raw, path, "methods", default=["GET"], choices=HTTP_METHODS) or ["GET"])
    workflows = tuple(ck.str_list(raw, path, "workflows", default=[]) or [])
    for j, w in enumerate(workflows):
        if not NAME.match(w):
            ck.error(path + ("workflows", j), f"workflow {w!r} must match {NAME.pattern}")
    if kind == "start_workflow":
        if not workflows:
            ck.missing(path, "workflows")
        params = {**params, "properties": {**params["properties"], "workflow": {"type": "string",
                                                                                "enum": list(workflows)}}}
    return ToolSpec(name=name, kind=kind, description=description, parameters=params, rules=tuple(rules),
                    allow_hosts=hosts, methods=methods, allow_recipients=recipients, tables=tables,
                    max_calls_per_run=_int(ck, raw, path, "max_calls_per_run", 10_000),
                    max_calls_per_day=_int(ck, raw, path, "max_calls_per_day", 10_000_000), endpoint=endpoint,
                    headers={h: r["secret"] for h, r in headers.items() if isinstance(r, dict) and "secret" in r},
                    entry_point=entry_point, mcp_server=raw.get("mcp") if kind == "mcp" else None,
                    remote=(raw.get("tool") or name) if kind == "mcp" else None, workflows=workflows)


def _mcp_servers(ck: Checker, data: dict[str, Any], tools: dict[str, ToolSpec]) -> dict[str, McpServerSpec]:
    raw_servers = ck.mapping(data, (), "mcp_servers", default={}) or {}
    servers = {}
    for name, raw in raw_servers.items():
        path: Path = ("mcp_servers", str(name))
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            ck.error(path, f"server name {name!r} must match {TOOL_NAME.pattern}", at_key=True)
            continue
        if not isinstance(raw, dict):
            ck.error(path, f"an MCP server is a mapping with command (or url and headers); got {kind_of(raw)}")
            continue
        ck.unknown_keys(raw, path, ("command", "url", "headers"), "an MCP server")
        command = ck.text(raw, path, "command", template=False, pattern=TOOL_NAME)
        url = ck.text(raw, path, "url", template=False)
        if (command is None) == (url is None):
            ck.error(path, "an MCP server has either `command` (a name from the admin setting mcp_commands) or "
                           "`url` (streamable HTTP)")
        if url is not None and not re.match(r"^https?://[^/\s]+", url):
            ck.error(path + ("url",), f"{url!r} is not an http(s) URL")
        headers = ck.mapping(raw, path, "headers", default={}) or {}
        for h, ref in headers.items():
            if not isinstance(ref, dict) or set(ref) != {"secret"} or not isinstance(ref["secret"], str) \
                    or not SECRET_NAME.match(ref["secret"]):
                ck.error(path + ("headers", h), "a header's value is {secret: NAME}, a vault secret of the agent's team")
        if headers and command is not None:
            ck.error(path + ("headers",), "headers go to an HTTP server (url); a command server takes none")
        servers[name] = McpServerSpec(name=name, command=command, url=url, headers={
            h: r["secret"] for h, r in headers.items() if isinstance(r, dict) and isinstance(r.get("secret"), str)})
    for t in tools.values():
        if t.kind == "mcp" and t.mcp_server not in servers and isinstance(t.mcp_server, str):
            ck.error(("tools", t.name, "mcp"), f"MCP server {t.mcp_server!r} is not in this mandate's mcp_servers "
                                              f"({', '.join(servers) or 'none'})")
    return servers


def _budgets(ck: Checker, data: dict[str, Any]) -> Budgets:
    raw = ck.mapping(data, (), "budgets", default={}) or {}
    ck.unknown_keys(raw, ("budgets",), BUDGET_KEYS, "budgets")
    path: Path = ("budgets",)
    d = Budgets()
    return Budgets(steps=ck.number(raw, path, "steps", d.steps, 1, 1000, integer=True),
                   tokens=ck.number(raw, path, "tokens", d.tokens, 1, 100_000_000, integer=True),
                   cost=ck.number(raw, path, "cost", None, 0.0, 1e9),
                   wall_time_s=ck.duration(raw, path, "wall_time", d.wall_time_s) or d.wall_time_s,
                   max_tokens_per_call=ck.number(raw, path, "max_tokens_per_call", d.max_tokens_per_call, 1,
                                                 1_000_000, integer=True),
                   cost_per_day=ck.number(raw, path, "cost_per_day", None, 0.0, 1e9),
                   max_wait_s=ck.duration(raw, path, "max_wait", None))


def _approval(ck: Checker, raw: Any, j: int, tools: dict[str, ToolSpec]) -> ApprovalRule | None:
    path: Path = ("approvals", j)
    if not isinstance(raw, dict):
        ck.error(path, f"an approval rule is a mapping with tool (and when, approvers, timeout); got {kind_of(raw)}")
        return None
    ck.unknown_keys(raw, path, APPROVAL_KEYS, "an approval rule")
    tool = ck.text(raw, path, "tool", required=True, template=False)
    if tool is not None and tool not in tools:
        ck.error(path + ("tool",), f"tool {tool!r} is not in this mandate's tools ({', '.join(tools) or 'none'})")
    when = None
    if raw.get("when") is not None:
        try:
            when = parse_rule(str(raw["when"]), tool, tools[tool].parameters if tool in tools else None)
            if when.path[0] == "run" and (len(when.path) != 2 or when.path[1] not in ("cost", "tokens", "steps")):
                raise ValueError(f"{raw['when']!r}: the run's spend is run.cost, run.tokens or run.steps")
        except ValueError as exc:
            ck.error(path + ("when",), str(exc))
    approvers = ck.str_list(raw, path, "approvers", default=["reviewer", "admin"], choices=ROLES)
    timeout = ck.duration(raw, path, "timeout", 7 * 86400.0)
    return ApprovalRule(tool=str(tool), when=when, approvers=tuple(approvers or ()), timeout_s=float(timeout or 1))


def parse_mandate(text: str) -> Mandate:
    """Parse and validate a mandate; MandateError lists every problem with line, column and field."""
    try:
        root, data = _load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise MandateError([{"line": mark.line + 1 if mark else None, "column": mark.column + 1 if mark else None,
                             "field": "(root)", "message": f"invalid YAML: {problem}"}]) from None
    if not isinstance(data, dict):
        raise MandateError([{"line": 1, "column": 1, "field": "(root)",
                             "message": f"a mandate must be a mapping with name, model, goal and tools "
                                        f"(got {kind_of(data)})"}])
    ck = Checker(root, None)
    ck.unknown_keys(data, (), TOP_KEYS, "a mandate")
    name = ck.text(data, (), "name", required=True, template=False, pattern=AGENT_NAME)
    model = ck.text(data, (), "model", required=True, template=False)
    goal = ck.text(data, (), "goal", required=True, template=False)
    instructions = ck.text(data, (), "instructions", default="", template=False) or ""
    prompt = ck.text(data, (), "prompt", template=False)
    if prompt is not None:
        try:
            split_ref(prompt)
        except KeelError as exc:
            ck.error(("prompt",), exc.detail)
    description = ck.text(data, (), "description", default="", template=False) or ""
    collections = ck.str_list(data, (), "collections", default=[], allow_empty=True) or []
    for j, c in enumerate(collections):
        if not NAME.match(c):
            ck.error(("collections", j), f"collection {c!r} must match {NAME.pattern}")
    raw_tools = ck.mapping(data, (), "tools", required=True, default={}) or {}
    tools = {t.name: t for t in (_tool(ck, n, raw) for n, raw in raw_tools.items()) if t is not None}
    for reader in ("retrieve", "answer"):
        if reader in tools and not collections:
            ck.error(("tools", reader), f"the {reader} tool needs the mandate's `collections` (none listed)")
    memory = ck.mapping(data, (), "memory", default={}) or {}
    ck.unknown_keys(memory, ("memory",), ("thread",), "memory")
    thread = ck.text(memory, ("memory",), "thread", default="run", template=False) or "run"
    if thread not in THREADS:
        ck.error(("memory", "thread"), f"thread {thread!r} is not one of {', '.join(THREADS)}")
    mcp_servers = _mcp_servers(ck, data, tools)
    budgets = _budgets(ck, data)
    raw_approvals = data.get("approvals") or []
    if not isinstance(raw_approvals, list):
        ck.error(("approvals",), f"must be a list of approval rules (got {kind_of(raw_approvals)})")
        raw_approvals = []
    approvals = [_approval(ck, raw, j, tools) for j, raw in enumerate(raw_approvals)]
    for t in tools.values():
        Draft202012Validator(t.parameters)  # checked above; builds once so a bad one fails here, not mid-run
    if ck.errors:
        raise MandateError(sorted(ck.errors, key=lambda e: (e["line"] or 0, e["column"] or 0)),
                           agent=name if isinstance(name, str) else None)
    return Mandate(name=str(name), description=description, goal=str(goal), instructions=instructions,
                   model=str(model), collections=tuple(collections), tools=tools, budgets=budgets,
                   approvals=tuple(a for a in approvals if a is not None), source=text, mcp_servers=mcp_servers,
                   thread=thread, prompt=prompt)
