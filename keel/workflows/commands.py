"""CLI: `keel workflows …` (define, list, run, show, cancel, retry, waiting, resume) and `keel approvals …`
(list, show, approve, reject). All talk to a running Keel."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import quote
from typing import Optional

import typer

from keel.core.cliutil import KeyOpt, UrlOpt, client, console, handle_errors, print_rows
from keel.core.errors import BadRequest

workflows_app = typer.Typer(help="Durable workflows: define, run, inspect.", no_args_is_help=True)
approvals_app = typer.Typer(help="Approvals that workflow runs wait for.", no_args_is_help=True)


def _json(value: Optional[str], what: str) -> dict:
    if not value:
        return {}
    try:
        out = json.loads(value)
    except json.JSONDecodeError as exc:
        raise BadRequest(f"{what} is not valid JSON: {exc.msg}", fix=f"pass {what} as a JSON object") from None
    if not isinstance(out, dict):
        raise BadRequest(f"{what} must be a JSON object", fix='e.g. \'{"company": "Acme"}\'')
    return out


@workflows_app.command("define")
@handle_errors
def define(file: Path, url: Optional[str] = UrlOpt, key: Optional[str] = KeyOpt) -> None:
    """Define or update a workflow from its YAML file (a changed spec becomes a new version)."""
    if not file.is_file():
        raise BadRequest(f"{file} does not exist", fix="pass the path of a workflow .yaml")
    r = client(url, key).post("/v1/workflows", {"spec": file.read_text(encoding="utf-8")})
    console.print(f"{r['name']} version {r['version']}" + ("" if r["created"] else " (unchanged)"), markup=False)


@workflows_app.command("list")
@handle_errors
def list_(url: Optional[str] = UrlOpt, key: Optional[str] = KeyOpt) -> None:
    """Workflows you can see, latest version each."""
    rows = client(url, key).get("/v1/workflows")["data"]
    print_rows(["name", "version", "steps", "triggers", "description"],
               [[w["name"], w["version"], len(w["steps"]), ",".join(w["triggers"]), w["description"]] for w in rows])


@workflows_app.command("run")
@handle_errors
def run(name: str, inputs: Optional[str] = typer.Option(None, "--inputs", "-i", help="JSON object"),
        url: Optional[str] = UrlOpt, key: Optional[str] = KeyOpt) -> None:
    """Start a run; prints its id."""
    r = client(url, key).post(f"/v1/workflows/{name}/runs", {"inputs": _json(inputs, "--inputs")})
    print(r["id"])


@workflows_app.command("runs")
@handle_errors
def runs(name: str, status: Optional[str] = typer.Option(None), url: Optional[str] = UrlOpt,
         key: Optional[str] = KeyOpt) -> None:
    """Recent runs of a workflow, newest first."""
    q = f"/v1/workflows/{name}/runs" + (f"?status={status}" if status else "")
    print_rows(["id", "status", "version", "trigger", "step", "created"],
               [[r["id"], r["status"], r["version"], r["trigger"], r["current_step"], r["created_at"]]
                for r in client(url, key).get(q)["data"]])


@workflows_app.command("show")
@handle_errors
def show(name: str, run_id: str, url: Optional[str] = UrlOpt, key: Optional[str] = KeyOpt) -> None:
    """One run: status, every step's state and output, tokens and cost."""
    print(json.dumps(client(url, key).get(f"/v1/workflows/{name}/runs/{run_id}"), indent=2, ensure_ascii=False))


@workflows_app.command("cancel")
@handle_errors
def cancel(name: str, run_id: str, url: Optional[str] = UrlOpt, key: Optional[str] = KeyOpt) -> None:
    """Cancel a running or waiting run."""
    r = client(url, key).post(f"/v1/workflows/{name}/runs/{run_id}/cancel", {})
    console.print(f"{r['id']} {r['status']}", markup=False)


@workflows_app.command("retry")
@handle_errors
def retry(name: str, run_id: str, from_step: Optional[str] = typer.Option(None, "--from", help="step id"),
          url: Optional[str] = UrlOpt, key: Optional[str] = KeyOpt) -> None:
    """Start a new run that reuses the results before `--from` (default: the failed step); prints its id."""
    print(client(url, key).post(f"/v1/workflows/{name}/runs/{run_id}/retry", {"from_step": from_step})["id"])


