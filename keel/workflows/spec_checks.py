"""Field readers and per-step-type builders behind `parse_spec`: each records located errors.

A builder reads one step's raw mapping and returns its normalised `config`; `Checker` keeps the
errors, the YAML node tree (for line and column) and what later checks need (step order, inputs).
"""

from __future__ import annotations

import copy
import datetime as dt
import math
import re
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

import jinja2
import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from keel.core.errors import KeelError
from keel.identity.principal import ROLES
from keel.observe.prompts import split_ref
from keel.workflows.spec_types import WorkflowSpec
from keel.workflows.templates import is_template, referenced_attrs, static_names, template_refs

Path = tuple[str | int, ...]
Resolver = Callable[[str], WorkflowSpec | None]

NAME = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
STEP_ID = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
SECRET_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")
HOST = re.compile(r"^(?:\[[0-9a-f:.]+\]|(?:\*\.)?[a-z0-9_](?:[a-z0-9_.-]*[a-z0-9_])?)(?::\d{1,5})?$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
TOP_KEYS = ("name", "description", "inputs", "vars", "allow_hosts", "max_wait", "triggers", "steps")
COMMON_KEYS = ("id", "type", "when", "retries", "timeout_s", "description")
TYPE_KEYS: dict[str, tuple[str, ...]] = {
    "llm": ("prompt", "system", "model", "max_tokens", "temperature", "output_schema"),
    "retrieve": ("collections", "query", "top_k"),
    "answer": ("collections", "question", "model", "max_tokens"),
    "http": ("method", "url", "headers", "body", "expect_status"),
    "transform": ("output",),
    "condition": ("if", "then", "else"),
    "approval": ("approvers", "show", "editable", "on_timeout", "escalate_to", "escalation_timeout_s",
                 "instructions"),
    "notify": ("webhook", "email", "subject", "body"),
    "wait": ("seconds", "until"),
    "workflow": ("name", "inputs"),
    "record": ("table", "data", "key"),
}
STEP_TYPES = tuple(TYPE_KEYS)
TEMPLATE_ROOTS = ("inputs", "vars", "steps", "run")
HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
DEFAULT_APPROVAL_TIMEOUT_S = 7 * 86400.0


def parse_duration(value: Any) -> float:
    """Seconds from 30, 1.5, "30s", "5m", "4h", "2d" or "1w"; ValueError for anything else."""
    bad = ValueError(f"invalid duration {value!r} (use seconds, or a number with s, m, h, d or w: '30s', '2d')")
    if isinstance(value, bool):
        raise bad
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0:
            raise bad
        return float(value)
    if isinstance(value, str) and (m := _DURATION.match(value)):
        return float(m.group(1)) * _UNITS[m.group(2)]
    raise bad


def _host_allowed(host: str, port: int, allow_hosts: Iterable[str]) -> bool:
    """Same rule as egress: "host" allows any port, "host:port" one port, "*.domain" its subdomains."""
    for entry in allow_hosts:
        e_host, _, e_port = entry.rpartition(":") if entry.rsplit(":", 1)[-1].isdigit() else (entry, "", "")
        if e_port and int(e_port) != port:
            continue
        if host == e_host or (e_host.startswith("*.") and host.endswith(e_host[1:])):
            return True
    return False


def _field(path: Path) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(root)"


def kind_of(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), type(value).__name__)


