"""The console's rate-limit removal takes what the set form takes: a team by name (or id) and a key by prefix
(or id), as the API resolves them — a team name used to match nothing and answer not-found while the limit
stayed. A limit whose team is gone is still removed by the stored id the limits table shows."""

from __future__ import annotations

import re

import httpx
import pytest

pytestmark = pytest.mark.store


@pytest.fixture(scope="module")
def srv(module_server_factory):
    s = module_server_factory()
    with s.admin() as a:
        assert a.post("/admin/teams", json={"name": "sales"}).status_code in (201, 409)
    return s


def _console(srv) -> tuple[httpx.Client, str]:
    from conftest import ADMIN_KEY

    c = httpx.Client(base_url=srv.url)
    csrf = re.search(r'name="csrf" value="([^"]+)"', c.get("/console/sign-in").text).group(1)
    assert c.post("/console/sign-in", data={"csrf": csrf, "key": ADMIN_KEY}).status_code == 303
    return c, re.search(r'name="csrf" value="([^"]+)"', c.get("/console/limits").text).group(1)


def test_a_team_limit_is_removed_by_the_team_name(srv):
    """Guards: the delete form passing the typed name straight to the store instead of resolving it."""
    c, csrf = _console(srv)
    with srv.admin() as a:
        assert c.post("/console/limits", data={"csrf": csrf, "scope": "team", "ref": "sales", "rpm": "60"}
                      ).status_code == 200
        assert [x["scope"] for x in a.get("/admin/limits").json()["data"]] == ["team"]
        r = c.post("/console/limits/delete", data={"csrf": csrf, "scope": "team", "ref": "sales"})
        assert r.status_code == 303, (r.status_code, r.text[:300])
        assert a.get("/admin/limits").json()["data"] == []
        r = c.post("/console/limits/delete", data={"csrf": csrf, "scope": "team", "ref": "no-such-team"})
        assert r.status_code == 404
    c.close()


def test_a_limit_left_by_a_deleted_team_is_removed_by_its_id(srv):
    c, csrf = _console(srv)
    with srv.admin() as a:
        team = a.post("/admin/teams", json={"name": "gone"}).json()
        assert a.put(f"/admin/limits/teams/{team['id']}", json={"rpm": 5}).status_code == 200
        assert a.delete(f"/admin/teams/{team['id']}").status_code in (200, 204)
        r = c.post("/console/limits/delete", data={"csrf": csrf, "scope": "team", "ref": team["id"]})
        assert r.status_code == 303, (r.status_code, r.text[:300])
        assert a.get("/admin/limits").json()["data"] == []
    c.close()
