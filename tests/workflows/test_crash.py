"""The crash test: 20 lead-intake runs (the shipped example, the bundled local model) while the server
is killed with SIGKILL at random moments and restarted. Afterwards every run waits for approval or is
complete, each side effect was applied once per run and step (the loopback receiver dedupes by
idempotency key and counts raw repeats), the CRM and outbox hold one row per run and step, and no
ledger row is duplicated."""

from __future__ import annotations

import json
import random
import signal
import time
from collections import Counter

import httpx
import pytest
import yaml

from conftest import EMBEDDED, ROOT, ledger_rows
from tests.workflows.conftest import receiver, steps_by_id, wait_run

pytestmark = [pytest.mark.store, pytest.mark.slow]
RUNS = 20
EXAMPLE = ROOT / "examples" / "lead_intake"


def lead_spec(receiver_url: str) -> str:
    """The example with its webhooks pointed at the receiver (and shorter generations, for time)."""
    spec = yaml.safe_load((EXAMPLE / "workflow.yaml").read_text())
    spec["vars"].update(sales_webhook=f"{receiver_url}/sales", mail_webhook=f"{receiver_url}/mail")
    spec["allow_hosts"] = [receiver_url.split("://", 1)[1]]
    for step in spec["steps"]:
        if step["type"] == "llm":
            step["max_tokens"] = 32
    return yaml.safe_dump(spec, sort_keys=False)


def setup_companies(c: httpx.Client) -> None:
    r = c.post("/v1/collections", json={"name": "companies", "classification": "internal"})
    assert r.status_code == 201, r.text
    files = [("files", (p.name, p.read_bytes(), "text/markdown")) for p in sorted((EXAMPLE / "companies").glob("*.md"))]
    r = c.post(f"/v1/collections/{r.json()['id']}/documents", params={"wait": 120}, files=files, timeout=180)
    assert r.status_code in (200, 201, 202), r.text


def statuses(c: httpx.Client) -> Counter:
    return Counter(r["status"] for r in c.get("/v1/workflows/lead_intake/runs?limit=100").json()["data"])


@pytest.mark.timeout(1200)  # ~3.5 min here: 40 generations by the bundled model on one thread, 7 restarts
def test_sigkill_at_random_moments_loses_and_repeats_nothing(module_server_factory):
    rnd = random.Random(7)
    srv = module_server_factory(**EMBEDDED)
    db_url, data_dir = srv.extra["db_url"], srv.data_dir
    with receiver() as rcv:
        with srv.admin() as c:
            setup_companies(c)
            r = c.put("/admin/secrets/lead-intake-webhook", json={"value": "whsec-crash-0123456789", "uses": ["webhook"]})
            assert r.status_code == 200, r.text
            r = c.post("/v1/workflows", json={"spec": lead_spec(rcv)})
            assert r.status_code == 201, r.text
            run_ids = []
            for i in range(RUNS):
                r = c.post("/v1/workflows/lead_intake/runs", json={"inputs": {
                    "company": rnd.choice(["Acme Logistics", "Northwind Health", "Brightpath Learning"]),
                    "contact": f"Lead {i}", "email": f"lead{i}@example.com", "message": "Please call me back."}})
                assert r.status_code == 201, r.text
                run_ids.append(r.json()["id"])

        kills = 0
        for _ in range(6):  # kill while runs are mid-flight, then restart on the same store
            time.sleep(rnd.uniform(0.5, 4.0))  # the subject: a kill at a random moment of the runs
            srv.stop(signal.SIGKILL)
            kills += 1
            srv = module_server_factory(db_url=db_url, data_dir=data_dir, **EMBEDDED)
            with srv.admin() as c:
                if statuses(c).get("running", 0) == 0:
                    break

        for run_id in run_ids:
            wait_run(srv, "lead_intake", run_id, ("waiting_approval", "completed"), timeout=600)
        # approve half, kill in the middle of the sends, restart, approve the rest
        with srv.admin() as c:
            for run_id in run_ids[:10]:
                assert c.post(f"/v1/approvals/apr_{run_id}.review/approve", json={}).status_code == 200
        time.sleep(rnd.uniform(0.0, 0.5))  # the subject: a kill at a random moment of the sends
        srv.stop(signal.SIGKILL)
        kills += 1
        srv = module_server_factory(db_url=db_url, data_dir=data_dir, **EMBEDDED)
        with srv.admin() as c:
            for run_id in run_ids[10:]:
                assert c.post(f"/v1/approvals/apr_{run_id}.review/approve", json={}).status_code == 200
        details = [wait_run(srv, "lead_intake", run_id, ("completed",), timeout=300) for run_id in run_ids]

        stats = httpx.get(f"{rcv}/_stats").json()
        with srv.admin() as c:
            crm = [r for r in c.get("/v1/records/crm_leads?limit=1000").json()["data"] if r["run_id"] in run_ids]
            mail = [m for m in c.get("/v1/outbox?limit=1000").json()["data"] if m["run_id"] in run_ids]

    report = {"kills": kills, "raw": stats["raw"], "applied": stats["applied"], "repeats": stats["repeats"]}
    print("crash test:", json.dumps(report))
    assert all(d["status"] == "completed" for d in details)
    for d in details:
        assert steps_by_id(d)["send"]["status"] == "completed"
        assert d["usage"]["calls"] >= 2 and d["usage"]["completion_tokens"] > 0
    # one applied effect per run and step; anything else the receiver saw is a counted repeat
    expected = {f"{r}.{s}" for r in run_ids for s in ("notify_sales", "send")}
    assert set(stats["by_key"]) == expected
    assert stats["applied"] == len(expected)
    assert stats["raw"] == stats["applied"] + stats["repeats"]
    assert Counter(r["run_id"] for r in crm) == {r: 1 for r in run_ids}
    assert Counter((m["run_id"], m["step"]) for m in mail) == {(r, s): 1 for r in run_ids
                                                               for s in ("notify_sales", "send")}
    rows = ledger_rows(db_url, "task_id LIKE 'run_%'")
    ids = [row.request_id for row in rows if row.task_id in run_ids]
    assert len(ids) == len(set(ids))
    for run_id in run_ids:  # each model step metered exactly once
        assert ids.count(f"{run_id}/summary") == 1 and ids.count(f"{run_id}/draft") == 1
