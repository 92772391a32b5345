"""Who sees what in workflows, in one place: definitions are global or a team's; runs and everything a
run leaves behind (approvals, records, outbox mail) belong to the run's team.

Admins see everything; an auditor without a team reads everything (a team-bound one its team); anyone
else sees only its own team's runs, so a run by a team-less key is for admins and auditors alone.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from keel.core.errors import Forbidden
from keel.identity import ownership
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
    """The team a new version of workflow `name` belongs to, or Forbidden/Conflict when `p` may not define it
    (the rule every team-owned definition follows: `keel.identity.ownership`)."""
    return ownership.owner(p, "workflow", name, exists=exists, prev_team=prev_team, requested=requested)


def trigger_principal(ver: Any) -> Principal:
    """Who a webhook- or schedule-started run acts as: the version's definer, unless that is not a member of the
    workflow's team (an admin defining it for a team); then a builder of the team, so the run reads only what
    the team may read and its results leak nothing to the team."""
    owner = Principal.from_dict(ver.owner)
    if ver.team_id is not None and owner.team_id != ver.team_id:
        return Principal(key_id="system", role="builder", team_id=ver.team_id, key_name=f"workflow {ver.name}")
    return owner
