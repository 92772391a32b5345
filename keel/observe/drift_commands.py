"""`keel drift`: each drift signal of a running Keel (`GET /v1/drift`) and its latest alerts."""

from __future__ import annotations

import json
from typing import Optional

import typer

from keel.core.cliutil import KeyOpt, UrlOpt, client, console, handle_errors, print_rows


@handle_errors
def drift(as_json: bool = typer.Option(False, "--json", help="the API's JSON on stdout"),
          url: Optional[str] = UrlOpt, key: Optional[str] = KeyOpt) -> None:
    """Live traffic's drift signals: test, windows, statistic, p-value, status; then the latest alerts."""
    out = client(url, key).get("/v1/drift")
    if as_json:
        print(json.dumps(out, indent=2))
        return
    print_rows(["signal", "status", "test", "statistic", "p_value", "alpha", "reference_n", "recent_n"],
               [[s["signal"], s["status"], s["test"], s.get("statistic"), s.get("p_value"), s["alpha"],
                 s.get("reference_n"), s.get("recent_n", s.get("observations"))] for s in out["signals"]])
    for a in out["alerts"][-10:]:
        console.print(f"{a['ts']}  drift in {a['signal']} (p={a['p_value']})", markup=False)


def mount(app: typer.Typer) -> None:
    app.command("drift")(drift)
