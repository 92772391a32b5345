"""CLI: `keel up`, `keel serve`, `keel db upgrade` — they work with the server down."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from keel.core import server
from keel.core.cliutil import console, handle_errors
from keel.core.db import Store
from keel.core.roles import check_role, executor_id
from keel.core.logs import configure_logging
from keel.core.settings import Settings, load_settings

db_app = typer.Typer(help="Database maintenance (works with the server down).", no_args_is_help=True)
ConfigOpt = typer.Option(None, "--config", "-c", envvar="KEEL_CONFIG", help="path to keel.yaml")


@db_app.command("upgrade")
@handle_errors
def db_upgrade(config: Optional[Path] = ConfigOpt) -> None:
    """Apply all pending migrations to the store named by KEEL_DATABASE_URL or the data dir."""
    settings, _ = load_settings(config)
    configure_logging("warning")
    store = Store.open(settings.resolved_database_url())
    heads = store.upgrade()  # under the store's migration lock: replicas starting meanwhile wait for it
    done = f"applied migrations up to {', '.join(store.applied)}" if store.applied else "nothing to apply"
    console.print(f"database at {store.dialect} is current ({done}): {', '.join(heads)}", highlight=False)


def make_server_commands(app: typer.Typer, factory: Callable[[Settings], Any],
                         demo: Callable[[str, str], None] | None = None) -> None:
    """Register `up` and `serve`; `factory(settings)` returns an object with `.asgi` and `.bootstrap_key`;
    `demo(url, admin_key)` loads demo data on the first start of `keel up`."""

    def _start(config: Optional[Path], host: Optional[str], port: Optional[int], dev: bool,
               role: Optional[str] = None) -> None:
        overrides: dict[str, Any] = {"host": host, "port": port, "role": role}
        if dev:
            overrides.update(demo=True, preload_models=True)
        settings, sources = load_settings(config, **overrides)
        settings = with_role(settings, sources)
        configure_logging(settings.log_level)
        server.log_sources(settings, sources)
        built = factory(settings)
        logging.getLogger("keel.server").info("starting", extra={"dev": dev, "data_dir": str(settings.data_dir)})

        def ready(url: str) -> None:
            console.print(f"Keel is running at {url}  (docs: {url}/docs)", style="bold green", highlight=False)
            if built.bootstrap_key:
                console.print("First start: the admin API key is shown once — store it now:", style="yellow")
                console.print(built.bootstrap_key, markup=False, highlight=False)
                if dev and demo is not None:
                    threading.Thread(target=demo, args=(url, built.bootstrap_key), name="keel-demo",
                                     daemon=True).start()

        server.run(built.asgi, settings, on_ready=ready)

    @app.command("up")
    @handle_errors
    def up(config: Optional[Path] = ConfigOpt, host: Optional[str] = typer.Option(None),
           port: Optional[int] = typer.Option(None)) -> None:
        """Start Keel with embedded defaults (SQLite, bundled local models) and demo data."""
        _start(config, host, port, dev=True)

    @app.command("serve")
    @handle_errors
    def serve(config: Optional[Path] = ConfigOpt, host: Optional[str] = typer.Option(None),
              port: Optional[int] = typer.Option(None),
              role: Optional[str] = typer.Option(None, help="all (default), api or worker; KEEL_ROLE")) -> None:
        """Start Keel for production: configuration only, no demo data."""
        _start(config, host, port, dev=False, role=role)

    @app.command("worker")
    @handle_errors
    def worker(config: Optional[Path] = ConfigOpt, host: Optional[str] = typer.Option(None),
               port: Optional[int] = typer.Option(None)) -> None:
        """Start a worker on a shared PostgreSQL store: it executes the workflow and agent runs and ingest jobs
        that `keel serve --role api` replicas queue, runs the schedules, and takes over dead workers' runs. It
        serves the API too (health probes, metrics) on its own port."""
        _start(config, host, port, dev=False, role="worker")


def with_role(settings: Settings, sources: dict[str, str]) -> Settings:
    """Check the role fits the store, and give a split-role process its own executor id unless one was set."""
    check_role(settings.role, "postgresql" if settings.resolved_database_url().startswith("postgresql") else "sqlite")
    executor = executor_id(settings.role, settings.workflow_executor_id, "workflow_executor_id" in sources)
    return settings.model_copy(update={"workflow_executor_id": executor})