class Checker:
    """Collects located errors while the builders below read and normalise the spec."""

    def __init__(self, root: yaml.Node | None, resolve: Resolver | None) -> None:
        self.root, self.resolve = root, resolve
        self.errors: list[dict[str, Any]] = []
        self.name: str | None = None
        self.step_index: dict[str, int] = {}
        self.input_names: set[str] | None = None
        self.var_names: set[str] = set()
        self.allow_hosts: tuple[str, ...] = ()

    def locate(self, path: Path, at_key: bool = False) -> tuple[int | None, int | None]:
        """1-based line and column of the node at `path`, or of its nearest existing parent."""
        node = self.root
        if node is None:
            return None, None
        for n, part in enumerate(path):
            nxt = None
            if isinstance(node, yaml.MappingNode):
                for k, v in node.value:
                    if isinstance(k, yaml.ScalarNode) and k.value == str(part):
                        nxt = k if at_key and n == len(path) - 1 else v
                        break
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
                nxt = node.value[part]
            if nxt is None:
                break
            node = nxt
        return node.start_mark.line + 1, node.start_mark.column + 1

    def error(self, path: Path, message: str, *, at_key: bool = False) -> None:
        line, column = self.locate(path, at_key)
        self.errors.append({"line": line, "column": column, "field": _field(path), "message": message})

    def missing(self, path: Path, key: str) -> None:
        self.error(path + (key,), f"missing required field '{key}'")

    def unknown_keys(self, raw: dict[str, Any], path: Path, allowed: Iterable[str], what: str) -> None:
        allowed = tuple(allowed)
        for key in raw:
            if key not in allowed:
                self.error(path + (key,), f"unknown key '{key}' for {what} (allowed: {', '.join(allowed)})",
                           at_key=True)

    # -- typed readers: each returns the normalised value or the default, recording an error if bad

    def _get(self, raw: dict[str, Any], path: Path, key: str, required: bool) -> Any:
        """The value under `key`, None when absent (an error if it is required)."""
        if raw.get(key) is None and required:
            self.missing(path, key)
        return raw.get(key)

    def text(self, raw: dict[str, Any], path: Path, key: str, i: int = -1, *, required: bool = False,
             default: str | None = None, template: bool = True, secrets: bool = False,
             pattern: re.Pattern[str] | None = None) -> str | None:
        value, fp = self._get(raw, path, key, required), path + (key,)
        if not isinstance(value, str):
            if value is not None:
                self.error(fp, f"must be a string (got {kind_of(value)})")
            return default
        if pattern is not None and not pattern.match(value):
            self.error(fp, f"{value!r} must match {pattern.pattern}")
        if template:
            self.template(fp, value, i, secrets=secrets)
        return value

    def expression(self, raw: dict[str, Any], path: Path, key: str, i: int, *, required: bool = False) -> str | None:
        """A `when`/`if` condition; a bare expression (`inputs.x > 3`) is wrapped into `{{ ... }}`."""
        value = raw.get(key)
        if isinstance(value, bool):
            value = "{{ true }}" if value else "{{ false }}"
        elif isinstance(value, (int, float)):
            value = "{{ " + repr(value) + " }}"
        elif isinstance(value, str) and not is_template(value):
            value = "{{ " + value + " }}"
        return self.text({key: value}, path, key, i, required=required)

    def number(self, raw: dict[str, Any], path: Path, key: str, default: Any, lo: float, hi: float, *,
               integer: bool = False) -> Any:
        value = raw.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) \
                or not lo <= value <= hi:
            kind = "an integer" if integer else "a number"
            self.error(path + (key,), f"must be {kind} from {lo} to {hi} (got {value!r})")
            return default
        return value if integer else float(value)

    def duration(self, raw: dict[str, Any], path: Path, key: str, default: float | None) -> float | None:
        if raw.get(key) is None:
            return default
        try:
            seconds = parse_duration(raw[key])
        except ValueError as exc:
            self.error(path + (key,), str(exc))
            return default
        if seconds <= 0:
            self.error(path + (key,), "must be greater than 0")
        return seconds

    def str_list(self, raw: dict[str, Any], path: Path, key: str, *, required: bool = False,
                 default: list[str] | None = None, choices: Iterable[str] | None = None,
                 allow_empty: bool = False) -> list[str] | None:
        value, fp = self._get(raw, path, key, required), path + (key,)
        if value is None:
            return copy.copy(default)
        if value == [] and allow_empty:
            return []
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            self.error(fp, f"must be a non-empty list of strings (got {value!r})"[:300])
            return copy.copy(default)
        if choices is not None:
            choices = tuple(choices)
            for j, v in enumerate(value):
                if v not in choices:
                    self.error(fp + (j,), f"'{v}' is not one of: {', '.join(choices)}")
        return list(value)

    def mapping(self, raw: dict[str, Any], path: Path, key: str, *, required: bool = False,
                default: dict[str, Any] | None = None) -> dict[str, Any] | None:
        value = self._get(raw, path, key, required)
        if value is None:
            return copy.copy(default)
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            self.error(path + (key,), f"must be a mapping with string keys (got {kind_of(value)})")
            return copy.copy(default)
        return value

    def structure(self, raw: dict[str, Any], path: Path, key: str, i: int, *, required: bool = False,
                  secrets: bool = False) -> Any:
        """Any YAML value whose strings are templates (a body, an output, record data)."""
        if self._get(raw, path, key, required) is None:
            return None
        self.templates(path + (key,), raw[key], i, secrets=secrets)
        return raw[key]

    def templates(self, path: Path, value: Any, i: int, *, secrets: bool = False) -> None:
        if isinstance(value, str):
            self.template(path, value, i, secrets=secrets)
        elif isinstance(value, dict):
            for k, v in value.items():
                self.templates(path + (k,), v, i, secrets=secrets)
        elif isinstance(value, list):
            for j, v in enumerate(value):
                self.templates(path + (j,), v, i, secrets=secrets)

    def schema(self, raw: dict[str, Any], path: Path, key: str,
               default: dict[str, Any] | None) -> dict[str, Any] | None:
        value = raw.get(key)
        if value is None:
            return default
        if not isinstance(value, dict):
            self.error(path + (key,), f"must be a JSON Schema (a mapping), got {kind_of(value)}")
            return default
        try:
            Draft202012Validator.check_schema(value)
        except SchemaError as exc:
            self.error(path + (key,) + tuple(exc.path), f"invalid JSON Schema: {exc.message}")
            return default
        return value

    # -- cross-reference checks

    def template(self, path: Path, text: str, i: int, *, secrets: bool = False) -> None:
        """Syntax, allowed roots, earlier steps only, and known inputs/vars for one template string."""
        if not is_template(text):
            return
        try:
            refs = template_refs(text)
            inputs, vars_ = referenced_attrs(text, "inputs"), referenced_attrs(text, "vars")
        except jinja2.TemplateSyntaxError as exc:
            self.error(path, f"template syntax error: {exc.message}")
            return
        for ref in sorted(refs):
            if ref[0] == "secrets":
                if not secrets:
                    self.error(path, "secrets may only be used in http headers")
                elif static_names(text, "secrets") is None:
                    self.error(path, "name each secret literally (secrets.NAME or secrets['NAME']), so who may "
                                     "use it is checked when the workflow is defined")
            elif ref[0] not in TEMPLATE_ROOTS:
                self.error(path, f"unknown variable '{ref[0]}' (templates may use {', '.join(TEMPLATE_ROOTS)})")
            elif ref[0] == "steps" and len(ref) == 2:
                at = self.step_index.get(ref[1])
                if at is None:
                    self.error(path, f"unknown step '{ref[1]}'")
                elif at >= i:
                    self.error(path, f"step '{ref[1]}' has not run yet at this point")
        if self.input_names is not None:
            for name in sorted(inputs - self.input_names):
                self.error(path, f"unknown input '{name}' (the inputs schema defines: "
                                 f"{', '.join(sorted(self.input_names)) or 'none'})")
        for name in sorted(vars_ - self.var_names):
            self.error(path, f"unknown var '{name}' (define it under vars)")

    def url(self, path: Path, url: str | None) -> None:
        """A URL whose scheme and host are static must be http(s) and its host in allow_hosts."""
        if url is None:
            return
        cut = min((url.find(m) for m in ("{{", "{%", "{#") if m in url), default=len(url))
        prefix = url[:cut]
        if cut < len(url):
            sep = prefix.find("://")
            if sep < 0 or not any(c in prefix[sep + 3:] for c in "/?#"):
                return  # the host comes from a template: checked when the step runs
        parts = urlsplit(prefix)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            self.error(path, f"{url!r} must be an http:// or https:// URL with a host")
            return
        try:
            port = parts.port
        except ValueError:
            self.error(path, f"{url!r} has an invalid port")
            return
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname.lower()
        if not _host_allowed(host, port or (443 if parts.scheme.lower() == "https" else 80), self.allow_hosts):
            shown = host + (f":{port}" if port else "")
            self.error(path, f"host '{shown}' is not in allow_hosts (add it to allow_hosts)")

    def subworkflow(self, path: Path, name: str | None) -> None:
        """The named workflow must exist and must not lead back to this one."""
        if name is None or self.name is None:
            return
        if name == self.name:
            self.error(path, f"cycle: {name} → {name}")
            return
        if self.resolve is None:
            return
        sub = self.resolve(name)
        if sub is None:
            self.error(path, f"unknown workflow '{name}'")
            return
        stack, seen = [(sub, [self.name, name])], set()
        while stack:
            spec, trail = stack.pop()
            if spec.name in seen:
                continue
            seen.add(spec.name)
            for step in spec.steps:
                child = step.config.get("name") if step.type == "workflow" else None
                if child == self.name:
                    self.error(path, "cycle: " + " → ".join(trail + [child]))
                    return
                if child and child not in seen and (nxt := self.resolve(child)) is not None:
                    stack.append((nxt, trail + [child]))


