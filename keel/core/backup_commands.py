"""CLI: `keel backup DEST`, `keel restore SRC` — they read and write the store directly."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from keel.core import backup as backup_mod
from keel.core.cliutil import console, err_console, handle_errors
from keel.core.db import Store
from keel.core.settings import load_settings

ConfigOpt = typer.Option(None, "--config", "-c", envvar="KEEL_CONFIG", help="path to keel.yaml")


def mount(app: typer.Typer, verify: Callable[[Store], Any]) -> None:
    """Register the commands; `verify(store)` checks a restored store (the audit chain) and returns a
    verdict with `.ok`, `.count`, `.broken_seq` and `.reason`."""

    @app.command("backup")
    @handle_errors
    def backup(dest: Path = typer.Argument(..., help="a new folder to write the backup to"),
               config: Optional[Path] = ConfigOpt) -> None:
        """Back up the store (SQLite online backup with the index files, or pg_dump), safe while Keel runs."""
        settings, _ = load_settings(config)
        manifest = backup_mod.backup(settings, dest)
        console.print(f"backup of the {manifest.dialect} store written to {dest} ({len(manifest.files)} files, "
                      f"schema {', '.join(manifest.heads)})", markup=False, highlight=False)

    @app.command("restore")
    @handle_errors
    def restore(src: Path = typer.Argument(..., help="a folder `keel backup` wrote"),
                config: Optional[Path] = ConfigOpt) -> None:
        """Restore a backup into an empty data dir or database, then verify its audit chain."""
        settings, _ = load_settings(config)
        verdict = backup_mod.restore(settings, src, verify)
        if verdict.ok:
            console.print(f"restored {src}; audit chain OK: {verdict.count} events", style="bold green",
                          markup=False, highlight=False)
            return
        err_console.print(f"restored {src}, but its audit chain is BROKEN at event {verdict.broken_seq}: "
                          f"{verdict.reason} — do not trust this copy; restore an older backup",
                          style="bold red", markup=False, highlight=False)
        sys.exit(2)
