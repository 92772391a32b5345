"""Who may define or change a team-owned definition — a workflow, an agent's mandate, a prompt, an eval
dataset: one rule for all of them.

A definition is global (no team) or a team's. A global one changes only by admins; a team's only by that
team's builders (and admins); redefining never moves it. A new one belongs to its builder's team (an admin's:
the requested team, else the admin's own, global for a team-less admin); a key without a team owns nothing.

>>> owner(p, "workflow", "lead-intake", exists=False, prev_team=None, requested=None)
'team_red'
"""

from __future__ import annotations

from keel.core.errors import Conflict, Forbidden
from keel.identity.principal import Principal


def may_change(p: Principal, kind: str, name: str, team: str | None) -> None:
    """Raise unless `p` may change `kind` `name`, which belongs to `team` (None: global)."""
    if team is None and not p.is_admin:
        raise Forbidden(f"{kind} {name!r} is global: only admins may change it", **{kind: name},
                        fix=f"ask an admin to change it, or define your team's own {kind} under another name")
    if team is not None and not p.is_admin and p.team_id != team:
        raise Conflict(f"{kind} {name!r} belongs to another team", fix="choose another name", **{kind: name})


def owner(p: Principal, kind: str, name: str, *, exists: bool, prev_team: str | None,
          requested: str | None) -> str | None:
    """The team a new version of `kind` `name` belongs to (`prev_team` if it `exists`; `requested` is the
    definer's `team`), or Forbidden/Conflict when `p` may not define it."""
    if exists:
        may_change(p, kind, name, prev_team)
        if requested is not None and requested != prev_team:
            raise Conflict(f"{kind} {name!r} belongs to {'team ' + prev_team if prev_team else 'no team (global)'}; "
                           "a new version does not move it", fix="omit `team` when redefining it", **{kind: name})
        return prev_team
    if p.is_admin:
        return requested if requested is not None else p.team_id
    if p.team_id is None:
        raise Forbidden(f"key {p.key_id} has no team, so it cannot own a {kind}", **{kind: name}, key_id=p.key_id,
                        fix=f"use a builder key that belongs to a team (global {kind}s are defined by admins)")
    if requested is not None and requested != p.team_id:
        raise Forbidden(f"a builder defines {kind}s for its own team only", fix="omit `team`", **{kind: name})
    return p.team_id