# -- step builders: (checker, raw step, path, index) -> normalised config

Builder = Callable[[Checker, dict[str, Any], Path, int], dict[str, Any]]


def _prompt_ref(ck: Checker, raw: dict[str, Any], p: Path, i: int) -> dict[str, Any]:
    """`prompt: {ref: support-reply@production, variables: {product: "{{ inputs.product }}"}}`: the registry's
    prompt (resolved when the step runs, with the run's principal), its variables templates of the run."""
    fp = p + ("prompt",)
    ck.unknown_keys(raw["prompt"], fp, ("ref", "variables"), "a prompt reference")
    ref = ck.text(raw["prompt"], fp, "ref", required=True, template=False)
    if ref is not None:
        try:
            split_ref(ref)
        except KeelError as exc:
            ck.error(fp + ("ref",), exc.detail)
    variables = raw["prompt"].get("variables") or {}
    if not isinstance(variables, dict):
        ck.error(fp + ("variables",), "must be a mapping of variable names to texts")
        variables = {}
    if raw.get("system") is not None:
        ck.error(p + ("system",), "a registry prompt brings its own messages: drop `system`")
    return {"prompt": None, "prompt_ref": ref, "system": None,
            "prompt_variables": {str(k): ck.text(variables, fp + ("variables",), k, i) for k in variables}}


