"""The support agent example end to end on the bundled model: `make up`'s demo code defines it, a customer asks
for a refund, and local-chat (SmolLM2-135M through constrained output: a real generation, not a script) calls
the tools. Its wording is not judged; the governance outcome is: every refund call it makes is decided by the
mandate — up to 500 it reaches Acme's back office (once), above 500 it waits for a reviewer, above 2,000 or to
another account it is refused with its rule."""

from __future__ import annotations

import importlib.util

import pytest

from conftest import eventually
from keel import demo
from keel.core.client import Client
from tests.knowledge.conftest import make_team, wait_job

pytestmark = [pytest.mark.store, pytest.mark.slow]
TASK = "Please refund order o-1234 of 120 EUR to my account ACME-123456."


def _acme():
    spec = importlib.util.spec_from_file_location("acme_back_office", demo.SUPPORT / "acme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def world(module_server_factory):
    server, office = _acme().serve(port=0)
    port = server.server_address[1]
    srv = module_server_factory(KEEL_EMBEDDED_MODELS="true")
    make_team(srv, "demo")
    source = (demo.SUPPORT / "support.yaml").read_text().replace("localhost:8099", f"localhost:{port}")
    job = demo.support_agent(Client(url=srv.url, key=srv.admin_key), source)
    with srv.admin() as c:
        assert wait_job(c, job, timeout=300)["status"] == "succeeded"
    try:
        yield {"srv": srv, "office": office}
    finally:
        srv.stop()
        server.shutdown()


def test_a_refund_request_on_the_bundled_model_is_governed_by_the_mandate(world):
    srv, office = world["srv"], world["office"]
    with srv.admin() as c:
        r = c.post("/v1/agents/support/runs", json={"task": TASK, "wait_s": 0})
        assert r.status_code == 202, r.text
        run_id = r.json()["id"]

        def refund_decided():
            d = c.get(f"/v1/agents/support/runs/{run_id}").json()
            decided = [a for a in d["actions"] if a["tool"] == "refund"]
            return d if decided or d["status"] != "running" else None

        d = eventually(refund_decided, timeout=900, interval=1)
        c.post("/v1/agents/support/pause", json={"reason": "the test has its answer"})  # no further action
    tools = [(a["tool"], a["decision"], a["arguments"]) for a in d["actions"] if a["kind"] == "tool"]
    print("the model's tool calls:", tools)
    refunds = [a for a in d["actions"] if a["tool"] == "refund"]
    if d["status"] == "waiting_approval":  # the model asked for more than 500: nothing reached Acme
        assert office.raw == 0
        return
    assert refunds, f"local-chat made no refund call: {d['status']}, {tools}, {d['answer']!r}"
    first, args = refunds[0], refunds[0]["arguments"]
    if first["decision"] == "refused":
        assert first["rule"] in ("rules[0]: refund.amount <= 2000", "rules[1]: to_account matches 'ACME-[0-9]{6}'",
                                 "parameters", "arguments"), first
        assert not any(r["order_id"] == args.get("order_id") for r in office.refunds.values())
        return
    assert first["decision"] == "allowed" and first["rule"] is None
    assert 0 < args["amount"] <= 500 and args["to_account"].startswith("ACME-")
    assert [r["order_id"] for r in office.refunds.values()] == [args["order_id"]] and office.raw == 1
