"""Agent runs are durable: a server SIGKILLed while a run waits for a person resumes it after restart, and
the approved side effect is applied exactly once. Mandates in the `agents/` folder load at start."""

from __future__ import annotations

import signal

import pytest

from conftest import eventually
from tests.agents.conftest import ScriptedModel, call, define, detail, run, say
from tests.fakes.receiver import Receiver

pytestmark = pytest.mark.store

MANDATE = """\
name: payer
model: agent-model
goal: Pay.
tools:
  pay:
    endpoint: {url}/pay
    parameters: {{type: object, required: [amount], properties: {{amount: {{type: number}}}}}}
approvals:
  - {{tool: pay, when: amount > 10}}
"""


def test_a_run_waiting_for_approval_survives_a_crash_and_pays_once(tmp_path, server_factory):
    model = ScriptedModel({"pay": [call("pay", {"amount": 50}), say("paid")]}).start()
    receiver = Receiver().start()
    try:
        cfg = tmp_path / "keel.yaml"
        cfg.write_text(f"models:\n  - {{alias: agent-model, provider: openai_compatible, model: m, "
                       f"base_url: {model.url}}}\n")
        srv = server_factory(config=cfg)
        define(srv, MANDATE.format(url=receiver.url))
        out = run(srv, "payer", "[script:pay] pay 50", wait_s=1)
        assert out["status"] == "waiting_approval", out
        srv.stop(signal.SIGKILL)
        srv = server_factory(config=cfg)
        with srv.admin() as c:
            approval = next(a for a in c.get("/v1/approvals").json()["data"] if a["run_id"] == out["id"])
            assert c.post(f"/v1/approvals/{approval['id']}/approve", json={}).status_code == 200
        done = eventually(lambda: (d := detail(srv, "payer", out["id"]))["status"] == "completed" and d, timeout=60)
        assert done["answer"] == "paid"
        assert [a["decision"] for a in done["actions"]] == ["allowed", "allowed", "allowed"]
        stats = receiver.stats()
        assert stats["applied"] == 1 and stats["repeats"] == 0
    finally:
        model.stop()
        receiver.stop()


def test_mandates_in_the_agents_folder_load_at_start(tmp_path, server_factory):
    folder = tmp_path / "data" / "agents"
    folder.mkdir(parents=True)
    (folder / "payer.yaml").write_text(MANDATE.format(url="http://127.0.0.1:9"))
    (folder / "broken.yaml").write_text("name: Broken\n")
    srv = server_factory()
    with srv.admin() as c:
        assert [a["name"] for a in c.get("/v1/agents").json()["data"]] == ["payer"]
    assert "agent mandate not loaded" in srv.logs()
