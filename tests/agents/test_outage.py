"""Agent runs outlast provider outages: a model call told "not now" (an upstream 503, with or without
Retry-After) waits durably and visibly (`waiting_provider`, with the alias and the next try, in the API and
`keel agents show`), then continues; each model call is metered once and each tool's effect applied once; an
operator resumes a wait early (API and `keel agents resume-run`, within the run's team); a policy denial fails
the run at once without reaching the upstream; a wait past the run's wall time ends it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from conftest import eventually, ledger_rows, problem
from tests.agents.conftest import ScriptedModel, call, define, detail, run, say
from tests.governance.conftest import Keys

pytestmark = pytest.mark.store
POLICY = """
name: agents-outage
data_rules:
  - name: confidential-on-prem-only
    classification: confidential
    providers: [local]
    deployments: ["onprem/*"]
"""
MANDATE = """\
name: {name}
model: agent-model
goal: File leads.
budgets: {{wall_time: {wall}}}
tools:
  record: {{tables: [leads]}}
"""
SCRIPT = [call("record", {"table": "leads", "data": {"lead": "ann"}}), say("filed")]


class OutageModel(ScriptedModel):
    """The scripted model, whose upstream answers 503 to the model call after the tool (turn 1) while
    `outage[script]` is on; `retry_after[script]` (when set) goes with each 503 as `Retry-After`."""

    def __init__(self, **kw: Any) -> None:
        names = ("ra", "plain", "resume", "bounded", "maxwait", "denied", "restart")
        super().__init__({n: SCRIPT for n in names}, **kw)
        self.outage: dict[str, bool] = {}
        self.retry_after_for: dict[str, str] = {}
        self.pending: str | None = None
        self.calls: Counter[str] = Counter()  # model calls per script: other tests' runs may still be retrying

    def record(self, request: Any, body: Any) -> str | None:
        fault = super().record(request, body)
        if fault or not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return fault
        task = next((m.get("content") or "" for m in body["messages"] if m.get("role") == "user"), "")
        name = task.split("[script:", 1)[1].split("]", 1)[0] if "[script:" in task else ""
        turn = sum(1 for m in body["messages"] if m.get("role") == "assistant")
        self.calls[name] += 1
        if turn == 1 and self.outage.get(name):
            self.pending = self.retry_after_for.get(name)  # read by error_response with no await in between
            self.faults["503"] += 1
            return "503"
        return None

    def error_response(self, status: int, message: str) -> Any:
        if status != 503 or not self.pending:
            return super().error_response(status, message)
        after, self.pending = self.pending, None
        return self.json(self.error_body(status, message), status, {"retry-after": after})


@pytest.fixture(scope="module")
def world(tmp_path_factory, module_server_factory):
    model = OutageModel().start()
    base = tmp_path_factory.mktemp("agents-outage")
    (base / "policy.yaml").write_text(POLICY)
    (base / "keel.yaml").write_text(f"""
models:
  - {{alias: agent-model, provider: openai_compatible, model: m, id: cloud/one, base_url: {model.url}}}
aliases:
  agent-model: {{retries: 0, circuit_failures: 1000}}
ledger_flush_interval_s: 0.1
""")
    srv = module_server_factory(config=base / "keel.yaml", KEEL_POLICY_FILE=str(base / "policy.yaml"))
    keys = Keys(srv)
    try:
        yield {"srv": srv, "model": model, "keys": keys}
    finally:
        srv.stop()
        model.stop()


def status_of(srv, name: str, run_id: str, key: str, wanted: str) -> dict[str, Any]:
    return eventually(lambda: (d := detail(srv, name, run_id, key))["status"] == wanted and d, timeout=60,
                      interval=0.05, retry=(AssertionError, httpx.HTTPError))


def effects(srv, run_id: str) -> int:
    engine = sa.create_engine(srv.extra["db_url"])
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text("SELECT count(*) FROM agent_effects WHERE run_id = :r"), {"r": run_id}).scalar()
    finally:
        engine.dispose()


def metered_once(srv, run_id: str) -> list[str]:
    """Every model call's ledger row once (distinct request ids per try); the ids of the ones that answered."""
    rows = eventually(lambda: (r := ledger_rows(srv.extra["db_url"], f"task_id = '{run_id}'"))
                      and sum(1 for x in r if x.status == "ok") == 2 and r, timeout=30)
    ids = [r.request_id for r in rows]
    assert len(ids) == len(set(ids)), ids
    return sorted(r.request_id for r in rows if r.status == "ok")


