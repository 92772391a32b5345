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


def test_a_pause_on_one_server_stops_a_run_on_another(tmp_path, server_factory):
    """Two servers on one store: the kill switch flipped on A stops B's waiting run at its next action, and B
    refuses new runs, with no restart and no message between them."""
    model = ScriptedModel({"pay": [call("pay", {"amount": 50}), say("paid")]}).start()
    receiver = Receiver().start()
    try:
        cfg = tmp_path / "keel.yaml"
        cfg.write_text(f"models:\n  - {{alias: agent-model, provider: openai_compatible, model: m, "
                       f"base_url: {model.url}}}\n")
        a = server_factory(config=cfg, data_dir=tmp_path / "a", KEEL_WORKFLOW_EXECUTOR_ID="a")
        b = server_factory(config=cfg, data_dir=tmp_path / "b", KEEL_WORKFLOW_EXECUTOR_ID="b")
        define(a, MANDATE.format(url=receiver.url))
        out = run(b, "payer", "[script:pay] pay 50", wait_s=1)
        assert out["status"] == "waiting_approval", out
        with a.admin() as c:
            assert c.post("/v1/agents/payer/pause", json={}).status_code == 200
            approval = next(x for x in c.get("/v1/approvals").json()["data"] if x["run_id"] == out["id"])
            assert c.post(f"/v1/approvals/{approval['id']}/approve", json={}).status_code == 200
        with b.admin() as c:
            assert c.post("/v1/agents/payer/runs", json={"task": "[script:pay] again"}).status_code == 409
        done = eventually(lambda: (d := detail(b, "payer", out["id"]))["status"] in ("completed", "stopped", "failed")
                          and d, timeout=60)
        assert done["status"] == "stopped" and done["error"]["rule"] == "kill_switch", done
        assert receiver.stats()["raw"] == 0
    finally:
        model.stop()
        receiver.stop()


def test_a_model_call_queued_for_a_slot_does_not_go_out_after_an_acknowledged_pause(tmp_path, server_factory):
    """The kill switch is checked once the call holds its model slot, not before it waits for one: a run queued behind
    a slow model call when the pause is acknowledged makes no model call afterwards."""
    # 6 s: the pause below must commit while the first call still holds the slot, on a loaded machine too
    model = ScriptedModel({"slow": [call("pay", {"amount": 5}), say("paid")]}, latency_ms=6000).start()
    receiver = Receiver().start()
    try:
        cfg = tmp_path / "keel.yaml"
        cfg.write_text(f"models:\n  - {{alias: agent-model, provider: openai_compatible, model: m, "
                       f"base_url: {model.url}}}\n")
        srv = server_factory(config=cfg, KEEL_WORKFLOW_MODEL_CONCURRENCY="1")  # one model call at a time
        define(srv, MANDATE.format(url=receiver.url))
        first = run(srv, "payer", "[script:slow] first", wait_s=0.1)
        eventually(lambda: model.stats()["requests"] == 1)  # the first run's call holds the one slot for 6 s
        second = run(srv, "payer", "[script:slow] second", wait_s=0.5)  # its model call waits for the slot
        with srv.admin() as c:
            assert c.post("/v1/agents/payer/pause", json={}).status_code == 200
        ended = {r["id"]: eventually(lambda r=r: (d := detail(srv, "payer", r["id"]))["status"] != "running" and d,
                                     timeout=60) for r in (first, second)}
        assert model.stats()["requests"] == 1, [m["body"] for m in model.received]
        assert ended[second["id"]]["status"] == "stopped"
        assert ended[second["id"]]["error"]["rule"] == "kill_switch"
        assert [(a["kind"], a["decision"], a["rule"]) for a in ended[second["id"]]["actions"]] == [
            ("model", "refused", "kill_switch")]
        assert receiver.stats()["raw"] == 0
    finally:
        model.stop()
        receiver.stop()
