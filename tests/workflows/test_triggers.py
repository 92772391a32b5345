"""Triggers: a signed inbound webhook (HMAC with a per-trigger secret from the vault, replay window,
redelivery returns the same run) and cron schedules, all recorded in the audit trail."""

from __future__ import annotations

import time

import httpx
import orjson
import pytest

from keel.workflows.triggers import sign
from conftest import eventually
from tests.workflows.conftest import define, wait_run

pytestmark = pytest.mark.store
SECRET = "whsec-test-0123456789"

HOOKED = """
name: hooked
inputs: {type: object, required: [company], properties: {company: {type: string}}}
triggers:
  - type: webhook
    secret: hooked-secret
steps:
  - id: file
    type: record
    table: hooked_leads
    data: {company: "{{ inputs.company }}", via: "{{ run.id }}"}
"""

TICKING = """
name: ticking
triggers:
  - type: schedule
    cron: "* * * * * */2"
    inputs: {}
steps:
  - id: tick
    type: transform
    output: tick
"""


@pytest.fixture(scope="module")
def srv(module_server_factory):
    s = module_server_factory(KEEL_WORKFLOW_SCHEDULE_INTERVAL_S="0.5")
    with s.admin() as c:
        assert c.put("/admin/secrets/hooked-secret", json={"value": SECRET, "uses": ["webhook"]}).status_code in (200, 201, 204)
    define(s, HOOKED)
    return s


def post_hook(srv, body: dict, signature: str | None, **headers: str) -> httpx.Response:
    raw = orjson.dumps(body)
    hdrs = {"content-type": "application/json", **headers}
    if signature is not None:
        hdrs["x-keel-signature"] = signature
    return httpx.post(f"{srv.url}/v1/workflows/hooked/webhook", content=raw, headers=hdrs)


def test_signed_webhook_starts_a_run_as_the_owner_and_is_audited(srv):
    """Guards the webhook trigger: a valid HMAC starts a run; the audit trail records the trigger."""
    body = {"company": "Acme"}
    r = post_hook(srv, body, sign(SECRET, orjson.dumps(body)))
    assert r.status_code == 201, r.text
    run = r.json()
    assert run["trigger"] == "webhook"
    d = wait_run(srv, "hooked", run["id"])
    assert d["status"] == "completed" and d["trigger"] == "webhook"
    with srv.admin() as c:
        events = c.get("/v1/audit?action=workflow.run.started&limit=100").json()["data"]
    assert any(e["details"].get("run_id") == run["id"] and e["details"]["trigger"] == "webhook" for e in events)


def test_bad_missing_or_stale_signatures_are_refused(srv):
    """Guards authentication of the webhook: wrong secret, no signature, an old timestamp and a
    tampered body are all 401, and none starts a run."""
    body = {"company": "Evil"}
    raw = orjson.dumps(body)
    with srv.admin() as c:
        before = len(c.get("/v1/workflows/hooked/runs").json()["data"])
    assert post_hook(srv, body, sign("wrong-secret", raw)).status_code == 401
    assert post_hook(srv, body, None).status_code == 401
    assert post_hook(srv, body, sign(SECRET, raw, ts=int(time.time()) - 3600)).status_code == 401
    assert post_hook(srv, {"company": "Tampered"}, sign(SECRET, raw)).status_code == 401
    r = httpx.post(f"{srv.url}/v1/workflows/no_such_flow/webhook", content=raw,
                   headers={"x-keel-signature": sign(SECRET, raw)})
    assert r.status_code == 401  # the same answer as a bad signature: no probing for workflow names
    with srv.admin() as c:
        assert len(c.get("/v1/workflows/hooked/runs").json()["data"]) == before


def test_a_redelivered_webhook_returns_the_same_run(srv):
    """Guards idempotent delivery: the same Idempotency-Key maps to one run and one record."""
    body = {"company": "Redelivered"}
    raw = orjson.dumps(body)
    ids = {post_hook(srv, body, sign(SECRET, raw), **{"idempotency-key": "delivery-42"}).json()["id"]
           for _ in range(3)}
    assert len(ids) == 1
    run_id = ids.pop()
    wait_run(srv, "hooked", run_id)
    with srv.admin() as c:
        recs = [r for r in c.get("/v1/records/hooked_leads").json()["data"] if r["run_id"] == run_id]
    assert len(recs) == 1


def test_schedule_starts_runs_on_time_once_each(srv):
    """Guards cron triggers: a schedule every 2 s starts runs as the owner, one per due time."""
    define(srv, TICKING)

    def three_runs() -> list[dict] | None:
        with srv.admin() as c:
            runs = c.get("/v1/workflows/ticking/runs?limit=100").json()["data"]
        return runs if len(runs) >= 3 else None
    runs = eventually(three_runs, timeout=20, interval=0.5)
    assert all(r["trigger"] == "schedule" and r["id"].startswith("run_cron_ticking_") for r in runs)
    due = sorted(int(r["id"].rsplit("_", 1)[1]) for r in runs)
    assert len(set(due)) == len(due) and all(t % 2 == 0 for t in due)
    wait_run(srv, "ticking", runs[-1]["id"])
