"""Who sees what in workflows, in one place: definitions are global or a team's; runs and everything a
run leaves behind (approvals, records, outbox mail) belong to the run's team.

Admins see everything; an auditor without a team reads everything (a team-bound one its team); anyone
else sees only its own team's runs, so a run by a team-less key is for admins and auditors alone.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from keel.core.errors import Conflict, Forbidden
from keel.identity.principal import Principal


def sees_all(p: Principal) -> bool:
    return p.is_admin or (p.team_id is None and p.has("audit.read"))


def definitions_visible(p: Principal, team_col: sa.Column) -> Any:
    """Global definitions and the caller's team's."""
    return sa.true() if sees_all(p) else sa.or_(team_col.is_(None), team_col == p.team_id)


def runs_visible(p: Principal, team_col: sa.Column) -> Any:
    """Runs, approvals, records and outbox rows of the caller's team only."""
    if sees_all(p):
        return sa.true()
    if p.team_id is None:
        return sa.false()
    return team_col == p.team_id


def require_team_for_runs(p: Principal) -> None:
    """A team-less non-admin's run would be visible to admins alone: refuse it up front instead."""
    if p.team_id is None and not p.is_admin:
        raise Forbidden(f"key {p.key_id} has no team, and a run without a team is visible to admins only",
                        fix="use a key that belongs to a team (or an admin key)", key_id=p.key_id)


def definition_owner(p: Principal, name: str, prev_team: str | None, exists: bool, requested: str | None) -> str | None:
    """The team a new version of workflow `name` belongs to, or Forbidden/Conflict when `p` may not define it.

    A global workflow changes only by admins; a team's only by its builders (and admins); a new one belongs to
    the builder's team (an admin's: the requested team, else the admin's own, global for a team-less admin);
    ownership never moves by redefining."""
    if exists:
        if prev_team is None and not p.is_admin:
            raise Forbidden(f"workflow {name!r} is global: only admins may change it", workflow=name,
                            fix="ask an admin to change it, or define your team's own workflow under another name")
        if prev_team is not None and not p.is_admin and p.team_id != prev_team:
            raise Conflict(f"workflow {name!r} belongs to another team", fix="choose another name", workflow=name)
        if requested is not None and requested != prev_team:
            raise Conflict(f"workflow {name!r} belongs to {'team ' + prev_team if prev_team else 'no team (global)'}; "
                           "a new version does not move it", fix="omit `team` when redefining it", workflow=name)
        return prev_team
    if p.is_admin:
        return requested if requested is not None else p.team_id
    if p.team_id is None:
        raise Forbidden(f"key {p.key_id} has no team, so it cannot own a workflow", workflow=name, key_id=p.key_id,
                        fix="use a builder key that belongs to a team (global workflows are defined by admins)")
    if requested is not None and requested != p.team_id:
        raise Forbidden("a builder defines workflows for its own team only", fix="omit `team`", workflow=name)
    return p.team_id


def trigger_principal(ver: Any) -> Principal:
    """Who a webhook- or schedule-started run acts as: the version's definer, unless that is not a member of the
    workflow's team (an admin defining it for a team); then a builder of the team, so the run reads only what
    the team may read and its results leak nothing to the team."""
    owner = Principal.from_dict(ver.owner)
    if ver.team_id is not None and owner.team_id != ver.team_id:
        return Principal(key_id="system", role="builder", team_id=ver.team_id, key_name=f"workflow {ver.name}")
    return owner
