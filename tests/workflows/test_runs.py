"""Runs end to end on the real server: steps in order, outputs referenced by later steps, inputs
checked, versions kept, cancel and retry-from-step, sub-workflows and waits."""

from __future__ import annotations

import pytest

from tests.workflows.conftest import define, run_detail, start, steps_by_id, wait_run

pytestmark = pytest.mark.store

BASIC = """
name: basic
inputs:
  type: object
  required: [who]
  properties:
    who: {type: string}
    n: {type: integer}
vars:
  greeting: Hello
steps:
  - id: greet
    type: transform
    output:
      text: "{{ vars.greeting }}, {{ inputs.who }}!"
      n: "{{ (inputs.n or 1) * 2 }}"
  - id: branch
    type: condition
    if: "{{ steps.greet.output.value.n > 5 }}"
    then: big
    else: small
  - id: small
    type: record
    table: sizes
    data: {who: "{{ inputs.who }}", size: small}
  - id: big
    type: record
    when: "{{ steps.greet.output.value.n > 5 }}"
    table: sizes
    data: {who: "{{ inputs.who }}", size: big}
  - id: mail
    type: notify
    email: "{{ inputs.who | lower }}@example.com"
    subject: "{{ steps.greet.output.value.text }}"
    body: "n is {{ steps.greet.output.value.n }}"
"""


@pytest.fixture(scope="module")
def srv(module_server_factory):
    s = module_server_factory()
    define(s, BASIC)
    return s


def test_a_run_completes_with_every_step_output_and_native_types(srv):
    """Guards the basic path: templates see inputs/vars/earlier outputs, numbers stay numbers."""
    run_id = start(srv, "basic", {"who": "Ada", "n": 1})
    d = wait_run(srv, "basic", run_id)
    assert d["status"] == "completed", d
    steps = steps_by_id(d)
    assert steps["greet"]["output"]["value"] == {"text": "Hello, Ada!", "n": 2}
    assert steps["branch"]["output"]["value"] is False
    assert steps["small"]["status"] == "completed" and steps["big"]["status"] == "skipped"
    assert d["usage"] == {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "cost": 0.0}
    with srv.admin() as c:
        mail = c.get(f"/v1/outbox?run_id={run_id}").json()["data"]
        recs = [r for r in c.get("/v1/records/sizes").json()["data"] if r["run_id"] == run_id]
    assert [(m["to"], m["subject"], m["body"]) for m in mail] == [("ada@example.com", "Hello, Ada!", "n is 2")]
    assert [r["data"] for r in recs] == [{"who": "Ada", "size": "small"}]


def test_condition_jumps_forward(srv):
    """Guards branching: `then` skips the steps between the condition and its target."""
    d = wait_run(srv, "basic", start(srv, "basic", {"who": "Bo", "n": 4}))
    steps = steps_by_id(d)
    assert steps["branch"]["output"]["value"] is True
    assert steps["small"]["status"] == "pending" and steps["big"]["status"] == "completed"


def test_inputs_are_checked_against_the_schema(srv):
    """Guards input validation: a wrong type is a 422 naming the field, and no run is created."""
    with srv.admin() as c:
        before = len(c.get("/v1/workflows/basic/runs").json()["data"])
        r = c.post("/v1/workflows/basic/runs", json={"inputs": {"who": 3}})
        assert r.status_code == 422, r.text
        assert "who" in r.json()["detail"]
        assert len(c.get("/v1/workflows/basic/runs").json()["data"]) == before


def test_bad_spec_is_refused_with_its_location(srv):
    """Guards definition-time checks over HTTP: the problem body carries line and field."""
    bad = "name: broken\nsteps:\n  - id: a\n    type: transform\n    output: \"{{ steps.nope.output }}\"\n"
    with srv.admin() as c:
        r = c.post("/v1/workflows", json={"spec": bad})
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["code"] == "workflow_spec_invalid"
    assert body["errors"][0]["line"] == 5 and "nope" in body["errors"][0]["message"]


def test_a_run_keeps_the_version_it_started_with(srv):
    """Guards versioning: redefining a workflow does not change a run that already started."""
    spec_v1 = "name: slow\nsteps:\n  - id: pause\n    type: wait\n    seconds: 2\n  - id: out\n    type: transform\n    output: v1\n"
    v1 = define(srv, spec_v1)
    run_id = start(srv, "slow")
    v2 = define(srv, spec_v1.replace("output: v1", "output: v2"))
    assert v2["version"] == v1["version"] + 1
    d = wait_run(srv, "slow", run_id)
    assert d["version"] == v1["version"]
    assert steps_by_id(d)["out"]["output"]["value"] == "v1"
    d2 = wait_run(srv, "slow", start(srv, "slow"))
    assert steps_by_id(d2)["out"]["output"]["value"] == "v2"


