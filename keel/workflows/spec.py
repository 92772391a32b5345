"""Workflow specs: parse YAML into a validated `WorkflowSpec`, reporting every problem with its line.

Example: `parse_spec("name: hello\\nsteps:\\n  - {id: greet, type: transform, output: hi}").step("greet")`.
"""

from __future__ import annotations

from typing import Any

import yaml
from croniter import croniter
from jsonschema import Draft202012Validator

from keel.core.errors import ValidationFailed
from keel.core import yamlsafe
from keel.workflows.errors import SpecError
from keel.workflows.templates import is_template, static_names
from keel.workflows.spec_checks import (
    BUILDERS,
    COMMON_KEYS,
    DEFAULT_APPROVAL_TIMEOUT_S,
    HOST,
    NAME,
    SECRET_NAME,
    STEP_ID,
    STEP_TYPES,
    TOP_KEYS,
    TYPE_KEYS,
    Checker,
    Path,
    Resolver,
    kind_of,
    parse_duration,
)
from keel.workflows.spec_types import DEFAULT_MAX_WAIT_S, StepSpec, TriggerSpec, WorkflowSpec

__all__ = [
    "STEP_TYPES",
    "StepSpec",
    "TriggerSpec",
    "WorkflowSpec",
    "parse_duration",
    "parse_spec",
    "secret_refs",
    "validate_inputs",
]


def validate_inputs(spec: WorkflowSpec, inputs: Any) -> None:
    """Check run inputs against the spec's inputs schema; ValidationFailed names the path of each problem."""
    validator = Draft202012Validator(spec.inputs_schema, format_checker=Draft202012Validator.FORMAT_CHECKER)
    errors = [{"path": e.json_path, "message": e.message} for e in validator.iter_errors(inputs)]
    if errors:
        first = errors[0]
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ValidationFailed(f"inputs for workflow '{spec.name}' are invalid: {first['path']}: {first['message']}"
                               f"{more}", fix="send inputs that match the workflow's inputs schema",
                               workflow=spec.name, errors=errors)


def secret_refs(spec: WorkflowSpec) -> list[tuple[str, str, str]]:
    """Every vault secret the spec names, as (secret, field, use): http headers and webhook triggers."""
    out = []
    for i, step in enumerate(spec.steps):
        if step.type != "http":
            continue
        for header, value in (step.config.get("headers") or {}).items():
            if is_template(value):
                for name in sorted(static_names(value, "secrets") or ()):
                    out.append((name, f"steps[{i}].headers.{header}", "http_header"))
    for j, trigger in enumerate(spec.triggers):
        if trigger.type == "webhook":
            out.append((trigger.config["secret"], f"triggers[{j}].secret", "webhook"))
    return out


def _load(text: str) -> tuple[yaml.Node | None, Any]:
    """The composed node tree (for line numbers) and the plain data, from one parse."""
    return yamlsafe.load(text)  # alias bombs and deep nesting are refused before anything walks them


def _step(ck: Checker, raw: Any, i: int) -> StepSpec | None:
    path: Path = ("steps", i)
    if not isinstance(raw, dict):
        ck.error(path, f"a step must be a mapping with id and type (got {kind_of(raw)})")
        return None
    typ = raw.get("type")
    if typ is None:
        ck.missing(path, "type")
    elif not isinstance(typ, str) or typ not in TYPE_KEYS:
        ck.error(path + ("type",), f"unknown step type {typ!r} (known: {', '.join(STEP_TYPES)})")
    else:
        ck.unknown_keys(raw, path, COMMON_KEYS + TYPE_KEYS[typ], f"a step of type {typ}")
    retries, backoff_s = 1, 1.0
    if (r := ck.mapping(raw, path, "retries")) is not None:
        ck.unknown_keys(r, path + ("retries",), ("max_attempts", "backoff_s"), "retries")
        retries = ck.number(r, path + ("retries",), "max_attempts", 1, 1, 10, integer=True)
        backoff_s = ck.number(r, path + ("retries",), "backoff_s", 1.0, 0.0, 86400.0)
    timeout_s = ck.duration(raw, path, "timeout_s", DEFAULT_APPROVAL_TIMEOUT_S if typ == "approval" else None)
    when = ck.expression(raw, path, "when", i)
    description = ck.text(raw, path, "description", template=False)
    config = BUILDERS[typ](ck, raw, path, i) if isinstance(typ, str) and typ in BUILDERS else {}
    if typ == "approval":
        config["timeout_s"] = timeout_s
        config["escalation_timeout_s"] = config["escalation_timeout_s"] or timeout_s
    config["description"] = description
    sid = raw.get("id")
    return StepSpec(id=sid if isinstance(sid, str) else "", type=str(typ), when=when, retries=retries,
                    backoff_s=backoff_s, timeout_s=timeout_s, config=config, line=ck.locate(path)[0] or 1)


