"""Provider outages on the real server: a model step whose upstream says "not now" waits visibly
(`waiting_provider`, with what it waits for and when it tries next), operators list and resume such runs
within their team (API and `keel workflows waiting/resume`), a run gives up at `max_wait`, an http step
waits out a 429's Retry-After, and a policy denial still fails the step at once."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import datetime

import httpx
import pytest

from conftest import ledger_rows, problem
from tests.fakes.openai_upstream import FakeOpenAI
from tests.governance.conftest import Keys
from tests.workflows.conftest import define, receiver, run_detail, start, steps_by_id, wait_run

pytestmark = pytest.mark.store

POLICY = """
name: outage-policy
data_rules:
  - name: confidential-on-prem-only
    classification: confidential
    providers: [local]
    deployments: ["onprem/*"]
"""


def spec(name: str, model: str, extra: str = "", step: str = "") -> str:
    return f"""
name: {name}
{extra}
steps:
  - id: ask
    type: llm
    model: {model}
    max_tokens: 8
    prompt: "Say hi to {{{{ run.id }}}}"
    {step}
  - id: file
    type: record
    table: outage_{name}
    data: {{said: "{{{{ steps.ask.output.text }}}}"}}
"""


@pytest.fixture(scope="module")
def fakes():
    # `slow` asks callers to come back in 10 minutes: a run waits that long unless resumed
    out = {"slow": FakeOpenAI(retry_after="600").start(), "cloud": FakeOpenAI().start()}
    yield out
    for fake in out.values():
        fake.stop()


@pytest.fixture(scope="module")
def srv(module_server_factory, fakes, tmp_path_factory):
    base = tmp_path_factory.mktemp("outage")
    (base / "policy.yaml").write_text(POLICY)
    (base / "keel.yaml").write_text(f"""
models:
  - {{alias: slow, provider: openai_compatible, model: m, id: slow/one, base_url: {fakes['slow'].url}}}
  - {{alias: down, provider: openai_compatible, model: "fault:503", id: down/one, base_url: {fakes['cloud'].url}}}
  - {{alias: cloud, provider: openai_compatible, model: m, id: cloud/one, base_url: {fakes['cloud'].url}}}
aliases:
  slow: {{retries: 0, circuit_failures: 100}}
  down: {{retries: 0, backoff_ms: 5, circuit_failures: 100}}
ledger_flush_interval_s: 0.1
""")
    return module_server_factory(config=base / "keel.yaml", KEEL_POLICY_FILE=str(base / "policy.yaml"))


@pytest.fixture(scope="module")
def keys(srv) -> Keys:
    """Teams red (internal data) and blue (confidential), and a key per role and team."""
    return Keys(srv)


def waiting_runs(srv, key: str, waiting_for: str | None = None) -> list[dict]:
    q = "/v1/runs?status=waiting_provider" + (f"&waiting_for={waiting_for}" if waiting_for else "")
    with srv.client(key) as c:
        r = c.get(q)
    assert r.status_code == 200, r.text
    return r.json()["data"]


def test_a_rate_limited_model_waits_visibly_and_an_operator_resumes_it(srv, fakes, keys):
    """Guards the reported failure: an upstream's "come back later" failed the run; now the run waits
    for it (shown per alias, to its team only) and resumes early on an operator's word."""
    slow = fakes["slow"]
    red_builder = keys.keys[("builder", "red")]
    define(srv, spec("greet_slow", "slow"), key=red_builder)
    slow.fail_next("429", times=-1)
    run_id = start(srv, "greet_slow", key=red_builder)
    d = wait_run(srv, "greet_slow", run_id, ("waiting_provider",), timeout=30)
    waiting = d["waiting"]
    assert waiting["for"] == "slow" and waiting["kind"] == "model" and waiting["reason"] == "upstream_rate_limited"
    assert waiting["code"] == "upstream_rate_limited" and waiting["waits"] == 1
    assert 590 <= _seconds_between(waiting["since"], waiting["next_try_at"]) <= 601  # the upstream's Retry-After
    assert d["current_step"] == "ask" and steps_by_id(d)["ask"]["status"] == "waiting_provider"
    assert steps_by_id(d)["ask"]["waiting"]["next_try_at"] == waiting["next_try_at"]

    assert [r["id"] for r in waiting_runs(srv, red_builder, "slow")] == [run_id]
    assert [r["id"] for r in waiting_runs(srv, keys.keys[("member", "red")])] == [run_id]
    assert waiting_runs(srv, red_builder, "down") == []
    assert waiting_runs(srv, keys.keys[("member", "blue")]) == []  # another team's outage is not theirs to see
    with srv.client(keys.keys[("builder", "blue")]) as c:
        problem(c.post(f"/v1/workflows/greet_slow/runs/{run_id}/resume"), 404, run_id)

    env = {**os.environ, "KEEL_URL": srv.url, "KEEL_API_KEY": keys.keys[("member", "red")]}
    out = keel_cli(env, "workflows", "waiting", "--for", "slow")
    lines = [ln.split("\t") for ln in out.splitlines() if ln.strip()]
    assert [ln[:5] for ln in lines] == [[run_id, "greet_slow", "ask", "slow", "upstream_rate_limited"]]
    slow.reset()  # the provider is back; without a resume the run would try again in ten minutes
    assert keel_cli(env, "workflows", "resume", "greet_slow", run_id).startswith(f"{run_id} resumed")
    d = wait_run(srv, "greet_slow", run_id, timeout=30)
    assert d["status"] == "completed" and d["waiting"] is None, d
    steps = steps_by_id(d)
    assert steps["ask"]["status"] == "completed" and steps["ask"]["output"]["text"] and "waiting" not in steps["ask"]
    assert steps["file"]["status"] == "completed"
    rows = ledger_rows(srv.extra["db_url"], f"task_id = '{run_id}'")
    ok = [r.request_id for r in rows if r.status == "ok"]
    assert ok == [f"{run_id}/ask~1"]  # metered once, by the try after the wait
    assert [r.request_id for r in rows if r.status != "ok"] == [f"{run_id}/ask"]
    with srv.client(red_builder) as c:
        problem(c.post(f"/v1/workflows/greet_slow/runs/{run_id}/resume"), 409, run_id)


