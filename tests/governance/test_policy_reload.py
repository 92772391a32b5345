"""The policy file is hot-reloaded: a valid change becomes a new stored version within a poll and decisions
name it; an invalid change is rejected (logged, audited) and the last good version stays; an invalid file
at start stops the server before the port is bound, naming the field."""

from __future__ import annotations

import pytest

from conftest import eventually
from tests.governance.conftest import POLICY, chat

pytestmark = pytest.mark.store


def _active(srv) -> int:
    with srv.admin() as admin:
        return admin.get("/admin/policy/versions").json()["active"]


def test_hot_reload_versions_and_rejection(governed, keys):
    path = governed.extra["policy_path"]
    key = keys.keys[("member", "red")]
    v1 = _active(governed)
    denied = chat(governed, key, "cloud", "hi", metadata={"classification": "restricted"})
    assert denied.status_code == 403 and denied.json()["policy_version"] == v1
    path.write_text(POLICY.replace('providers: [local, local_embed]\n    deployments: ["onprem/*", "mixed/onprem"]',
                                   'providers: [local, local_embed, openai_compatible]'))
    eventually(lambda: _active(governed) == v1 + 1)
    assert chat(governed, key, "cloud", "hi", metadata={"classification": "restricted"}).status_code == 200
    path.write_text("data_rules:\n  - {name: broken, classification: nonsense}\n")
    with governed.admin() as admin:
        eventually(lambda: any(e["action"] == "policy.rejected"
                                     for e in admin.get("/v1/audit?action=policy.*").json()["data"]))
        assert _active(governed) == v1 + 1
        versions = admin.get("/admin/policy/versions").json()["data"]
        assert [v["version"] for v in versions] == [v1 + 1, v1]
        old = admin.get(f"/admin/policy/versions/{v1}").json()
        assert "restricted-on-prem-only" in old["content"]
        changes = [e for e in admin.get("/v1/audit?action=policy.change").json()["data"]]
        assert {e["details"]["policy_version"] for e in changes} == {v1, v1 + 1}
        assert admin.get("/v1/audit/verify").json()["ok"]
    assert "policy file rejected" in governed.logs()
    path.write_text(POLICY)  # back to the first text: the stored version is reused, not duplicated
    eventually(lambda: _active(governed) == v1)


def test_invalid_policy_at_start_exits_before_binding(tmp_path, server_factory):
    policy = tmp_path / "bad.yaml"
    policy.write_text("name: x\nguards:\n  output: {injection: block}\n")
    with pytest.raises(RuntimeError) as exc:
        server_factory(KEEL_POLICY_FILE=str(policy))
    assert "guards.output.injection" in str(exc.value) and "bad.yaml:3" in str(exc.value)