def test_cancel_stops_a_waiting_run(srv):
    """Guards cancel: the run ends as cancelled and its later steps never run."""
    define(srv, "name: sleeper\nsteps:\n  - id: nap\n    type: wait\n    seconds: 30\n"
                "  - id: after\n    type: record\n    table: never\n    data: {x: 1}\n")
    run_id = start(srv, "sleeper")
    with srv.admin() as c:
        r = c.post(f"/v1/workflows/sleeper/runs/{run_id}/cancel")
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "cancelled"
        assert c.post(f"/v1/workflows/sleeper/runs/{run_id}/cancel").status_code == 409
    d = run_detail(srv, "sleeper", run_id)
    assert d["status"] == "cancelled" and steps_by_id(d)["after"]["status"] == "pending"


def test_retry_from_the_failed_step_reuses_earlier_results(srv):
    """Guards retry-from-step: a new run carries over the steps before the failed one."""
    define(srv, "name: fragile\ninputs: {type: object, properties: {d: {type: integer}}}\nsteps:\n"
                "  - id: first\n    type: transform\n    output: \"{{ 10 }}\"\n"
                "  - id: divide\n    type: transform\n    output: \"{{ steps.first.output.value // inputs.d }}\"\n")
    run_id = start(srv, "fragile", {"d": 0})
    d = wait_run(srv, "fragile", run_id)
    assert d["status"] == "failed" and d["error"]["step"] == "divide", d
    with srv.admin() as c:
        r = c.post(f"/v1/workflows/fragile/runs/{run_id}/retry", json={})
        assert r.status_code == 201, r.text
        retry_id = r.json()["id"]
    d2 = wait_run(srv, "fragile", retry_id)
    assert d2["retry_of"] == run_id
    assert steps_by_id(d2)["first"]["status"] == "carried_over"


def test_sub_workflow_runs_and_returns_its_outputs(srv):
    """Guards the `workflow` step: the child is its own run, and the parent sees its result."""
    define(srv, "name: child\ninputs: {type: object, properties: {x: {type: integer}}}\nsteps:\n"
                "  - id: double\n    type: transform\n    output: \"{{ inputs.x * 2 }}\"\n")
    define(srv, "name: parent\nsteps:\n  - id: call\n    type: workflow\n    name: child\n    inputs: {x: 21}\n"
                "  - id: show\n    type: transform\n    output: \"{{ steps.call.output.result.value }}\"\n")
    run_id = start(srv, "parent")
    d = wait_run(srv, "parent", run_id)
    assert d["status"] == "completed", d
    assert steps_by_id(d)["show"]["output"]["value"] == 42
    child = run_detail(srv, "child", f"{run_id}.call")
    assert child["status"] == "completed" and child["parent_run"] == run_id


def test_http_step_retries_with_one_idempotency_key_and_reads_secrets(srv):
    """Guards the http step: a 500 is retried with backoff under the same Idempotency-Key (the target
    applies it once), vault secrets reach headers but never the run's outputs."""
    from tests.workflows.conftest import receiver

    with srv.admin() as c:
        assert c.put("/admin/secrets/crm-token", json={"value": "sk-crm-very-secret", "uses": ["http_header"]}).status_code == 200
    with receiver() as rcv:
        host = rcv.split("://", 1)[1]
        define(srv, f"""
name: crm_push
allow_hosts: ["{host}"]
inputs: {{type: object, properties: {{name: {{type: string}}}}}}
steps:
  - id: push
    type: http
    method: POST
    url: "{rcv}/crm?fail=500&fail_times=1"
    headers: {{Authorization: "Bearer {{{{ secrets['crm-token'] }}}}"}}
    body: {{name: "{{{{ inputs.name }}}}"}}
    retries: {{max_attempts: 3, backoff_s: 0.2}}
""")
        run_id = start(srv, "crm_push", {"name": "Acme"})
        d = wait_run(srv, "crm_push", run_id)
        import httpx

        stats = httpx.get(rcv + "/_stats").json()
    assert d["status"] == "completed", d
    assert steps_by_id(d)["push"]["output"]["status"] == 200
    assert stats["by_key"] == {f"{run_id}.push": 2} and stats["applied"] == 1
    assert stats["requests"][-1]["body"] == {"name": "Acme"}
    assert "sk-crm-very-secret" not in str(d)