def keel_cli(env: dict[str, str], *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "keel", *args], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _seconds_between(a: str, b: str) -> float:
    return (datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds()


def test_a_provider_down_past_max_wait_fails_the_run_with_what_it_waited_for(srv, keys):
    red_builder = keys.keys[("builder", "red")]
    define(srv, spec("greet_down", "down", extra="max_wait: 3s"), key=red_builder)
    t0 = time.monotonic()
    run_id = start(srv, "greet_down", key=red_builder)
    d = wait_run(srv, "greet_down", run_id, timeout=60)
    assert d["status"] == "failed", d
    assert d["error"]["code"] == "workflow_provider_unavailable" and d["error"]["step"] == "ask"
    assert "'down'" in d["error"]["detail"] and "upstream_unavailable" in d["error"]["detail"]
    assert time.monotonic() - t0 >= 2.5  # it did wait (1 s, then 2 s) before giving up
    rows = ledger_rows(srv.extra["db_url"], f"task_id = '{run_id}'")
    assert len(rows) >= 2 and all(r.status != "ok" for r in rows)


def test_policy_denial_fails_the_step_at_once(srv, fakes, keys):
    """No waiting on what cannot change: confidential data may not reach `cloud`, so the step fails on its
    first try (its retries would take a minute; a wait an hour) and the upstream never hears of it."""
    blue_builder = keys.keys[("builder", "blue")]
    define(srv, spec("greet_cloud", "cloud", step="retries: {max_attempts: 3, backoff_s: 30}"), key=blue_builder)
    before = fakes["cloud"].stats()["paths"].get("/v1/chat/completions", 0)
    t0 = time.monotonic()
    run_id = start(srv, "greet_cloud", key=blue_builder)
    d = wait_run(srv, "greet_cloud", run_id, timeout=20)
    assert d["status"] == "failed", d
    assert d["error"]["code"] == "policy_denied" and d["error"]["step"] == "ask" and "attempts" not in d["error"]
    assert time.monotonic() - t0 < 20
    assert fakes["cloud"].stats()["paths"].get("/v1/chat/completions", 0) == before
    with srv.client(blue_builder) as c:
        listed = c.get("/v1/runs?workflow=greet_cloud").json()["data"]
    assert [(r["id"], r["status"], r["waiting"]) for r in listed] == [(run_id, "failed", None)]


def test_an_http_step_waits_out_a_429_retry_after_and_applies_once(srv, keys):
    """Same for side effects: the target's 429 with Retry-After is waited out (the step has no retries of
    its own), and the effect is applied once."""
    red_builder = keys.keys[("builder", "red")]
    with receiver() as rcv:
        hostport = rcv.split("://", 1)[1]
        define(srv, f"""
name: push_busy
allow_hosts: ["{hostport}"]
steps:
  - {{id: push, type: http, method: POST, url: "{rcv}/leads?fail=429&fail_times=2", body: {{run: "{{{{ run.id }}}}"}}}}
""", key=red_builder)
        run_id = start(srv, "push_busy", key=red_builder)
        d = wait_run(srv, "push_busy", run_id, timeout=60)
        stats = httpx.get(f"{rcv}/_stats").json()
    assert d["status"] == "completed" and steps_by_id(d)["push"]["status"] == "completed", d
    assert steps_by_id(d)["push"]["output"]["status"] == 200
    assert stats["by_key"] == {f"{run_id}.push": 3} and stats["applied"] == 1 and stats["repeats"] == 0


def test_the_runs_listing_refuses_bad_filters_with_a_fix(srv, keys):
    with srv.client(keys.keys[("member", "red")]) as c:
        problem(c.get("/v1/runs?status=sleeping"), 400, "sleeping")
        assert c.get("/v1/runs?waiting_for=" + "x" * 301).status_code == 422
        assert c.get("/v1/runs?limit=0").status_code == 422
        problem(c.post("/v1/workflows/greet_slow/runs/run_nope/resume"), 404, "run_nope")
    with srv.client() as anonymous:
        assert anonymous.get("/v1/runs").status_code == 401
