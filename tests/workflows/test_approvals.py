"""Approvals: approve, reject, edit-then-approve, timeout → escalation, restart while waiting,
and who may see and decide them (API and `keel approvals`)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.workflows.conftest import define, pending_approval, run_detail, start, steps_by_id, wait_run

pytestmark = pytest.mark.store

SPEC = """
name: {name}
inputs: {{type: object, properties: {{to: {{type: string}}}}}}
steps:
  - id: draft
    type: transform
    output: "Dear customer, thanks for your interest."
  - id: review
    type: approval
    approvers: [reviewer, admin]
    instructions: Check the email to {{{{ inputs.to }}}}.
    show:
      to: "{{{{ inputs.to }}}}"
      draft: "{{{{ steps.draft.output.value }}}}"
    editable: [draft]
    timeout_s: {timeout}
    on_timeout: {on_timeout}
    {extra}
  - id: send
    type: notify
    email: "{{{{ steps.review.output.fields.to }}}}"
    subject: Follow-up
    body: "{{{{ steps.review.output.fields.draft }}}}"
"""


def spec(name: str, timeout: str = "7d", on_timeout: str = "reject", extra: str = "") -> str:
    return SPEC.format(name=name, timeout=timeout, on_timeout=on_timeout, extra=extra)


def make_key(srv, role: str, team: str | None = None) -> str:
    with srv.admin() as c:
        if team:
            c.post("/admin/teams", json={"name": team})
        r = c.post("/admin/keys", json={"role": role, "team": team, "name": f"{role}-{team}"})
        assert r.status_code == 201, r.text
        return r.json()["key"]


@pytest.fixture(scope="module")
def srv(module_server_factory):
    s = module_server_factory()
    for name in ("mail_a", "mail_b", "mail_c"):
        define(s, spec(name))
    define(s, spec("mail_timeout", timeout="1s", on_timeout="escalate",
                   extra="escalate_to: [admin]\n    escalation_timeout_s: 1s"))
    return s


def outbox(srv, run_id: str) -> list[dict]:
    with srv.admin() as c:
        return c.get(f"/v1/outbox?run_id={run_id}").json()["data"]


def audit_actions(srv, run_id: str) -> list[str]:
    with srv.admin() as c:
        events = c.get("/v1/audit?limit=500").json()["data"]
    return [e["action"] for e in events if e["details"].get("run_id") == run_id]


def test_approve_sends_the_draft_and_is_audited(srv):
    """Guards the approve path: waiting_approval → approved → the step after runs with the shown values."""
    run_id = start(srv, "mail_a", {"to": "ana@example.com"})
    d = wait_run(srv, "mail_a", run_id, ("waiting_approval",))
    assert steps_by_id(d)["review"]["status"] == "waiting_approval"
    a = pending_approval(srv, run_id)
    assert a["show"] == {"to": "ana@example.com", "draft": "Dear customer, thanks for your interest."}
    assert a["instructions"] == "Check the email to ana@example.com."
    assert outbox(srv, run_id) == []
    with srv.admin() as c:
        r = c.post(f"/v1/approvals/{a['id']}/approve", json={"reason": "looks good"})
        assert r.status_code == 200, r.text
        assert c.post(f"/v1/approvals/{a['id']}/approve", json={}).status_code == 409
    d = wait_run(srv, "mail_a", run_id)
    assert d["status"] == "completed"
    assert [m["body"] for m in outbox(srv, run_id)] == ["Dear customer, thanks for your interest."]
    assert {"workflow.approval.requested", "workflow.approval.approved", "workflow.run.completed"} <= set(
        audit_actions(srv, run_id))


def test_reject_ends_the_run_without_sending(srv):
    """Guards reject: nothing after the approval runs, and the reason is recorded."""
    run_id = start(srv, "mail_b", {"to": "bo@example.com"})
    wait_run(srv, "mail_b", run_id, ("waiting_approval",))
    a = pending_approval(srv, run_id)
    with srv.admin() as c:
        assert c.post(f"/v1/approvals/{a['id']}/reject", json={"reason": "wrong tone"}).status_code == 200
        decided = c.get(f"/v1/approvals/{a['id']}").json()
    assert decided["status"] == "rejected" and decided["reason"] == "wrong tone"
    d = wait_run(srv, "mail_b", run_id)
    assert d["status"] == "completed" and d["outputs"]["outcome"] == "rejected"
    assert steps_by_id(d)["send"]["status"] == "pending"
    assert outbox(srv, run_id) == []
    assert "workflow.approval.rejected" in audit_actions(srv, run_id)


def test_edit_then_approve_sends_the_edit(srv):
    """Guards edits: the approver's text is what gets sent; non-editable fields are refused."""
    run_id = start(srv, "mail_c", {"to": "cy@example.com"})
    wait_run(srv, "mail_c", run_id, ("waiting_approval",))
    a = pending_approval(srv, run_id)
    with srv.admin() as c:
        bad = c.post(f"/v1/approvals/{a['id']}/approve", json={"edits": {"to": "evil@example.com"}})
        assert bad.status_code == 400 and "not editable" in bad.json()["detail"]
        r = c.post(f"/v1/approvals/{a['id']}/approve", json={"edits": {"draft": "Hi Cy, edited by a human."}})
        assert r.status_code == 200, r.text
    d = wait_run(srv, "mail_c", run_id)
    assert steps_by_id(d)["review"]["output"]["fields"]["draft"] == "Hi Cy, edited by a human."
    assert [(m["to"], m["body"]) for m in outbox(srv, run_id)] == [("cy@example.com", "Hi Cy, edited by a human.")]