def test_a_step_that_exhausts_its_retries_fails_the_run_with_its_last_error_and_attempts(srv):
    """Guards retry exhaustion: after `max_attempts` transient failures the run fails with the last
    attempt's own error (code and step) and the number of attempts, logged without a traceback."""
    from tests.workflows.conftest import receiver

    with receiver() as rcv:
        define(srv, f"""
name: flaky_push
allow_hosts: ["{rcv.split("://", 1)[1]}"]
steps:
  - id: push
    type: http
    method: POST
    url: "{rcv}/crm?fail=503&fail_times=10"
    body: {{ping: 1}}
    retries: {{max_attempts: 3, backoff_s: 0.1}}
""")
        d = wait_run(srv, "flaky_push", start(srv, "flaky_push", {}))
    assert d["status"] == "failed", d
    assert (d["error"]["code"], d["error"]["step"], d["error"]["attempts"]) == ("workflow_effect_failed", "push", 3)
    assert "503" in d["error"]["detail"]
    assert "workflow step crashed" not in srv.logs()


def test_http_step_refuses_hosts_outside_the_allow_list_at_run_time(srv):
    """Guards SSRF at run time: a templated URL that renders to a host not allowed (or to the cloud
    metadata address) fails the run with workflow_egress_denied and sends nothing."""
    define(srv, """
name: fetcher
inputs: {type: object, properties: {url: {type: string}}}
allow_hosts: [api.example.com]
steps:
  - id: get
    type: http
    url: "{{ inputs.url }}"
""")
    for url in ("http://169.254.169.254/latest/meta-data/", "http://127.0.0.1:1/", "http://evil.example.net/"):
        d = wait_run(srv, "fetcher", start(srv, "fetcher", {"url": url}))
        assert d["status"] == "failed" and d["error"]["code"] == "workflow_egress_denied", d


def test_wait_until_a_time_is_durable_and_on_time(srv):
    """Guards `wait: until`: the run sleeps until the rendered ISO time, then continues."""
    define(srv, "name: alarm\ninputs: {type: object, properties: {at: {type: string}}}\nsteps:\n"
                "  - id: sleep\n    type: wait\n    until: \"{{ inputs.at }}\"\n"
                "  - id: ring\n    type: transform\n    output: ring\n")
    from datetime import UTC, datetime, timedelta

    at = datetime.now(UTC) + timedelta(seconds=2)
    d = wait_run(srv, "alarm", start(srv, "alarm", {"at": at.isoformat()}))
    assert d["status"] == "completed"
    ring = steps_by_id(d)["ring"]
    assert ring["finished_at_ms"] / 1000 >= at.timestamp() - 0.05
    assert 1.0 <= steps_by_id(d)["sleep"]["output"]["waited_s"] <= 3.0


def test_specs_in_the_workflows_folder_load_at_start_and_a_bad_one_is_reported(module_server_factory, tmp_path):
    """Guards `workflows/*.yaml`: good specs are defined at start; a bad one is skipped and logged with
    its file and location, and does not stop the server."""
    folder = tmp_path / "workflows"
    folder.mkdir()
    (folder / "good.yaml").write_text("name: from_folder\nsteps:\n  - id: a\n    type: transform\n    output: 1\n")
    (folder / "bad.yaml").write_text("name: broken_one\nsteps:\n  - id: a\n    type: teleport\n")
    s = module_server_factory(KEEL_WORKFLOWS_DIR=str(folder))
    with s.admin() as c:
        names = [w["name"] for w in c.get("/v1/workflows").json()["data"]]
    assert "from_folder" in names and "broken_one" not in names
    assert "bad.yaml" in s.logs() and "teleport" in s.logs()


def test_notify_email_goes_over_smtp_when_configured(module_server_factory):
    """Guards the SMTP path end to end: with KEEL_SMTP_HOST set, a notify step's email reaches the SMTP
    server (Message-ID from run and step) instead of the outbox."""
    import email as email_lib

    from aiosmtpd.controller import Controller

    from conftest import free_port

    received: list = []

    class Inbox:
        async def handle_DATA(self, server, session, envelope):  # noqa: ANN001, ANN201, N802
            received.append(email_lib.message_from_bytes(envelope.content))
            return "250 OK"

    port = free_port()
    controller = Controller(Inbox(), hostname="127.0.0.1", port=port)
    controller.start()
    try:
        s = module_server_factory(KEEL_SMTP_HOST="127.0.0.1", KEEL_SMTP_PORT=str(port))
        define(s, BASIC)
        run_id = start(s, "basic", {"who": "Smtp", "n": 1})
        assert wait_run(s, "basic", run_id)["status"] == "completed"
    finally:
        controller.stop()
    assert [(m["To"], m["Subject"]) for m in received] == [("smtp@example.com", "Hello, Smtp!")]
    assert run_id in received[0]["Message-ID"] and "mail" in received[0]["Message-ID"]
    with s.admin() as c:
        assert c.get(f"/v1/outbox?run_id={run_id}").json()["data"] == []
