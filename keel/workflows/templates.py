"""Sandboxed Jinja2 templates for workflow specs: render values, judge truthiness, find references.

Templates see only `inputs`, `vars`, `steps`, `run` (and `secrets` in http headers); undefined
names fail loudly and attributes starting with `_` are refused by the sandbox.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import meta, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from keel.workflows.errors import TemplateError

ROOTS = ("inputs", "vars", "steps", "run", "secrets")
_MARKERS = ("{{", "{%", "{#")
_SINGLE = re.compile(r"^\s*\{\{-?((?:(?!\{\{|\}\}).)*?)-?\}\}\s*$", re.DOTALL)
_FALSY_STRINGS = frozenset({"", "false", "0", "no", "none", "null"})
_RENDER_ERRORS = (jinja2.TemplateError, TypeError, ValueError, ArithmeticError, LookupError, AttributeError)


def _tojson(value: Any, indent: int | None = None) -> str:
    """JSON without HTML escaping: templates build prompts and payloads, not web pages."""
    return json.dumps(value, ensure_ascii=False, default=str, indent=indent)


def _make_env() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False, loader=None)
    env.filters["tojson"] = _tojson
    return env


ENV = _make_env()


def is_template(text: Any) -> bool:
    """True when `text` is a string with Jinja markup in it."""
    return isinstance(text, str) and any(m in text for m in _MARKERS)


@lru_cache(maxsize=2048)
def _compile(text: str) -> jinja2.Template:
    return ENV.from_string(text)


@lru_cache(maxsize=2048)
def _compile_expression(expr: str) -> Any:
    return ENV.compile_expression(expr, undefined_to_none=False)


def _short(text: str) -> str:
    return text if len(text) <= 200 else text[:197] + "..."


def _raise_undefined(value: Any) -> None:
    """A single expression may return an Undefined (or hold one) instead of raising; make it raise."""
    if isinstance(value, jinja2.Undefined):
        str(value)  # a StrictUndefined (ENV's) raises UndefinedError, naming what is undefined, on any use
    elif isinstance(value, dict):
        for v in value.values():
            _raise_undefined(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _raise_undefined(v)


def render_string(text: str, context: dict[str, Any]) -> Any:
    """Render one string; exactly one `{{ expr }}` keeps the expression's native type."""
    if not is_template(text):
        return text
    try:
        single = _SINGLE.match(text)
        if single:
            value = _compile_expression(single.group(1).strip())(**context)
            _raise_undefined(value)
            return value
        return _compile(text).render(**context)
    except _RENDER_ERRORS as exc:
        raise TemplateError(f"template {_short(text)!r} failed: {exc}", template=_short(text),
                            fix="check the names used against inputs, vars and earlier steps' output") from None


def render(value: Any, context: dict[str, Any]) -> Any:
    """Render strings in `value` (recursively through lists and dicts); other values pass unchanged."""
    if isinstance(value, str):
        return render_string(value, context)
    if isinstance(value, dict):
        return {k: render(v, context) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [render(v, context) for v in value]
    return value


def truthy(value: Any) -> bool:
    """Truth of a rendered `when`/`if`: "false", "no", "0", "none", "null", "" and empties are false."""
    if value is None or value is False:
        return False
    if isinstance(value, str):
        return value.strip().lower() not in _FALSY_STRINGS
    if isinstance(value, (int, float)):
        return value != 0
    if isinstance(value, (list, tuple, dict, set)):
        return len(value) > 0
    return True


@lru_cache(maxsize=2048)
def _analyse(text: str) -> tuple[frozenset[str], tuple[tuple[str, str], ...]]:
    """Undeclared root names, and (root, attribute) pairs for static `root.attr` / `root['attr']`."""
    ast = ENV.parse(text)
    roots = frozenset(meta.find_undeclared_variables(ast) - set(ENV.globals))
    pairs: set[tuple[str, str]] = set()
    for node in ast.find_all((nodes.Getattr, nodes.Getitem)):
        base = node.node
        if not isinstance(base, nodes.Name) or base.ctx != "load" or base.name not in roots:
            continue
        if isinstance(node, nodes.Getattr):
            pairs.add((base.name, node.attr))
        elif isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
            pairs.add((base.name, node.arg.value))
    return roots, tuple(sorted(pairs))


def template_refs(text: str) -> set[tuple[str, ...]]:
    """Root names a template reads, and for `steps` the step ids: {("inputs",), ("steps", "enrich")}.

    A template that reads `steps` only dynamically (e.g. `steps[name]`) yields ("steps",).
    Raises `jinja2.TemplateSyntaxError` for bad syntax.
    """
    roots, pairs = _analyse(text)
    refs: set[tuple[str, ...]] = {(r,) for r in roots if r != "steps"}
    step_ids = {attr for root, attr in pairs if root == "steps"}
    refs |= {("steps", s) for s in step_ids}
    if "steps" in roots and not step_ids:
        refs.add(("steps",))
    return refs


@lru_cache(maxsize=2048)
def static_names(text: str, root: str) -> frozenset[str] | None:
    """Names read from `root` as `root.NAME` / `root['NAME']`; None if `root` is also used any other way
    (`root[inputs.x]`, `root` itself), so what it reads cannot be known before the template runs."""
    ast = ENV.parse(text)
    uses = sum(1 for n in ast.find_all(nodes.Name) if n.name == root)
    names = []
    for node in ast.find_all((nodes.Getattr, nodes.Getitem)):
        base = node.node
        if not isinstance(base, nodes.Name) or base.name != root:
            continue
        if isinstance(node, nodes.Getattr):
            names.append(node.attr)
        elif isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
            names.append(node.arg.value)
    return frozenset(names) if len(names) == uses else None


def referenced_attrs(text: str, root: str) -> set[str]:
    """Static attribute names read from `root`: `{{ inputs.company }}` → {"company"} for "inputs"."""
    _, pairs = _analyse(text)
    return {attr for r, attr in pairs if r == root}
