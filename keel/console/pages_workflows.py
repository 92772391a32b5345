"""Workflows: definitions (their steps in order), a start form generated from each one's inputs schema, recent
runs, and a run's step timeline, outputs and cost — the calls behind `/v1/workflows/…`, so a member who opens
another team's run by URL gets the same not-found answer as the API gives."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.concurrency import run_in_threadpool
from starlette.responses import RedirectResponse, Response

from keel.console import charts
from keel.console.web import Page, root
from keel.core.errors import BadRequest, KeelError, NotFound
from keel.workflows.spec import parse_spec


def _wf(page: Page) -> Any:
    wf = getattr(page.state, "workflows", None)
    if wf is None:
        raise NotFound("workflows are not enabled on this server", fix="start Keel with workflows")
    return wf


def fields(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """The form's fields from a JSON schema's top-level properties: name, input type, required, choices."""
    props = (schema or {}).get("properties") or {}
    required = set((schema or {}).get("required") or [])
    out = []
    for name, prop in props.items():
        prop = prop if isinstance(prop, dict) else {}
        kind = prop.get("type", "string")
        widget = {"integer": "number", "number": "number", "boolean": "checkbox"}.get(kind, "text")
        if kind in ("object", "array"):
            widget = "json"
        out.append({"name": name, "type": kind, "widget": widget, "required": name in required,
                    "enum": prop.get("enum"), "description": prop.get("description", "")})
    return out


def _value(field: dict[str, Any], raw: str | None) -> Any:
    if field["widget"] == "checkbox":
        return raw is not None
    if raw is None or raw == "":
        return None
    if field["type"] == "integer":
        try:
            return int(raw)
        except ValueError:
            raise BadRequest(f"{field['name']} must be a whole number", fix="enter digits only") from None
    if field["type"] == "number":
        try:
            return float(raw)
        except ValueError:
            raise BadRequest(f"{field['name']} must be a number", fix="enter a number such as 3.5") from None
    if field["widget"] == "json":
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise BadRequest(f"{field['name']} must be JSON", fix="enter a JSON value, e.g. [\"a\", \"b\"]") from None
    return raw


async def workflows(page: Page) -> Response:
    wf = _wf(page)
    defs = await run_in_threadpool(wf.list, page.p)
    runs = await run_in_threadpool(wf.all_runs, page.p, None, None, None, 50) if page.p.team_id or page.p.is_admin \
        or page.p.has("audit.read") else []
    return page.render("workflows.html", title="Workflows", defs=defs, runs=runs)


async def workflow(page: Page) -> Response:
    wf = _wf(page)
    name = page.request.path_params["name"]
    d = await run_in_threadpool(wf.get, name, page.p)
    runs = await run_in_threadpool(wf.runs, name, page.p, None, 20)
    return page.render("workflow.html", title=f"Workflow {name}", wf=d, fields=fields(d["inputs"]), runs=runs,
                       may_run=page.p.has("workflows.run"), graph=charts.workflow_graph(spec_steps(d)))


def spec_steps(d: dict[str, Any]) -> list[dict[str, Any]]:
    """The definition's steps with their branches and approvers, from its stored source through the same parser
    that accepted it (the listing holds ids and types only); that list where the source no longer parses."""
    try:
        return parse_spec(d.get("source") or "").to_dict()["steps"]
    except KeelError:
        return d["steps"]


async def start(page: Page) -> Response:
    wf = _wf(page)
    name = page.request.path_params["name"]
    form = await page.form()
    d = await run_in_threadpool(wf.get, name, page.p)
    inputs = {}
    for f in fields(d["inputs"]):
        v = _value(f, form.get(f"in.{f['name']}"))
        if v is not None:
            inputs[f["name"]] = v
    out = await wf.start(name, inputs, page.p, trigger="console")
    return RedirectResponse(f"{root(page.request)}/workflows/{name}/runs/{out['id']}", 303)


async def run(page: Page) -> Response:
    wf = _wf(page)
    name, run_id = page.request.path_params["name"], page.request.path_params["run_id"]
    d = await wf.detail(name, run_id, page.p)
    return page.render("run.html", title=f"Run {run_id}", run=d, name=name)


async def cancel(page: Page) -> Response:
    wf = _wf(page)
    name, run_id = page.request.path_params["name"], page.request.path_params["run_id"]
    await page.form()
    await wf.cancel(name, run_id, page.p)
    return RedirectResponse(f"{root(page.request)}/workflows/{name}/runs/{run_id}", 303)


async def retry(page: Page) -> Response:
    """A new run that reuses the results of the steps before the chosen one (as `POST …/retry`)."""
    wf = _wf(page)
    name, run_id = page.request.path_params["name"], page.request.path_params["run_id"]
    form = await page.form()
    out = await wf.retry(name, run_id, page.p, form.get("from_step") or None)
    return RedirectResponse(f"{root(page.request)}/workflows/{name}/runs/{out['id']}", 303)


ROUTES = [
    ("GET", "/workflows", workflows),
    ("GET", "/workflows/{name}", workflow),
    ("POST", "/workflows/{name}/runs", start),
    ("GET", "/workflows/{name}/runs/{run_id}", run),
    ("POST", "/workflows/{name}/runs/{run_id}/cancel", cancel),
    ("POST", "/workflows/{name}/runs/{run_id}/retry", retry),
]
