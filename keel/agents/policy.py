"""The mandate check every tool call passes BEFORE it runs: the tool is in the mandate, its arguments are JSON
that the tool's schema accepts, the built-in allow-lists (collections, hosts, methods, tables, recipients)
and the author's rules hold, and the per-run and per-day call counts are not spent. The first failed check
refuses the call and names its rule; an allowed call may still need a person's approval.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from keel.agents.mandate import ApprovalRule, Mandate, ToolSpec
from keel.agents.rules import host_allowed, recipient_allowed


@dataclass(frozen=True)
class Decision:
    """`allowed`, or the `rule` that refused (`tools`, `parameters`, `rules[0]: amount <= 500`, …) and why."""

    allowed: bool
    rule: str | None = None
    detail: str = ""
    approval: ApprovalRule | None = None
    approval_rule: str | None = None


def refuse(rule: str, detail: str) -> Decision:
    return Decision(False, rule, detail)


def parse_arguments(raw: Any) -> tuple[Any, Decision | None]:
    """The call's arguments as JSON (OpenAI sends a string), or the refusal."""
    if isinstance(raw, dict):
        return raw, None
    if raw is None or raw == "":
        return {}, None
    try:
        args = json.loads(raw) if isinstance(raw, str) else None
    except ValueError:
        args = None
    if not isinstance(args, dict):
        return raw, refuse("arguments", "the arguments are not a JSON object")
    return args, None


def _builtin(m: Mandate, t: ToolSpec, args: dict[str, Any]) -> Decision | None:
    if t.kind in ("retrieve", "answer"):
        asked = args.get("collections") or list(m.collections)
        outside = [c for c in asked if c not in m.collections]
        if outside:
            return refuse("collections", f"collections {outside} are not in the mandate "
                                         f"({', '.join(m.collections)})")
    elif t.kind == "http":
        if not host_allowed(str(args.get("url", "")), t.allow_hosts):
            return refuse("allow_hosts", f"{str(args.get('url'))[:200]!r} is not an http(s) URL on an allowed host "
                                         f"({', '.join(t.allow_hosts)})")
        if args.get("method", "GET") not in t.methods:
            return refuse("methods", f"method {args.get('method')} is not allowed ({', '.join(t.methods)})")
    elif t.kind == "notify":
        if not recipient_allowed(args.get("to"), t.allow_recipients):
            return refuse("allow_recipients", f"{str(args.get('to'))[:200]!r} is not an allowed recipient "
                                              f"({', '.join(t.allow_recipients)})")
    elif t.kind == "start_workflow" and args.get("workflow") not in t.workflows:
        return refuse("workflows", f"workflow {str(args.get('workflow'))[:100]!r} is not one the mandate names "
                                   f"({', '.join(t.workflows)})")
    elif t.kind == "record" and args.get("table") not in t.tables:
        return refuse("tables", f"table {args.get('table')!r} is not allowed ({', '.join(t.tables)})")
    return None


def check_call(m: Mandate, name: str, raw_args: Any, *, calls_in_run: int, calls_today: Callable[[], int],
               approved: bool = False, run: dict[str, Any] | None = None) -> tuple[Decision, Any]:
    """(the decision, the parsed arguments) for one call of tool `name`; `approved`: a person already did;
    `run`: the run's spend so far (`cost`, `tokens`, `steps`) for approval rules."""
    tool = m.tools.get(name)
    if tool is None:
        return refuse("tools", f"tool {str(name)[:100]!r} is not in the mandate ({', '.join(m.tools)})"), raw_args
    args, bad = parse_arguments(raw_args)
    if bad is not None:
        return bad, args
    errors = sorted(tool.validator.iter_errors(args), key=lambda e: e.json_path)
    if errors:
        return refuse("parameters", f"{errors[0].json_path}: {errors[0].message}"[:500]), args
    if (d := _builtin(m, tool, args)) is not None:
        return d, args
    for i, rule in enumerate(tool.rules):
        if not rule.holds(args):
            return refuse(f"rules[{i}]: {rule.text}", f"the arguments break the rule {rule.text!r}"), args
    if tool.max_calls_per_run is not None and calls_in_run >= tool.max_calls_per_run:
        return refuse("max_calls_per_run", f"{name} was called {calls_in_run} times in this run "
                                           f"(at most {tool.max_calls_per_run})"), args
    if tool.max_calls_per_day is not None and calls_today() >= tool.max_calls_per_day:
        return refuse("max_calls_per_day", f"{name} reached its {tool.max_calls_per_day} calls a day"), args
    if not approved and (found := m.approval_for(name, args, run)) is not None:
        i, rule = found
        why = f"approvals[{i}]: {rule.tool}" + (f" when {rule.when.text}" if rule.when else "")
        return Decision(True, None, "needs approval", approval=rule, approval_rule=why), args
    if not approved and tool.kind == "ask_human":
        return Decision(True, None, "asks a person", approval=ApprovalRule("ask_human", None, ("reviewer", "admin"),
                                                                            7 * 86400.0),
                        approval_rule="ask_human"), args
    return Decision(True), args