def _trigger(ck: Checker, raw: Any, j: int, inputs_schema: dict[str, Any]) -> TriggerSpec | None:
    path: Path = ("triggers", j)
    if not isinstance(raw, dict):
        ck.error(path, f"a trigger must be a mapping with a type (got {kind_of(raw)})")
        return None
    typ = raw.get("type")
    if typ == "webhook":
        ck.unknown_keys(raw, path, ("type", "secret"), "a webhook trigger")
        return TriggerSpec("webhook", {"secret": ck.text(raw, path, "secret", required=True, template=False,
                                                         pattern=SECRET_NAME)})
    if typ == "schedule":
        ck.unknown_keys(raw, path, ("type", "cron", "inputs"), "a schedule trigger")
        cron = ck.text(raw, path, "cron", required=True, template=False)
        # five fields, or six with seconds last (croniter's convention) for sub-minute schedules
        if cron is not None and (len(cron.split()) not in (5, 6) or not croniter.is_valid(cron)):
            ck.error(path + ("cron",), f"{cron!r} is not a cron expression (e.g. '0 9 * * 1-5'; a sixth "
                                       "field is seconds)")
        inputs = ck.mapping(raw, path, "inputs", default={}) or {}
        for e in Draft202012Validator(inputs_schema).iter_errors(inputs):
            ck.error(path + ("inputs",) + tuple(e.absolute_path), f"inputs do not match the inputs schema: {e.message}")
        return TriggerSpec("schedule", {"cron": cron, "inputs": inputs})
    if typ is None:
        ck.missing(path, "type")
    else:
        ck.error(path + ("type",), f"unknown trigger type {typ!r} (known: webhook, schedule)")
    return None


def _allow_hosts(ck: Checker, data: dict[str, Any]) -> tuple[str, ...]:
    hosts = ck.str_list(data, (), "allow_hosts", default=[], allow_empty=True) or []
    out = []
    for j, h in enumerate(hosts):
        if not HOST.match(h.strip().lower()):
            ck.error(("allow_hosts", j), f"{h!r} is not 'host' or 'host:port' (no scheme or path)")
        out.append(h.strip().lower())
    return tuple(out)


def parse_spec(text: str, *, resolve_workflow: Resolver | None = None) -> WorkflowSpec:
    """Parse and validate a workflow spec; SpecError lists every problem with line, column and field.

    `resolve_workflow(name)` returns another stored workflow (or None), to check sub-workflow steps.
    """
    try:
        root, data = _load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError([{"line": mark.line + 1 if mark else None, "column": mark.column + 1 if mark else None,
                          "field": "(root)", "message": f"invalid YAML: {problem}"}]) from None
    if not isinstance(data, dict):
        raise SpecError([{"line": 1, "column": 1, "field": "(root)",
                          "message": f"a workflow spec must be a mapping with name and steps (got {kind_of(data)})"}])
    ck = Checker(root, resolve_workflow)
    ck.unknown_keys(data, (), TOP_KEYS, "a workflow")
    ck.name = ck.text(data, (), "name", required=True, template=False, pattern=NAME)
    if ck.name is not None and not NAME.match(ck.name):
        ck.name = None
    description = ck.text(data, (), "description", default="", template=False) or ""
    inputs_schema = ck.schema(data, (), "inputs", {"type": "object"}) or {"type": "object"}
    if isinstance(inputs_schema.get("properties"), dict):
        ck.input_names = set(inputs_schema["properties"])
    vars_ = ck.mapping(data, (), "vars", default={}) or {}
    ck.var_names = set(vars_)
    ck.allow_hosts = _allow_hosts(ck, data)
    max_wait_s = ck.duration(data, (), "max_wait", DEFAULT_MAX_WAIT_S)

    raw_steps = data.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        if raw_steps is None:
            ck.missing((), "steps")
        else:
            ck.error(("steps",), f"must be a non-empty list of steps (got {kind_of(raw_steps)})")
        raw_steps = []
    for i, raw in enumerate(raw_steps):
        if not isinstance(raw, dict):
            continue
        if (sid := raw.get("id")) is None:
            ck.missing(("steps", i), "id")
        elif not isinstance(sid, str) or not STEP_ID.match(sid):
            ck.error(("steps", i, "id"), f"step id {sid!r} must match {STEP_ID.pattern}")
        elif sid in ck.step_index:
            first = ck.locate(("steps", ck.step_index[sid]))[0]
            ck.error(("steps", i, "id"), f"duplicate step id '{sid}' (first defined on line {first})")
        else:
            ck.step_index[sid] = i
    steps = [_step(ck, raw, i) for i, raw in enumerate(raw_steps)]

    raw_triggers = data.get("triggers")
    if raw_triggers is not None and not isinstance(raw_triggers, list):
        ck.error(("triggers",), f"must be a list of triggers (got {kind_of(raw_triggers)})")
        raw_triggers = []
    triggers = [_trigger(ck, raw, j, inputs_schema) for j, raw in enumerate(raw_triggers or [])]

    if ck.errors:
        raise SpecError(sorted(ck.errors, key=lambda e: (e["line"] or 0, e["column"] or 0)), workflow=ck.name)
    return WorkflowSpec(name=str(ck.name), description=description, inputs_schema=inputs_schema, vars=vars_,
                        allow_hosts=ck.allow_hosts, triggers=tuple(t for t in triggers if t is not None),
                        steps=tuple(s for s in steps if s is not None), source=text,
                        max_wait_s=max_wait_s or DEFAULT_MAX_WAIT_S)