def test_timeout_escalates_then_applies_on_timeout(srv):
    """Guards timeouts: after the first deadline the approval goes to the escalation roles; after the
    second, on_timeout decides (here: reject) and the audit trail says so."""
    run_id = start(srv, "mail_timeout", {"to": "dee@example.com"})
    wait_run(srv, "mail_timeout", run_id, ("waiting_approval",))
    d = wait_run(srv, "mail_timeout", run_id, timeout=30)
    assert d["outputs"]["outcome"] == "rejected", d
    with srv.admin() as c:
        a = c.get(f"/v1/approvals/apr_{run_id}.review").json()
    assert a["escalated"] is True and a["approvers"] == ["admin"] and a["decided_by"] == "system:timeout"
    actions = audit_actions(srv, run_id)
    assert "workflow.approval.escalated" in actions and "workflow.approval.timed_out" in actions


def test_only_allowed_roles_and_teams_see_and_decide(srv):
    """Guards approval permissions: a member cannot decide, another team's reviewer cannot even see it,
    the run's team reviewer can, and `keel approvals list` prints the id first."""
    builder = make_key(srv, "builder", "sales")
    define(srv, spec("mail_team"), key=builder)
    run_id = start(srv, "mail_team", {"to": "eve@example.com"}, key=builder)
    wait_run(srv, "mail_team", run_id, ("waiting_approval",))
    approval_id = f"apr_{run_id}.review"
    member = make_key(srv, "member", "sales")
    other = make_key(srv, "reviewer", "support")
    reviewer = make_key(srv, "reviewer", "sales")
    with srv.client(member) as c:
        assert c.post(f"/v1/approvals/{approval_id}/approve", json={}).status_code == 403
    with srv.client(other) as c:
        assert approval_id not in [a["id"] for a in c.get("/v1/approvals").json()["data"]]
        assert c.post(f"/v1/approvals/{approval_id}/approve", json={}).status_code == 404
    env = {**os.environ, "KEEL_URL": srv.url, "KEEL_API_KEY": reviewer}
    out = subprocess.run([sys.executable, "-m", "keel", "approvals", "list"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
    assert [ln.split("\t")[0] for ln in lines] == [approval_id]
    out = subprocess.run([sys.executable, "-m", "keel", "approvals", "approve", approval_id, "--edit",
                          "draft=Hello from the CLI", "--reason", "ok"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    d = wait_run(srv, "mail_team", run_id)
    assert d["status"] == "completed"
    assert [m["body"] for m in outbox(srv, run_id)] == ["Hello from the CLI"]


def test_a_waiting_run_survives_a_restart(module_server_factory, tmp_path):
    """Guards durability of waits: stop the server while a run waits, start it again, approve, and the
    run finishes exactly once."""
    first = module_server_factory()
    define(first, spec("mail_restart"))
    run_id = start(first, "mail_restart", {"to": "fay@example.com"})
    wait_run(first, "mail_restart", run_id, ("waiting_approval",))
    db_url, data_dir = first.extra["db_url"], first.data_dir
    assert first.stop() == 0
    second = module_server_factory(db_url=db_url, data_dir=data_dir)
    d = run_detail(second, "mail_restart", run_id)
    assert d["status"] == "waiting_approval"
    a = pending_approval(second, run_id)
    with second.admin() as c:
        assert c.post(f"/v1/approvals/{a['id']}/approve", json={}).status_code == 200
    d = wait_run(second, "mail_restart", run_id)
    assert d["status"] == "completed"
    assert len(outbox(second, run_id)) == 1


@pytest.mark.store
@pytest.mark.parametrize("path", ["/v1/approvals", "/v1/records/crm_leads", "/v1/outbox",
                                  "/v1/workflows/nope/runs"])
@pytest.mark.parametrize("limit", [-182662, 0, 10**9])
def test_list_limits_out_of_range_are_the_callers_422(srv, path, limit):
    """A negative `limit` reached PostgreSQL's LIMIT and answered 500 (the API fuzz found it)."""
    with srv.client(srv.admin_key) as c:
        r = c.get(path, params={"limit": limit})
    assert r.status_code == 422, r.text
    assert "limit" in r.text
