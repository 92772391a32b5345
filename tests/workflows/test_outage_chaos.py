"""The outage chaos test: 10 lead-intake runs in flight while the upstream of their model alias answers 503
for a window, and Keel is SIGKILLed in the middle of it. The runs wait (visibly, per alias) instead of
failing, the wait survives the kill, and afterwards all 10 complete: each model call metered once in the
ledger, each side effect applied once at a counting receiver, none failed.

The issue asks for a two-minute outage; the window here defaults to 30 s so the test runs in reasonable
time (KEEL_TEST_OUTAGE_S=120 plays the full two minutes). The waits are the same either way: backoff,
then the open circuit's trial time, until the upstream answers again."""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter

import httpx
import pytest
import yaml

from conftest import ROOT, eventually, ledger_rows
from tests.fakes.openai_upstream import FakeOpenAI
from tests.workflows.conftest import receiver, steps_by_id, wait_run

pytestmark = [pytest.mark.store, pytest.mark.slow]
RUNS = 10
OUTAGE_S = float(os.environ.get("KEEL_TEST_OUTAGE_S", "30"))  # the two minutes, shortened: see above
ALIAS = "lead-chat"
EXAMPLE = ROOT / "examples" / "lead_intake"


def lead_spec(receiver_url: str) -> str:
    """The shipped lead-intake workflow with its model steps on `lead-chat` (the fake upstream), its webhooks
    pointed at the receiver, and the collection search replaced by a transform (no embedding model here)."""
    spec = yaml.safe_load((EXAMPLE / "workflow.yaml").read_text())
    spec["vars"].update(sales_webhook=f"{receiver_url}/sales", mail_webhook=f"{receiver_url}/mail")
    spec["allow_hosts"] = [receiver_url.split("://", 1)[1]]
    for step in spec["steps"]:
        if step["type"] == "llm":
            step["model"] = ALIAS
            step["prompt"] = step["prompt"].replace("steps.enrich.output.text", "steps.enrich.output.value.text")
        if step["id"] == "enrich":
            step.clear()
            step.update(id="enrich", type="transform", output={"text": "{{ inputs.company }} is a prospect."})
    return yaml.safe_dump(spec, sort_keys=False)


def waiting(c: httpx.Client) -> list[dict]:
    return c.get(f"/v1/runs?status=waiting_provider&waiting_for={ALIAS}&limit=1000").json()["data"]


def all_waiting(c: httpx.Client, run_ids: list[str]) -> bool:
    """Every run waits for the alias (a run between two tries is `running` for a moment: asked again)."""
    rows = c.get("/v1/runs?workflow=lead_intake&limit=1000").json()["data"]
    seen = {r["id"]: (r["status"], (r["waiting"] or {}).get("for")) for r in rows if r["id"] in run_ids}
    failed = [r["error"] for r in rows if r["id"] in run_ids and r["status"] == "failed"]
    assert not failed, failed  # a failure is final: stop polling at once
    return seen == {r: ("waiting_provider", ALIAS) for r in run_ids}


