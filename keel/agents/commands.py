"""CLI: `keel agents …` (define, list, run, runs, show, pause, resume). All talk to a running Keel."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from keel.core.cliutil import KeyOpt, UrlOpt, client, console, handle_errors, print_rows
from keel.core.errors import BadRequest

agents_app = typer.Typer(help="Agents that act only within their mandate.", no_args_is_help=True)


@agents_app.command("define")
@handle_errors
def define(file: Path, url: Optional[str] = UrlOpt, key: Optional[str] = KeyOpt) -> None:
    """Define or update an agent from its mandate YAML (a changed mandate becomes a new version)."""
    if not file.is_file():
        raise BadRequest(f"{file} does not exist", fix="pass the path of a mandate .yaml")
    r = client(url, key).post("/v1/agents", {"spec": file.read_text(encoding="utf-8")})
    console.print(f"{r['name']} version {r['version']}" + ("" if r["created"] else " (unchanged)"), markup=False)


@agents_app.command("list")
@handle_errors
def list_(url: Optional[str] = UrlOpt, key: Optional[str] = KeyOpt) -> None:
    """Agents you can see, latest version each."""
    rows = client(url, key).get("/v1/agents")["data"]
    print_rows(["name", "version", "model", "tools", "paused"],
               [[a["name"], a["version"], a["model"], ",".join(a["tools"]), a["paused"]] for a in rows])


@agents_app.command("run")
@handle_errors
def run(name: str, task: str = typer.Option(..., "--task", "-t"), wait: float = typer.Option(60.0, help="seconds"),
        user: Optional[str] = typer.Option(None, help="the end user the run is for (their thread, memory: user)"),
        url: Optional[str] = UrlOpt, key: Optional[str] = KeyOpt) -> None:
    """Run the agent on a task; prints the run with its action log."""
    body = {"task": task, "wait_s": wait, **({"user": user} if user else {})}
    r = client(url, key).post(f"/v1/agents/{name}/runs", body)
    print(json.dumps(r, indent=2, ensure_ascii=False))


@agents_app.command("runs")
@handle_errors
def runs(name: str, status: Optional[str] = typer.Option(None), url: Optional[str] = UrlOpt,
         key: Optional[str] = KeyOpt) -> None:
    """Recent runs of an agent, newest first."""
    q = f"/v1/agents/{name}/runs" + (f"?status={status}" if status else "")
    print_rows(["id", "status", "version", "created"],
               [[r["id"], r["status"], r["version"], r["created_at"]] for r in client(url, key).get(q)["data"]])


@agents_app.command("show")
@handle_errors
def show(name: str, run_id: str, url: Optional[str] = UrlOpt, key: Optional[str] = KeyOpt) -> None:
    """One run: status, answer, and every action with its decision and rule."""
    print(json.dumps(client(url, key).get(f"/v1/agents/{name}/runs/{run_id}"), indent=2, ensure_ascii=False))


@agents_app.command("resume-run")
@handle_errors
def resume_run(name: str, run_id: str, url: Optional[str] = UrlOpt, key: Optional[str] = KeyOpt) -> None:
    """End a run's provider wait now (a run whose status is waiting_provider): its model call is tried again."""
    r = client(url, key).post(f"/v1/agents/{name}/runs/{run_id}/resume", {})
    print(f"{r['id']} resumed (was waiting for {(r['waiting'] or {}).get('for')})")


@agents_app.command("pause")
@handle_errors
def pause(name: str, reason: Optional[str] = typer.Option(None), url: Optional[str] = UrlOpt,
          key: Optional[str] = KeyOpt) -> None:
    """Kill switch: the agent takes no further action until resumed."""
    client(url, key).post(f"/v1/agents/{name}/pause", {"reason": reason})
    console.print(f"{name} paused", markup=False)


@agents_app.command("resume")
@handle_errors
def resume(name: str, url: Optional[str] = UrlOpt, key: Optional[str] = KeyOpt) -> None:
    """Lift the kill switch."""
    client(url, key).post(f"/v1/agents/{name}/resume", {})
    console.print(f"{name} resumed", markup=False)


def mount(app: typer.Typer) -> None:
    app.add_typer(agents_app, name="agents")
