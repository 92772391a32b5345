"""Process roles on one PostgreSQL store: an API replica queues workflow runs, `keel worker`s execute them, and a
worker SIGKILLed mid-run has its runs taken over by the live one; every run completes and each effect is applied
once (the loopback receiver dedupes by idempotency key and counts raw repeats)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from conftest import TEST_DB, eventually, keel_env, start_server
from tests.agents.conftest import ScriptedModel, say
from tests.agents.conftest import define as define_agent, run as run_agent
from tests.knowledge.conftest import make_key, make_team
from tests.workflows.conftest import define, receiver, start, wait_run

pytestmark = pytest.mark.store
RUNS = 20
AGENT = "name: helper\nmodel: agent-model\ngoal: help\ntools:\n  notify: {allow_recipients: ['*@acme.example']}\n"
FAST = {"KEEL_WORKER_HEARTBEAT_S": "0.5", "KEEL_WORKER_TAKEOVER_S": "3", "KEEL_WORKER_CONCURRENCY": "5"}


def spec(rcv: str) -> str:
    return f"""
name: slow_push
allow_hosts: ["{rcv.split('://', 1)[1]}"]
steps:
  - id: pause
    type: wait
    seconds: 3
  - id: push
    type: http
    method: POST
    url: "{rcv}/crm"
    body: {{run: "{{{{ run.id }}}}"}}
"""


def executor_of(db_url: str, pid: int) -> str:
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text("SELECT executor_id FROM worker_heartbeats WHERE pid = :pid"),
                                {"pid": pid}).scalar()
    finally:
        engine.dispose()


def pending_on(db_url: str, executor: str) -> int:
    from dbos import DBOSClient

    client = DBOSClient(system_database_url=db_url)
    try:
        return len(client.list_workflows(status="PENDING", executor_id=executor, load_input=False, load_output=False))
    finally:
        client.destroy()


@pytest.mark.skipif(TEST_DB != "postgres", reason="split roles share one PostgreSQL store")
@pytest.mark.timeout(400)
def test_a_killed_workers_runs_are_taken_over_and_each_effect_applied_once(tmp_path: Path, db_url: str) -> None:
    """Guards roles and takeover: runs started on an API replica (role api executes nothing) run on workers; one
    worker is SIGKILLed while it holds runs; within worker_takeover_s the other takes them over from their last
    checkpoint; all complete, each push applied once. An agent run started on the API replica completes too."""
    api = start_server(tmp_path / "api", db_url, KEEL_ROLE="api")
    workers = [start_server(tmp_path / f"w{i}", db_url, command="worker", wait=False, **FAST) for i in range(2)]
    try:
        for w in workers:  # started together: each launches DBOS on the shared store at once
            eventually(w.healthy, timeout=120, interval=0.1)
        with receiver() as rcv:
            define(api, spec(rcv))
            run_ids = [start(api, "slow_push") for _ in range(RUNS)]
            victim, survivor = workers
            executor = eventually(lambda: executor_of(db_url, victim.proc.pid), timeout=30)
            eventually(lambda: pending_on(db_url, executor) > 0, timeout=60, interval=0.2)
            victim.stop(signal.SIGKILL)
            killed = time.monotonic()
            for run_id in run_ids:
                assert wait_run(api, "slow_push", run_id, timeout=120)["status"] == "completed"
            took = time.monotonic() - killed
            stats = httpx.get(rcv + "/_stats").json()
        assert stats["applied"] == RUNS, stats
        assert sorted(stats["by_key"]) == sorted(f"{r}.push" for r in run_ids), stats
        assert "took over a dead worker's runs" in survivor.logs()
        assert "took over" not in api.logs() and '"msg":"request"' in api.logs()
        print(f"all {RUNS} runs completed {took:.1f}s after the kill")

        # An agent run started on the API replica is executed by the live worker, the caller waiting for it.
        model = ScriptedModel({"hello": [say("hello back")]}).start()
        with api.admin() as c:
            assert c.post("/admin/deployments", json={"alias": "agent-model", "provider": "openai_compatible",
                                                      "model": "m", "base_url": model.url}).status_code == 201
        make_team(api, "ops")
        builder = make_key(api, "builder", "ops")
        define_agent(api, AGENT, key=builder)
        out = run_agent(api, "helper", "[script:hello] hi", key=builder, wait_s=60)
        assert out["status"] == "completed" and out["answer"] == "hello back", out
    finally:
        for srv in (api, *workers):
            srv.stop()


def test_split_roles_refuse_a_sqlite_store(tmp_path: Path) -> None:
    """Guards a role that cannot work: `keel worker` on the embedded SQLite store exits with one error line."""
    env = keel_env(tmp_path, f"sqlite:///{tmp_path / 'keel.db'}")
    out = subprocess.run([sys.executable, "-m", "keel", "worker", "--port", "0"], env=env, cwd=str(tmp_path),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "needs a PostgreSQL store" in out.stderr and "Traceback" not in out.stderr, out.stderr
