"""Agents: mandates in readable form (goal, model, tools, approvals, budgets), their runs, a run's action log
(every action allowed or refused, with its rule), and the kill switch — the agents manager's own calls, so what
a caller sees and may pause is what `/v1/agents/…` allows it."""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.responses import RedirectResponse, Response

from keel.console.web import Page, root
from keel.core.errors import NotFound


def _agents(page: Page) -> Any:
    agents = getattr(page.state, "agents", None)
    if agents is None:
        raise NotFound("agents are not enabled on this server", fix="start Keel with agents")
    return agents


async def agents(page: Page) -> Response:
    rows = await run_in_threadpool(_agents(page).list, page.p)
    return page.render("agents.html", title="Agents", agents=rows)


async def agent(page: Page) -> Response:
    ag = _agents(page)
    name = page.request.path_params["name"]
    mandate = await run_in_threadpool(ag.get, name, page.p)
    runs = await run_in_threadpool(ag.runs, name, page.p, None, 50)
    return page.render("agent.html", title=f"Agent {name}", a=mandate, runs=runs)


async def switch(page: Page) -> Response:
    ag = _agents(page)
    form = await page.form()
    name = page.request.path_params["name"]
    paused = form.get("paused") == "true"
    await run_in_threadpool(ag.set_paused, name, page.p, paused, form.get("reason") or None)
    return RedirectResponse(f"{root(page.request)}/agents/{name}", 303)


async def run(page: Page) -> Response:
    name, run_id = page.request.path_params["name"], page.request.path_params["run_id"]
    d = await run_in_threadpool(_agents(page).detail, name, run_id, page.p)
    return page.render("agent_run.html", title=f"Agent run {run_id}", run=d, name=name)


ROUTES = [
    ("GET", "/agents", agents),
    ("GET", "/agents/{name}", agent),
    ("POST", "/agents/{name}/switch", switch),
    ("GET", "/agents/{name}/runs/{run_id}", run),
]