def _llm(ck: Checker, raw: dict[str, Any], p: Path, i: int) -> dict[str, Any]:
    prompt = _prompt_ref(ck, raw, p, i) if isinstance(raw.get("prompt"), dict) else {
        "prompt": ck.text(raw, p, "prompt", i, required=True), "system": ck.text(raw, p, "system", i)}
    return {**prompt,
            "model": ck.text(raw, p, "model", default="local-chat", template=False),
            "max_tokens": ck.number(raw, p, "max_tokens", 256, 1, 1_000_000, integer=True),
            "temperature": ck.number(raw, p, "temperature", 0.0, 0.0, 2.0),
            "output_schema": ck.schema(raw, p, "output_schema", None)}


def _retrieve(ck: Checker, raw: dict[str, Any], p: Path, i: int) -> dict[str, Any]:
    return {"collections": ck.str_list(raw, p, "collections", required=True),
            "query": ck.text(raw, p, "query", i, required=True),
            "top_k": ck.number(raw, p, "top_k", 5, 1, 50, integer=True)}


def _answer(ck: Checker, raw: dict[str, Any], p: Path, i: int) -> dict[str, Any]:
    return {"collections": ck.str_list(raw, p, "collections", required=True),
            "question": ck.text(raw, p, "question", i, required=True),
            "model": ck.text(raw, p, "model", default="local-chat", template=False),
            "max_tokens": ck.number(raw, p, "max_tokens", 256, 1, 1_000_000, integer=True)}


def _http(ck: Checker, raw: dict[str, Any], p: Path, i: int) -> dict[str, Any]:
    method = ck.text(raw, p, "method", default="GET", template=False) or "GET"
    if method.upper() not in HTTP_METHODS:
        ck.error(p + ("method",), f"'{method}' is not one of: {', '.join(HTTP_METHODS)}")
    url = ck.text(raw, p, "url", i, required=True)
    ck.url(p + ("url",), url)
    headers = ck.mapping(raw, p, "headers", default={}) or {}
    for name in headers:
        ck.text(headers, p + ("headers",), name, i, secrets=True)
    expect = raw.get("expect_status")
    if expect is not None and (not isinstance(expect, list) or not expect or not all(
            isinstance(s, int) and not isinstance(s, bool) and 100 <= s <= 599 for s in expect)):
        ck.error(p + ("expect_status",), f"must be a non-empty list of HTTP status codes (got {expect!r})")
        expect = None
    return {"method": method.upper(), "url": url, "headers": headers,
            "body": ck.structure(raw, p, "body", i), "expect_status": expect}


def _transform(ck: Checker, raw: dict[str, Any], p: Path, i: int) -> dict[str, Any]:
    return {"output": ck.structure(raw, p, "output", i, required=True)}


