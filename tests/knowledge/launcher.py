"""Test-only entry point: the `keel` CLI with the knowledge capability wired in exactly as
keel/app.py and keel/cli.py will wire it (a no-op once they do). Tests run it as a subprocess:

    python tests/knowledge/launcher.py serve --port 8081
    python tests/knowledge/launcher.py ingest ./docs --collection handbook
"""

from __future__ import annotations

import typer

from keel.app import create_app
from keel.core import commands as core_commands
from keel.identity import commands as identity_commands
from keel.knowledge import commands as knowledge_commands
from keel.knowledge import routes as knowledge_routes
from keel.knowledge import service as knowledge_service


def create_app_with_knowledge(settings, **kw):  # noqa: ANN001, ANN201
    built = create_app(settings, **kw)
    app = built.app
    if getattr(app.state, "knowledge", None) is None:
        kn = knowledge_service.build(settings, app.state.store, app.state.gateway)
        app.state.knowledge = kn
        app.state.lifecycle.startup.append(kn.start)
        app.state.lifecycle.shutdown.append(kn.stop)
        app.include_router(knowledge_routes.router)
    return built


cli = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
core_commands.make_server_commands(cli, create_app_with_knowledge)
identity_commands.mount(cli)
knowledge_commands.mount(cli)

if __name__ == "__main__":
    cli()
