"""A policy set through the API (`PUT /admin/policy`) is the active one, and stays so across a restart; the latest
change wins: a policy file whose text is new still takes over at start, one already stored does not."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.store
API_POLICY = "name: set-through-the-api\ndata_rules:\n  - {name: r, classification: restricted, providers: [local]}\n"
FILE_POLICY = "name: from-the-file\ndata_rules:\n  - {name: r, classification: restricted, providers: [local_embed]}\n"


def active(srv) -> dict:  # noqa: ANN001
    with srv.admin() as c:
        return c.get("/admin/policy").json()


def test_the_latest_activation_wins_across_restarts(server_factory, tmp_path) -> None:  # noqa: ANN001
    """Guards where the active policy comes from: API-set beats the file text already stored at the next start;
    a new file text beats the API-set one; every activation is an audit event naming its source."""
    path = tmp_path / "policy.yaml"
    path.write_text(FILE_POLICY)
    first = server_factory(KEEL_POLICY_FILE=str(path), data_dir=tmp_path / "data")
    file_version = active(first)["version"]
    with first.admin() as c:
        r = c.put("/admin/policy", content=API_POLICY, headers={"content-type": "application/yaml"})
        assert r.status_code == 200 and r.json()["name"] == "set-through-the-api", r.text
        api_version = r.json()["version"]
        assert api_version != file_version and active(first)["version"] == api_version
        events = c.get("/v1/audit?action=policy.*").json()["data"]
        assert events[0]["action"] == "policy.change" and events[0]["details"]["source"] == "api", events
        assert events[0]["actor"] != "system"
    first.stop()

    again = server_factory(KEEL_POLICY_FILE=str(path), data_dir=tmp_path / "data")  # same file text: stored
    assert active(again)["version"] == api_version
    again.stop()

    path.write_text(FILE_POLICY.replace("from-the-file", "edited-file"))  # a new text while Keel was down
    third = server_factory(KEEL_POLICY_FILE=str(path), data_dir=tmp_path / "data")
    assert active(third)["name"] == "edited-file"