def _condition(ck: Checker, raw: dict[str, Any], p: Path, i: int) -> dict[str, Any]:
    config = {"if": ck.expression(raw, p, "if", i, required=True)}
    for key in ("then", "else"):
        target = config[key] = ck.text(raw, p, key, template=False)
        if target is None:
            continue
        at = ck.step_index.get(target)
        if at is None:
            ck.error(p + (key,), f"unknown step '{target}'")
        elif at <= i:
            ck.error(p + (key,), f"cycle: condition '{raw.get('id')}' jumps back to '{target}' "
                                 "(a condition may only jump forward, to a later step)")
    if config["then"] is None and config["else"] is None:
        ck.error(p, "a condition needs 'then', 'else' or both")
    return config


def _approval(ck: Checker, raw: dict[str, Any], p: Path, i: int) -> dict[str, Any]:
    show = ck.mapping(raw, p, "show", default={}) or {}
    ck.templates(p + ("show",), show, i)
    editable = ck.str_list(raw, p, "editable", default=[]) or []
    for j, key in enumerate(editable):
        if key not in show:
            ck.error(p + ("editable", j), f"'{key}' is not a key of show (editable fields must be shown)")
    on_timeout = ck.text(raw, p, "on_timeout", default="reject", template=False)
    if on_timeout not in ("reject", "approve", "escalate"):
        ck.error(p + ("on_timeout",), f"'{on_timeout}' is not one of: reject, approve, escalate")
    escalate_to = ck.str_list(raw, p, "escalate_to", required=on_timeout == "escalate", choices=ROLES)
    if escalate_to is not None and on_timeout != "escalate":
        ck.error(p + ("escalate_to",), "escalate_to is only used when on_timeout is escalate")
    return {"approvers": ck.str_list(raw, p, "approvers", default=["reviewer", "admin"], choices=ROLES),
            "show": show, "editable": editable, "on_timeout": on_timeout, "escalate_to": escalate_to,
            "escalation_timeout_s": ck.duration(raw, p, "escalation_timeout_s", None),
            "instructions": ck.text(raw, p, "instructions", i)}


def _notify(ck: Checker, raw: dict[str, Any], p: Path, i: int) -> dict[str, Any]:
    webhook, email = ck.text(raw, p, "webhook", i), ck.text(raw, p, "email", i)
    ck.url(p + ("webhook",), webhook)
    if email is not None and not is_template(email) and "@" not in email:
        ck.error(p + ("email",), f"{email!r} is not an email address")
    if webhook is None and email is None:
        ck.error(p, "a notify step needs 'webhook', 'email' or both")
    return {"webhook": webhook, "email": email,
            "subject": ck.text(raw, p, "subject", i, default="Keel workflow notification"),
            "body": ck.structure(raw, p, "body", i)}


def _wait(ck: Checker, raw: dict[str, Any], p: Path, i: int) -> dict[str, Any]:
    until = raw.get("until")
    if isinstance(until, (dt.date, dt.datetime)):
        until = until.isoformat()
    until = ck.text({"until": until}, p, "until", i)
    if until is not None and not is_template(until):
        try:
            dt.datetime.fromisoformat(until)
        except ValueError:
            ck.error(p + ("until",), f"{until!r} is not an ISO 8601 time (e.g. 2030-01-31T09:00:00Z)")
    seconds = ck.duration(raw, p, "seconds", None)
    if (raw.get("seconds") is None) == (raw.get("until") is None):
        ck.error(p, "a wait step needs exactly one of 'seconds' or 'until'")
    return {"seconds": seconds, "until": until}


def _workflow(ck: Checker, raw: dict[str, Any], p: Path, i: int) -> dict[str, Any]:
    name = ck.text(raw, p, "name", required=True, template=False, pattern=NAME)
    ck.subworkflow(p + ("name",), name)
    inputs = ck.mapping(raw, p, "inputs", default={})
    ck.templates(p + ("inputs",), inputs, i)
    return {"name": name, "inputs": inputs}


def _record(ck: Checker, raw: dict[str, Any], p: Path, i: int) -> dict[str, Any]:
    data = ck.mapping(raw, p, "data", required=True)
    ck.templates(p + ("data",), data, i)
    return {"table": ck.text(raw, p, "table", required=True, template=False, pattern=STEP_ID),
            "data": data, "key": ck.text(raw, p, "key", i)}


BUILDERS: dict[str, Builder] = {"llm": _llm, "retrieve": _retrieve, "answer": _answer, "http": _http,
                                 "transform": _transform, "condition": _condition, "approval": _approval,
                                 "notify": _notify, "wait": _wait, "workflow": _workflow, "record": _record}
