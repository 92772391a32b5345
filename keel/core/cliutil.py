"""Shared CLI plumbing: options for reaching a running Keel, one red line per error."""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable

import typer
from rich.console import Console

from keel.core.client import Client
from keel.core.errors import KeelError

console = Console()
err_console = Console(stderr=True)

UrlOpt = typer.Option(None, "--url", envvar="KEEL_URL", help="Keel base URL (default http://127.0.0.1:8080)")
KeyOpt = typer.Option(None, "--key", envvar="KEEL_API_KEY", help="API key")


def client(url: str | None, key: str | None) -> Client:
    return Client.from_env(url, key)


def fail(err: KeelError) -> None:
    line = f"error [{err.code}]: {err.detail}"
    if err.fix:
        line += f" — {err.fix}"
    err_console.print(line, style="bold red", markup=False, highlight=False)
    sys.exit(1)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn any KeelError into one red line and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KeelError as exc:
            fail(exc)

    return wrapper


def print_rows(columns: list[str], rows: list[list[Any]]) -> None:
    """A Rich table on a terminal; one tab-separated line per row (id first) when piped."""
    if console.is_terminal:
        from rich.table import Table

        table = Table(*columns)
        for row in rows:
            table.add_row(*("" if v is None else str(v) for v in row))
        console.print(table)
    else:
        for row in rows:
            print("\t".join("" if v is None else str(v) for v in row))