@workflows_app.command("waiting")
@handle_errors
def waiting(for_: Optional[str] = typer.Option(None, "--for", help="a model alias or host"),
            url: Optional[str] = UrlOpt, key: Optional[str] = KeyOpt) -> None:
    """Runs waiting for an unavailable provider: what each waits for, why, and when it tries next."""
    q = "/v1/runs?status=waiting_provider&limit=1000" + (f"&waiting_for={quote(for_)}" if for_ else "")
    print_rows(["id", "workflow", "step", "for", "reason", "next try", "since"],
               [[r["id"], r["workflow"], r["current_step"], (r["waiting"] or {}).get("for"),
                 (r["waiting"] or {}).get("reason"), (r["waiting"] or {}).get("next_try_at"),
                 (r["waiting"] or {}).get("since")] for r in client(url, key).get(q)["data"]])


@workflows_app.command("resume")
@handle_errors
def resume(name: str, run_id: str, url: Optional[str] = UrlOpt, key: Optional[str] = KeyOpt) -> None:
    """End a run's wait for its provider now: the step tries again at once."""
    r = client(url, key).post(f"/v1/workflows/{name}/runs/{run_id}/resume", {})
    console.print(f"{r['id']} resumed (was waiting for {(r['waiting'] or {}).get('for')})", markup=False)


@approvals_app.command("list")
@handle_errors
def approvals_list(status: str = typer.Option("pending", help="pending, approved, rejected"),
                   url: Optional[str] = UrlOpt, key: Optional[str] = KeyOpt) -> None:
    """Approvals you may decide, one per line, id first."""
    rows = client(url, key).get(f"/v1/approvals?status={status}")["data"]
    print_rows(["id", "workflow", "step", "run", "status", "approvers", "deadline"],
               [[a["id"], a["workflow"], a["step"], a["run_id"], a["status"], ",".join(a["approvers"]),
                 a["deadline"]] for a in rows])


@approvals_app.command("show")
@handle_errors
def approvals_show(approval_id: str, url: Optional[str] = UrlOpt, key: Optional[str] = KeyOpt) -> None:
    """What the approver sees, and which fields they may edit."""
    print(json.dumps(client(url, key).get(f"/v1/approvals/{approval_id}"), indent=2, ensure_ascii=False))


@approvals_app.command("approve")
@handle_errors
def approvals_approve(approval_id: str,
                      edit: list[str] = typer.Option([], "--edit", help="FIELD=VALUE for an editable field"),
                      edit_file: list[str] = typer.Option([], "--edit-file", help="FIELD=PATH: the file's text"),
                      reason: Optional[str] = typer.Option(None), url: Optional[str] = UrlOpt,
                      key: Optional[str] = KeyOpt) -> None:
    """Approve, optionally editing fields first; the run continues with the edited values."""
    edits: dict[str, str] = {}
    for item, from_file in [(e, False) for e in edit] + [(e, True) for e in edit_file]:
        field, sep, value = item.partition("=")
        if not sep or not field:
            raise BadRequest(f"{item!r} is not FIELD=VALUE", fix="e.g. --edit subject='Hello again'")
        edits[field] = Path(value).read_text(encoding="utf-8") if from_file else value
    r = client(url, key).post(f"/v1/approvals/{approval_id}/approve", {"reason": reason, "edits": edits})
    console.print(f"approved {r['id']}" + (f" (edited {', '.join(sorted(edits))})" if edits else ""), markup=False)


@approvals_app.command("reject")
@handle_errors
def approvals_reject(approval_id: str, reason: str = typer.Option(..., help="recorded in the audit trail"),
                     url: Optional[str] = UrlOpt, key: Optional[str] = KeyOpt) -> None:
    """Reject; the run ends without the steps after the approval."""
    r = client(url, key).post(f"/v1/approvals/{approval_id}/reject", {"reason": reason})
    console.print(f"rejected {r['id']}", markup=False)


def mount(app: typer.Typer) -> None:
    app.add_typer(workflows_app, name="workflows")
    app.add_typer(approvals_app, name="approvals")
