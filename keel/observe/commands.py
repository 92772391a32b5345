"""`keel usage`: the cost and usage report of a running Keel (`GET /v1/usage`), as a table, JSON or CSV."""

from __future__ import annotations

import json
import sys
import urllib.parse
from typing import Optional

import typer

from keel.core.cliutil import KeyOpt, UrlOpt, client, handle_errors, print_rows
from keel.observe import drift_commands, evals_commands, prompts_commands
from keel.observe.usage import to_csv

SHOWN = ("requests", "errors", "tokens_in", "tokens_out", "cost", "latency_p50_ms", "latency_p95_ms",
         "feedback_count", "feedback_avg_score")


@handle_errors
def usage(group_by: str = typer.Option("day", "--group-by", "-g",
                                       help="comma-separated: day, team, key, user, use_case, task, model, "
                                            "deployment, provider, kind, status, workflow, workflow_run, agent, "
                                            "agent_run"),
          start: Optional[str] = typer.Option(None, help="ISO date or date-time (UTC); default 30 days before end"),
          end: Optional[str] = typer.Option(None, help="ISO date or date-time (UTC), exclusive; default now"),
          where: list[str] = typer.Option([], "--where", "-w", help="DIMENSION=VALUE filter; repeatable"),
          as_csv: bool = typer.Option(False, "--csv", help="CSV on stdout"),
          as_json: bool = typer.Option(False, "--json", help="the API's JSON on stdout"),
          url: Optional[str] = UrlOpt, key: Optional[str] = KeyOpt) -> None:
    """Tokens, cost, requests, errors and p50/p95 latency from the usage ledger, grouped as asked."""
    params = [("group_by", group_by)]
    params += [(k, v) for k, v in (("start", start), ("end", end)) if v]
    for item in where:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise typer.BadParameter(f"--where {item!r}: write DIMENSION=VALUE, e.g. --where team=team_…")
        params.append((name.strip(), value))
    rep = client(url, key).get("/v1/usage?" + urllib.parse.urlencode(params))
    if as_csv:
        sys.stdout.write(to_csv(rep))
    elif as_json:
        print(json.dumps(rep, indent=2, ensure_ascii=False))
    else:
        dims = rep["group_by"]
        print_rows([*dims, *SHOWN], [[row.get(c) for c in (*dims, *SHOWN)] for row in rep["data"]])


def mount(app: typer.Typer) -> None:
    app.command("usage")(usage)
    prompts_commands.mount(app)
    evals_commands.mount(app)
    drift_commands.mount(app)
