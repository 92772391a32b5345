"""`keel prompts …`: the prompt registry of a running Keel (push a version, list, show, versions, diff, label)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional
from urllib.parse import quote, urlencode

import typer

from keel.core.cliutil import KeyOpt, UrlOpt, client, console, handle_errors, print_rows
from keel.core.errors import BadRequest

prompts_app = typer.Typer(help="Versioned prompt templates with labels (production, staging).", no_args_is_help=True)


@prompts_app.command("push")
@handle_errors
def push(name: str, file: Path = typer.Argument(..., help="a JSON list of {role, content} messages, or plain text "
                                                          "(one user message); {{ var }} marks a variable"),
         label: list[str] = typer.Option([], "--label", "-l", help="point this label at the new version; repeatable"),
         description: str = typer.Option("", help="what the prompt is for"),
         url: Optional[str] = UrlOpt, key: Optional[str] = KeyOpt) -> None:
    """Store a new version of prompt NAME from FILE (an unchanged text keeps its version)."""
    if not file.is_file():
        raise BadRequest(f"{file} does not exist", fix="pass the path of a .json messages list or a .txt template")
    text = file.read_text(encoding="utf-8")
    body: dict = {"name": name, "labels": label, "description": description}
    if file.suffix == ".json":
        try:
            body["messages"] = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BadRequest(f"{file} is not valid JSON: {exc.msg}", fix="write a list of {role, content}") from None
    else:
        body["template"] = text
    r = client(url, key).post("/v1/prompts", body)
    console.print(f"{r['ref']}" + ("" if r["created"] else " (unchanged)") +
                  (f"  labels: {', '.join(r['labels'])}" if r["labels"] else ""), markup=False)


@prompts_app.command("list")
@handle_errors
def list_(url: Optional[str] = UrlOpt, key: Optional[str] = KeyOpt) -> None:
    """Prompts you may use: latest version each, and where each label points."""
    rows = client(url, key).get("/v1/prompts")["data"]
    print_rows(["name", "latest", "labels", "variables", "team"],
               [[p["name"], p["version"], " ".join(f"{k}@{v}" for k, v in sorted(p["all_labels"].items())),
                 ",".join(p["variables"]), p["team_id"] or "(global)"] for p in rows])


@prompts_app.command("show")
@handle_errors
def show(ref: str = typer.Argument(..., help="name, name@label or name@version"),
         url: Optional[str] = UrlOpt, key: Optional[str] = KeyOpt) -> None:
    """One version's messages."""
    name, _, tail = ref.partition("@")
    query = "" if not tail else "?" + urlencode({"version" if tail.isdigit() else "label": tail})
    p = client(url, key).get(f"/v1/prompts/{quote(name, safe='')}{query}")
    console.print(f"{p['ref']}  labels: {', '.join(p['labels']) or '-'}", markup=False)
    for m in p["messages"]:
        console.print(f"[{m['role']}]\n{m['content']}", markup=False)


@prompts_app.command("versions")
@handle_errors
def versions(name: str, url: Optional[str] = UrlOpt, key: Optional[str] = KeyOpt) -> None:
    """Every version, newest first."""
    rows = client(url, key).get(f"/v1/prompts/{quote(name, safe='')}/versions")["data"]
    print_rows(["version", "labels", "created_at", "created_by", "description"],
               [[p["version"], ",".join(p["labels"]), p["created_at"], p["created_by"], p["description"]]
                for p in rows])


@prompts_app.command("diff")
@handle_errors
def diff(name: str, a: int, b: int, url: Optional[str] = UrlOpt, key: Optional[str] = KeyOpt) -> None:
    """A unified diff of versions A and B."""
    print(client(url, key).get(f"/v1/prompts/{quote(name, safe='')}/diff?from={a}&to={b}")["diff"])


@prompts_app.command("label")
@handle_errors
def label(name: str, label_name: str = typer.Argument(..., metavar="LABEL"), version: int = typer.Argument(...),
          url: Optional[str] = UrlOpt, key: Optional[str] = KeyOpt) -> None:
    """Point LABEL at VERSION: promote, or roll back by naming an older version."""
    r = client(url, key).request("PUT", f"/v1/prompts/{quote(name, safe='')}/labels/{quote(label_name, safe='')}",
                                 {"version": version})
    console.print(f"{name}@{label_name} -> version {r['version']}", markup=False)


def mount(app: typer.Typer) -> None:
    app.add_typer(prompts_app, name="prompts")
