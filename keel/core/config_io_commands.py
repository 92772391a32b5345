"""CLI: `keel config export DIR`, `keel config import DIR` — against a running Keel, with an admin key."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import typer

from keel.core import config_io
from keel.core.cliutil import KeyOpt, UrlOpt, client, console, handle_errors


def mount(app: typer.Typer, validators: Callable[[], dict[str, config_io.Validator]]) -> None:
    """Register `keel config …`; `validators()` gives each section's file check (the capabilities' parsers)."""
    config_app = typer.Typer(help="Configuration as files for review in git (no secret values).",
                             no_args_is_help=True)
    app.add_typer(config_app, name="config")

    @config_app.command("export")
    @handle_errors
    def export(dest: Path = typer.Argument(..., help="a new (or empty) folder"),
               url: str = UrlOpt, key: str = KeyOpt) -> None:
        """Write deployments (credentials by name), the policy, workflows and agents as YAML files."""
        files = config_io.export_config(client(url, key), dest)
        console.print(f"exported {len(files) - 1} definition file(s) to {dest}", markup=False, highlight=False)

    @config_app.command("import")
    @handle_errors
    def import_(src: Path = typer.Argument(..., help="a folder `keel config export` wrote"),
                url: str = UrlOpt, key: str = KeyOpt) -> None:
        """Validate every file, then apply them all (or, if the server refuses one, none)."""
        counts = config_io.import_config(client(url, key), src, validators())
        changed = ", ".join(f"{n} {k}" if k != "policy" else "policy activated" for k, n in counts.items() if n) \
            or "nothing changed"
        console.print(f"imported {src}: {changed}", markup=False, highlight=False)
        if counts["policy"]:
            console.print("policy.yaml is now the active policy on every process; a later change of the server's "
                          "policy_file (KEEL_POLICY_FILE) replaces it", style="yellow", markup=False, highlight=False)
