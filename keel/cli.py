"""The `keel` command: mounts each capability's commands."""

from __future__ import annotations

import typer

from keel import config_checks
from keel import demo
from keel.app import create_app
from keel.core import backup_commands
from keel.core import commands as core_commands
from keel.core import config_io_commands
from keel.governance import commands as governance_commands
from keel.governance.audit import AuditLog
from keel.identity import commands as identity_commands
from keel.knowledge import commands as knowledge_commands
from keel.observe import commands as observe_commands
from keel.workflows import commands as workflows_commands
from keel.agents import commands as agents_commands

app = typer.Typer(help="Keel — a self-hosted AI operating layer.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
core_commands.make_server_commands(app, create_app, demo=demo.load)
app.add_typer(core_commands.db_app, name="db")
identity_commands.mount(app)
governance_commands.mount(app)
knowledge_commands.mount(app)
observe_commands.mount(app)
workflows_commands.mount(app)
agents_commands.mount(app)
backup_commands.mount(app, verify=lambda store: AuditLog(store).verify())
config_io_commands.mount(app, validators=config_checks.validators)


def main() -> None:
    app()