@pytest.mark.timeout(900)
def test_runs_outlast_a_provider_outage_and_a_sigkill_in_it(module_server_factory, tmp_path_factory):
    fake = FakeOpenAI().start()
    config = tmp_path_factory.mktemp("chaos") / "keel.yaml"
    config.write_text(f"""
models:
  - {{alias: {ALIAS}, provider: openai_compatible, model: m, id: {ALIAS}/one, base_url: {fake.url}}}
aliases:
  {ALIAS}: {{retries: 1, backoff_ms: 5, circuit_failures: 3, circuit_cooldown_s: 3}}
ledger_flush_interval_s: 0.1
""")
    srv = module_server_factory(config=config)
    db_url, data_dir = srv.extra["db_url"], srv.data_dir
    try:
        with receiver() as rcv:
            with srv.admin() as c:
                r = c.put("/admin/secrets/lead-intake-webhook", json={"value": "whsec-outage-0123456789",
                                                                       "uses": ["webhook"]})
                assert r.status_code == 200, r.text
                r = c.post("/v1/workflows", json={"spec": lead_spec(rcv)})
                assert r.status_code == 201, r.text
                fake.fail_next("503", times=-1)  # the outage starts
                outage_started = time.monotonic()
                run_ids = []
                for i in range(RUNS):
                    r = c.post("/v1/workflows/lead_intake/runs", json={"inputs": {
                        "company": "Acme Logistics", "contact": f"Lead {i}", "email": f"lead{i}@example.com",
                        "message": "Please call me back."}})
                    assert r.status_code == 201, r.text
                    run_ids.append(r.json()["id"])
                # every run waits for the alias, visibly: what for, why, and when it tries next
                eventually(lambda: all_waiting(c, run_ids), timeout=60, retry=())
                for row in waiting(c):
                    assert row["current_step"] == "summary" and row["waiting"]["for"] == ALIAS
                    assert row["waiting"]["next_try_at"] and row["waiting"]["reason"] in (
                        "upstream_unavailable", "circuit_open")

            srv.stop(signal.SIGKILL)  # the subject: Keel dies in the middle of the outage
            srv = module_server_factory(config=config, db_url=db_url, data_dir=data_dir)
            with srv.admin() as c:
                # after the restart the runs are still waiting (the kill lost no run and failed none)
                eventually(lambda: all_waiting(c, run_ids), timeout=60, retry=(httpx.HTTPError,))
            assert time.monotonic() - outage_started < OUTAGE_S, "the restart outlasted the outage window"
            time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - outage_started)))  # the subject: the outage lasts
            fake.reset()  # the upstream answers again

            for run_id in run_ids:
                wait_run(srv, "lead_intake", run_id, ("waiting_approval",), timeout=120)
            with srv.admin() as c:
                for run_id in run_ids:
                    assert c.post(f"/v1/approvals/apr_{run_id}.review/approve", json={}).status_code == 200
            details = [wait_run(srv, "lead_intake", run_id, ("completed",), timeout=120) for run_id in run_ids]
            stats = httpx.get(f"{rcv}/_stats").json()
            with srv.admin() as c:
                crm = [r for r in c.get("/v1/records/crm_leads?limit=1000").json()["data"] if r["run_id"] in run_ids]
                assert c.get("/v1/runs?status=failed").json()["data"] == []
    finally:
        fake.stop()

    rows = [r for r in ledger_rows(db_url, "task_id LIKE 'run_%'") if r.task_id in run_ids]
    ok = Counter((r.task_id, r.request_id.split("/", 1)[1].split("~", 1)[0]) for r in rows if r.status == "ok")
    failed_tries = sum(1 for r in rows if r.status != "ok")
    report = {"runs": RUNS, "outage_s": OUTAGE_S, "failed_model_tries": failed_tries, "raw": stats["raw"],
              "applied": stats["applied"], "repeats": stats["repeats"]}
    print("outage chaos test:", json.dumps(report))
    assert all(d["status"] == "completed" for d in details)
    for d in details:
        assert steps_by_id(d)["send"]["status"] == "completed" and d["usage"]["completion_tokens"] > 0
    # each model step metered once: one answered call per run and step (the refused tries bill nothing)
    assert ok == {(r, s): 1 for r in run_ids for s in ("summary", "draft")}
    assert failed_tries >= RUNS  # every run met the outage
    assert all(r.cost == 0 for r in rows if r.status != "ok")
    expected = {f"{r}.{s}" for r in run_ids for s in ("notify_sales", "send")}
    assert set(stats["by_key"]) == expected and stats["applied"] == len(expected)
    assert stats["raw"] == stats["applied"] + stats["repeats"]
    assert Counter(r["run_id"] for r in crm) == {r: 1 for r in run_ids}
