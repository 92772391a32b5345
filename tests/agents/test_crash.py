"""The crash test for agents: 10 runs, each paying three times (the last after a person's approval) and
recording a row, while the server is SIGKILLed at random moments and restarted. Afterwards every run is
complete, every payment was applied once per run and position (the loopback receiver dedupes by idempotency
key and counts raw repeats), each action is logged once, and no model call is metered twice."""

from __future__ import annotations

import json
import random
import signal
import time
from collections import Counter

import httpx
import pytest
import sqlalchemy as sa

from conftest import eventually, ledger_rows
from tests.agents.conftest import ScriptedModel, call, detail, say
from tests.fakes.receiver import Receiver

pytestmark = [pytest.mark.store, pytest.mark.slow]
RUNS = 10
SCRIPT = [call("pay", {"amount": 5}), call("pay", {"amount": 6}), call("pay", {"amount": 50}),
          call("record", {"table": "payments", "data": {"paid": 61}}), say("paid")]
PAY_SEQS = (2, 4, 6)  # model 1, pay 2, model 3, pay 4, model 5, pay 6 (after approval), model 7, record 8, model 9
MANDATE = """\
name: payer
model: agent-model
goal: Pay.
budgets: {{wall_time: 1h}}
tools:
  record: {{tables: [payments]}}
  pay:
    endpoint: {url}/pay
    parameters: {{type: object, required: [amount], properties: {{amount: {{type: number}}}}}}
approvals:
  - {{tool: pay, when: amount > 10}}
"""


def statuses(srv, run_ids):
    with srv.admin() as c:
        rows = c.get("/v1/agents/payer/runs?limit=100").json()["data"]
    return Counter(r["status"] for r in rows if r["id"] in run_ids)


def wait_all(srv, run_ids, wanted, timeout=180):
    return eventually(lambda: sum(statuses(srv, run_ids)[s] for s in wanted) == len(run_ids), timeout=timeout,
                      interval=0.2, retry=(httpx.HTTPError,))


@pytest.mark.timeout(900)
def test_sigkill_at_random_moments_loses_and_repeats_nothing(tmp_path, server_factory):
    rnd = random.Random(11)
    model = ScriptedModel({"pay": SCRIPT}, latency_ms=150).start()
    rcv = Receiver().start()
    try:
        cfg = tmp_path / "keel.yaml"
        cfg.write_text(f"models:\n  - {{alias: agent-model, provider: openai_compatible, model: m, "
                       f"base_url: {model.url}}}\nledger_flush_interval_s: 0.1\n")
        srv = server_factory(config=cfg)
        db_url, data_dir = srv.extra["db_url"], srv.data_dir
        with srv.admin() as c:
            assert c.post("/v1/agents", json={"spec": MANDATE.format(url=rcv.url)}).status_code == 201
            run_ids = []
            for _ in range(RUNS):
                r = c.post("/v1/agents/payer/runs", json={"task": "[script:pay] pay", "wait_s": 0})
                assert r.status_code == 202, r.text
                run_ids.append(r.json()["id"])
        kills = 0
        for _ in range(4):  # kill while runs are mid-flight, then restart on the same store
            time.sleep(rnd.uniform(0.2, 1.5))  # the subject: a kill at a random moment of the runs
            srv.stop(signal.SIGKILL)
            kills += 1
            srv = server_factory(config=cfg, db_url=db_url, data_dir=data_dir)
            if statuses(srv, run_ids).get("running", 0) == 0:
                break
        wait_all(srv, run_ids, ("waiting_approval",))

        def approve(ids):
            with srv.admin() as c:
                for a in c.get("/v1/approvals?limit=500").json()["data"]:
                    if a["run_id"] in ids:
                        assert c.post(f"/v1/approvals/{a['id']}/approve", json={}).status_code == 200
        approve(run_ids[:5])
        time.sleep(rnd.uniform(0.0, 0.5))  # the subject: a kill at a random moment of the approved payments
        srv.stop(signal.SIGKILL)
        kills += 1
        srv = server_factory(config=cfg, db_url=db_url, data_dir=data_dir)
        approve(run_ids[5:])
        wait_all(srv, run_ids, ("completed",))
        details = [detail(srv, "payer", r) for r in run_ids]
        stats = rcv.stats()
    finally:
        model.stop()
        rcv.stop()

    print("agent crash test:", json.dumps({"kills": kills, "raw": stats["raw"], "applied": stats["applied"],
                                           "repeats": stats["repeats"]}))
    expected = {f"{r}.{s}" for r in run_ids for s in PAY_SEQS}
    assert set(stats["by_key"]) == expected
    assert stats["applied"] == len(expected) and stats["raw"] == stats["applied"] + stats["repeats"]
    for d in details:
        assert d["answer"] == "paid"
        assert [a["seq"] for a in d["actions"]] == list(range(1, 10))
        assert all(a["decision"] == "allowed" for a in d["actions"])
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            effects = conn.execute(sa.text("SELECT run_id FROM agent_effects WHERE kind = 'record'")).scalars().all()
    finally:
        engine.dispose()
    assert Counter(effects) == {r: 1 for r in run_ids}
    ids = [row.request_id for row in ledger_rows(db_url, "task_id LIKE 'arun_%'")]
    assert len(ids) == len(set(ids)) == RUNS * 5  # each model call metered exactly once
