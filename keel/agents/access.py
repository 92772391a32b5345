"""Who may change and run which agent: ownership exactly as for workflows (a global mandate changes only by
admins, a team's only by its builders and admins; ownership never moves), runs visible to their team."""

from __future__ import annotations

from keel.core.errors import NotFound
from keel.identity import ownership
from keel.identity.principal import Principal
from keel.workflows.access import definitions_visible, require_team_for_runs, runs_visible, sees_all

__all__ = ["definitions_visible", "may_change", "mandate_owner", "require_agent_scope", "require_team_for_runs",
           "runs_visible", "sees_all"]


def mandate_owner(p: Principal, name: str, prev_team: str | None, exists: bool, requested: str | None) -> str | None:
    """The team a new version of agent `name` belongs to, or Forbidden/Conflict when `p` may not define it."""
    return ownership.owner(p, "agent", name, exists=exists, prev_team=prev_team, requested=requested)


def may_change(p: Principal, name: str, team: str | None) -> None:
    """Raise unless `p` may change agent `name` of `team` (define a version, pause, resume)."""
    p.require("agents.define")
    ownership.may_change(p, "agent", name, team)


def require_agent_scope(p: Principal, name: str) -> None:
    """A key scoped to some agents sees the others as absent."""
    if not p.may_use_agent(name):
        raise NotFound(f"agent {name!r} not found", fix="use a key whose agent scope includes it", agent=name)
