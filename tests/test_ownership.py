"""One ownership rule for every team-owned definition (workflows, agents, prompts, eval datasets): each branch,
for each kind, with the kind named in the refusal."""

from __future__ import annotations

import pytest

from keel.core.errors import Conflict, Forbidden
from keel.identity.ownership import may_change, owner
from keel.identity.principal import Principal

ADMIN = Principal(key_id="k_admin", role="admin")
RED = Principal(key_id="k_red", role="builder", team_id="t_red")
BLUE = Principal(key_id="k_blue", role="builder", team_id="t_blue")
LONE = Principal(key_id="k_lone", role="builder")
KINDS = ("workflow", "agent", "prompt", "dataset")


@pytest.mark.parametrize("kind", KINDS)
def test_a_new_definition_belongs_to_its_builders_team_and_an_admin_chooses(kind):
    assert owner(RED, kind, "x", exists=False, prev_team=None, requested=None) == "t_red"
    assert owner(RED, kind, "x", exists=False, prev_team=None, requested="t_red") == "t_red"
    assert owner(ADMIN, kind, "x", exists=False, prev_team=None, requested="t_blue") == "t_blue"
    assert owner(ADMIN, kind, "x", exists=False, prev_team=None, requested=None) is None  # a team-less admin: global


@pytest.mark.parametrize("kind", KINDS)
def test_refusals_name_the_kind_and_the_definition(kind):
    with pytest.raises(Forbidden) as e:
        owner(RED, kind, "x", exists=False, prev_team=None, requested="t_blue")  # another team's, by a builder
    assert e.value.status == 403 and kind in str(e.value.detail)
    with pytest.raises(Forbidden):
        owner(LONE, kind, "x", exists=False, prev_team=None, requested=None)  # no team, so it owns nothing
    with pytest.raises(Forbidden):
        owner(RED, kind, "x", exists=True, prev_team=None, requested=None)  # a global one: admins only
    with pytest.raises(Conflict) as c:
        owner(BLUE, kind, "x", exists=True, prev_team="t_red", requested=None)  # red's, by blue
    assert c.value.status == 409 and "another team" in str(c.value.detail)
    with pytest.raises(Conflict):
        owner(ADMIN, kind, "x", exists=True, prev_team="t_red", requested="t_blue")  # redefining never moves it


@pytest.mark.parametrize("kind", KINDS)
def test_an_existing_definition_keeps_its_team(kind):
    assert owner(RED, kind, "x", exists=True, prev_team="t_red", requested=None) == "t_red"
    assert owner(ADMIN, kind, "x", exists=True, prev_team=None, requested=None) is None
    may_change(RED, kind, "x", "t_red")
    may_change(ADMIN, kind, "x", None)
    with pytest.raises(Conflict):
        may_change(BLUE, kind, "x", "t_red")
