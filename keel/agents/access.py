"""Who may change and run which agent: ownership exactly as for workflows (a global mandate changes only by
admins, a team's only by its builders and admins; ownership never moves), runs visible to their team."""

from __future__ import annotations

from keel.core.errors import Conflict, Forbidden, NotFound
from keel.identity.principal import Principal
from keel.workflows.access import definitions_visible, require_team_for_runs, runs_visible, sees_all

__all__ = ["definitions_visible", "may_change", "mandate_owner", "require_agent_scope", "require_team_for_runs",
           "runs_visible", "sees_all"]


def mandate_owner(p: Principal, name: str, prev_team: str | None, exists: bool, requested: str | None) -> str | None:
    """The team a new version of agent `name` belongs to, or Forbidden/Conflict when `p` may not define it."""
    if exists:
        may_change(p, name, prev_team)
        if requested is not None and requested != prev_team:
            raise Conflict(f"agent {name!r} belongs to {'team ' + prev_team if prev_team else 'no team (global)'}; "
                           "a new version does not move it", fix="omit `team` when redefining it", agent=name)
        return prev_team
    if p.is_admin:
        return requested if requested is not None else p.team_id
    if p.team_id is None:
        raise Forbidden(f"key {p.key_id} has no team, so it cannot own an agent", agent=name, key_id=p.key_id,
                        fix="use a builder key that belongs to a team (global agents are defined by admins)")
    if requested is not None and requested != p.team_id:
        raise Forbidden("a builder defines agents for its own team only", fix="omit `team`", agent=name)
    return p.team_id


def may_change(p: Principal, name: str, team: str | None) -> None:
    """Raise unless `p` may change agent `name` of `team` (define a version, pause, resume)."""
    p.require("agents.define")
    if team is None and not p.is_admin:
        raise Forbidden(f"agent {name!r} is global: only admins may change it", agent=name,
                        fix="ask an admin, or define your team's own agent under another name")
    if team is not None and not p.is_admin and p.team_id != team:
        raise Conflict(f"agent {name!r} belongs to another team", fix="choose another name", agent=name)


def require_agent_scope(p: Principal, name: str) -> None:
    """A key scoped to some agents sees the others as absent."""
    if not p.may_use_agent(name):
        raise NotFound(f"agent {name!r} not found", fix="use a key whose agent scope includes it", agent=name)