def keel_cli(srv, key: str, *args: str) -> str:
    env = {**os.environ, "KEEL_URL": srv.url, "KEEL_API_KEY": key}
    out = subprocess.run([sys.executable, "-m", "keel", *args], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.parametrize("script,retry_after,reason", [("ra", "1", "upstream_unavailable"),
                                                        ("plain", None, "upstream_unavailable")])
def test_a_503_window_is_waited_out_and_the_run_completes(world, script, retry_after, reason):
    """Guards the reported failure: a provider outage ended runs for good; now the run waits for it (visibly),
    then completes with each model call metered once and the tool's effect applied once."""
    srv, model, builder = world["srv"], world["model"], world["keys"].keys[("builder", "red")]
    name = f"outage_{script}"
    define(srv, MANDATE.format(name=name, wall="1h"), key=builder)
    if retry_after:
        model.retry_after_for[script] = retry_after
    model.outage[script] = True
    out = run(srv, name, f"File ann [script:{script}]", key=builder, wait_s=0)
    d = status_of(srv, name, out["id"], builder, "waiting_provider")
    w = d["waiting"]
    assert w["for"] == "agent-model" and w["kind"] == "model" and w["reason"] == reason, w
    assert w["code"] == "upstream_error" and w["next_try_at"] > w["since"] and "topic" not in w
    assert [(a["seq"], a["kind"], a["decision"]) for a in d["actions"]] == [(1, "model", "allowed"),
                                                                            (2, "tool", "allowed")]
    shown = json.loads(keel_cli(srv, builder, "agents", "show", name, out["id"]))
    # a 1 s Retry-After can end this wait (status back to running) while the CLI starts; the wait stays listed
    assert shown["status"] in ("waiting_provider", "running") and shown["waits"][0]["for"] == "agent-model", shown
    eventually(lambda: detail(srv, name, out["id"], builder)["waits"][-1]["waits"] >= 2, timeout=30)  # it retries
    model.outage[script] = False  # the provider is back
    d = status_of(srv, name, out["id"], builder, "completed")
    assert d["answer"] == "filed" and d["error"] is None and d["waiting"] is None, d
    assert len(d["waits"]) >= 2 and {x["for"] for x in d["waits"]} == {"agent-model"} and d["waits"][0]["seq"] == 3
    assert [(a["seq"], a["kind"], a["decision"]) for a in d["actions"]] == [
        (1, "model", "allowed"), (2, "tool", "allowed"), (3, "model", "allowed")]
    ok = metered_once(srv, out["id"])
    assert ok[0] == f"{out['id']}/1" and ok[1].startswith(f"{out['id']}/3~"), ok
    assert effects(srv, out["id"]) == 1


@pytest.mark.timeout(300)
def test_a_wait_survives_a_sigkill_of_keel(tmp_path, server_factory):
    """The wait is durable: Keel is SIGKILLed while a run waits, restarted on the same store, and the run goes on
    waiting (trying again), then completes once the provider is back; nothing is metered or applied twice."""
    model = OutageModel().start()
    try:
        cfg = tmp_path / "keel.yaml"
        cfg.write_text(f"models:\n  - {{alias: agent-model, provider: openai_compatible, model: m, "
                       f"base_url: {model.url}}}\n"
                       "aliases:\n  agent-model: {retries: 0, circuit_failures: 1000}\nledger_flush_interval_s: 0.1\n")
        srv = server_factory(config=cfg)
        db_url, data_dir = srv.extra["db_url"], srv.data_dir
        define(srv, MANDATE.format(name="outage_restart", wall="1h"))
        model.retry_after_for["restart"] = "1"
        model.outage["restart"] = True
        out = run(srv, "outage_restart", "File ann [script:restart]", wait_s=0)
        status_of(srv, "outage_restart", out["id"], srv.admin_key, "waiting_provider")
        srv.stop(signal.SIGKILL)
        refused = model.faults["503"]
        srv = server_factory(config=cfg, db_url=db_url, data_dir=data_dir)
        d = detail(srv, "outage_restart", out["id"])
        assert d["status"] in ("waiting_provider", "running") and d["waits"], d
        eventually(lambda: model.faults["503"] >= refused + 2, timeout=60)  # the restarted server goes on trying
        model.outage["restart"] = False
        d = status_of(srv, "outage_restart", out["id"], srv.admin_key, "completed")
        assert d["answer"] == "filed" and d["waiting"] is None
        assert [(a["seq"], a["decision"]) for a in d["actions"]] == [(1, "allowed"), (2, "allowed"), (3, "allowed")]
        ok = metered_once(srv, out["id"])
        assert ok[0] == f"{out['id']}/1" and ok[1].startswith(f"{out['id']}/3~"), ok
        assert effects(srv, out["id"]) == 1
    finally:
        model.stop()


def test_an_operator_resumes_a_wait_early_within_the_runs_team(world):
    srv, model, keys = world["srv"], world["model"], world["keys"].keys
    builder, member = keys[("builder", "red")], keys[("member", "red")]
    define(srv, MANDATE.format(name="outage_resume", wall="1h"), key=builder)
    model.retry_after_for["resume"] = "600"  # come back in ten minutes: the run waits that long unless resumed
    model.outage["resume"] = True
    out = run(srv, "outage_resume", "File ann [script:resume]", key=builder, wait_s=0)
    d = status_of(srv, "outage_resume", out["id"], builder, "waiting_provider")
    assert 590 <= _seconds(d["waiting"]["since"], d["waiting"]["next_try_at"]) <= 601
    with srv.client(member) as c:
        listed = c.get("/v1/agents/outage_resume/runs?status=waiting_provider").json()["data"]
    assert [r["id"] for r in listed] == [out["id"]]
    with srv.client(keys[("builder", "blue")]) as c:
        problem(c.post(f"/v1/agents/outage_resume/runs/{out['id']}/resume"), 404, out["id"])
    model.outage["resume"] = False
    t0 = time.monotonic()
    said = keel_cli(srv, member, "agents", "resume-run", "outage_resume", out["id"])
    assert said.startswith(f"{out['id']} resumed (was waiting for agent-model)"), said
    d = status_of(srv, "outage_resume", out["id"], builder, "completed")
    assert time.monotonic() - t0 < 60 and d["answer"] == "filed" and len(d["waits"]) == 1
    assert metered_once(srv, out["id"]) == [f"{out['id']}/1", f"{out['id']}/3~1"]
    assert effects(srv, out["id"]) == 1
    with srv.client(builder) as c:
        problem(c.post(f"/v1/agents/outage_resume/runs/{out['id']}/resume"), 409, out["id"])


@pytest.mark.parametrize("script,budgets,codes", [
    ("bounded", "3s", ("agent_provider_unavailable", "agent_stopped")),  # the wall time, whichever notices first
    ("maxwait", "1h, max_wait: 3s", ("agent_provider_unavailable",))])
def test_a_wait_past_the_runs_bound_ends_it(world, script, budgets, codes):
    srv, model, builder = world["srv"], world["model"], world["keys"].keys[("builder", "red")]
    name = f"outage_{script}"
    define(srv, MANDATE.format(name=name, wall=budgets), key=builder)
    model.outage[script] = True
    out = run(srv, name, f"File ann [script:{script}]", key=builder, wait_s=0)
    d = eventually(lambda: (x := detail(srv, name, out["id"], builder))["status"] in ("failed", "stopped") and x,
                   timeout=60)
    assert d["error"]["code"] in codes and "waits" not in d["error"], d
    assert d["waits"] and d["waiting"] is None
    assert effects(srv, out["id"]) == 1


def test_resume_refuses_strangers_and_unknown_runs_with_a_fix(world):
    srv, keys = world["srv"], world["keys"].keys
    define(srv, MANDATE.format(name="outage_edge", wall="1h"), key=keys[("builder", "red")])
    for key in (keys[("member", None)], keys[("builder", "red")]):
        with srv.client(key) as c:
            problem(c.post("/v1/agents/outage_edge/runs/arun_nope/resume"), 404, "arun_nope")
            assert c.post("/v1/agents/outage_edge/runs/" + "x" * 5000 + "/resume").status_code in (404, 414)
    with srv.client(keys[("reviewer", "red")]) as c:
        assert c.post("/v1/agents/outage_edge/runs/arun_nope/resume").status_code == 403
    with srv.client(keys[("builder", "red")]) as c:
        problem(c.get("/v1/agents/outage_edge/runs?status=sleeping"), 400, "sleeping")


def test_a_policy_denial_fails_the_run_at_once_with_no_upstream_call(world):
    """No waiting on what cannot change: the blue team's confidential data may not reach a cloud model."""
    srv, model, blue = world["srv"], world["model"], world["keys"].keys[("builder", "blue")]
    define(srv, MANDATE.format(name="outage_denied", wall="1h"), key=blue)
    t0 = time.monotonic()
    out = run(srv, "outage_denied", "File ann [script:denied]", key=blue, wait_s=30)
    assert out["status"] == "failed" and out["error"]["code"] == "policy_denied", out
    assert out["waits"] == [] and out["waiting"] is None and time.monotonic() - t0 < 20
    assert model.calls["denied"] == 0
    assert Counter(a["decision"] for a in out["actions"]) == Counter()


def _seconds(a: str, b: str) -> float:
    from datetime import datetime

    return (datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds()
