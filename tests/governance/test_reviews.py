"""Review queue: a high-risk use case's answer is held (202 + review id), never shown before a reviewer of
the caller's team approves it (optionally edited) or rejects it with a reason; the caller polls or gets a
webhook; every step is in the audit trail."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from conftest import eventually
from tests.fakes.tls import make_pki
from tests.governance.conftest import POLICY, REPLY, Keys, chat, models_yaml

pytestmark = pytest.mark.store


def receiver(got: list[dict[str, Any]]) -> ThreadingHTTPServer:
    """A loopback webhook receiver that records each JSON body it is sent (serve it in a thread)."""
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            got.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *_args: Any) -> None:
            pass

    return ThreadingHTTPServer(("127.0.0.1", 0), Handler)


@pytest.fixture(scope="module")
def webhook():
    got: list[dict[str, Any]] = []
    server = receiver(got)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/hook", got
    server.shutdown()


def _hold(governed, keys, team: str = "red", **meta: Any) -> tuple[httpx.Response, str]:
    key = keys.keys[("member", team)]
    r = chat(governed, key, "onprem", "Draft a reply to the customer", metadata={"use_case": "support-reply", **meta})
    assert r.status_code == 202, r.text
    return r, key


def test_held_answer_is_released_only_after_edit_then_approve(governed, keys, webhook):
    url, got = webhook
    r, key = _hold(governed, keys, review_webhook=url)
    body = r.json()
    rid = body["review_id"]
    assert body["code"] == "review_pending" and r.headers["location"] == f"/v1/reviews/{rid}"
    assert REPLY.split()[1] not in r.text  # nothing of the answer leaks in the 202
    with governed.client(key) as caller:
        polled = caller.get(f"/v1/reviews/{rid}").json()
        assert polled["status"] == "pending" and "output" not in polled and "messages" not in polled
        assert caller.post(f"/v1/reviews/{rid}/approve", json={}).status_code == 403  # members cannot decide
    with keys.client("reviewer", "red") as reviewer:
        queue = reviewer.get("/v1/reviews").json()["data"]
        assert rid in [q["id"] for q in queue]
        item = reviewer.get(f"/v1/reviews/{rid}").json()
        assert "<EMAIL_" in item["output"]["content"]  # the high tier redacts output PII before anyone sees it
        done = reviewer.post(f"/v1/reviews/{rid}/approve", json={"output": "Thanks, we are on it.", "reason": "tone"})
        assert done.status_code == 200 and done.json()["status"] == "approved"
        again = reviewer.post(f"/v1/reviews/{rid}/reject", json={"reason": "late"})
        assert again.status_code == 409
    with governed.client(key) as caller:
        released = caller.get(f"/v1/reviews/{rid}").json()
    assert released["status"] == "approved" and released["output"]["content"] == "Thanks, we are on it."
    eventually(lambda: got)
    assert got[0]["type"] == "review.approved" and got[0]["review"]["id"] == rid
    with governed.admin() as admin:
        actions = [e["action"] for e in admin.get("/v1/audit?action=review.*").json()["data"]]
        assert {"review.hold", "review.approve"} <= set(actions)
        status = eventually(lambda: admin.get(f"/v1/reviews/{rid}").json()["webhook_status"])
        assert status.startswith("delivered")


def test_reject_needs_a_reason_and_other_teams_cannot_see_it(governed, keys):
    r, key = _hold(governed, keys, team="red")
    rid = r.json()["review_id"]
    with keys.client("reviewer", "blue") as other:
        assert other.get(f"/v1/reviews/{rid}").status_code == 404
        assert other.post(f"/v1/reviews/{rid}/reject", json={"reason": "no"}).status_code == 404
        assert rid not in [q["id"] for q in other.get("/v1/reviews").json()["data"]]
    with keys.client("member", "blue") as stranger:
        assert stranger.get(f"/v1/reviews/{rid}").status_code == 404
    with keys.client("reviewer", "red") as reviewer:
        assert reviewer.post(f"/v1/reviews/{rid}/reject", json={}).status_code == 400
        assert reviewer.post(f"/v1/reviews/{rid}/reject", json={"reason": "off-brand"}).status_code == 200
    with governed.client(key) as caller:
        seen = caller.get(f"/v1/reviews/{rid}").json()
    assert seen["status"] == "rejected" and seen["reason"] == "off-brand" and "output" not in seen


def test_streaming_request_is_held_before_the_first_byte(governed, keys):
    with httpx.stream("POST", governed.url + "/v1/chat/completions", timeout=30,
                      headers={"Authorization": f"Bearer {keys.keys[('member', 'red')]}"},
                      json={"model": "onprem", "stream": True, "metadata": {"use_case": "support-reply"},
                            "messages": [{"role": "user", "content": "hi"}]}) as r:
        assert r.status_code == 202
        assert json.loads(r.read())["review_id"].startswith("rev_")


def test_cli_lists_and_decides(governed, keys):
    from keel.governance.commands import reviews_app

    r, _key = _hold(governed, keys)
    rid = r.json()["review_id"]
    env = {"KEEL_URL": governed.url, "KEEL_API_KEY": keys.keys[("reviewer", "red")]}
    runner = CliRunner()
    listed = runner.invoke(reviews_app, ["list"], env=env)
    assert listed.exit_code == 0 and rid in listed.output
    ok = runner.invoke(reviews_app, ["approve", rid, "--edit", "Edited by CLI"], env=env)
    assert ok.exit_code == 0 and "approved" in ok.output
    missing = runner.invoke(reviews_app, ["reject", rid, "--reason", "x"], env=env)
    assert missing.exit_code == 1 and "already decided" in missing.output


def test_the_review_webhook_uses_the_outbound_ca_bundle_and_client_certificate(server_factory, upstreams, tmp_path):
    """Regression guard: review decisions went out through a session of their own, so a receiver behind the
    configured CA bundle (and asking for the configured client certificate) was never reached."""
    pki = make_pki(tmp_path)
    got: list[dict[str, Any]] = []
    hook = receiver(got)
    hook.socket = pki.server_context(require_client_cert=True).wrap_socket(hook.socket, server_side=True)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    try:
        prefixes = 'caller_webhook_prefixes: ["http://127.0.0.1:"]'
        assert prefixes in POLICY
        policy = tmp_path / "policy.yaml"
        policy.write_text(POLICY.replace(prefixes, 'caller_webhook_prefixes: ["https://127.0.0.1:"]'))
        config = tmp_path / "keel.yaml"
        config.write_text(models_yaml(upstreams["cloud"].url, upstreams["onprem"].url))
        srv = server_factory(config=config, KEEL_POLICY_FILE=str(policy), KEEL_OUTBOUND_CA_BUNDLE=str(pki.ca),
                             KEEL_OUTBOUND_CLIENT_CERT=str(pki.client_cert),
                             KEEL_OUTBOUND_CLIENT_KEY=str(pki.client_key))
        keys = Keys(srv)
        r, _key = _hold(srv, keys, review_webhook=f"https://127.0.0.1:{hook.server_port}/hook")
        rid = r.json()["review_id"]
        with keys.client("reviewer", "red") as reviewer:
            assert reviewer.post(f"/v1/reviews/{rid}/approve", json={}).status_code == 200
            status = eventually(lambda: reviewer.get(f"/v1/reviews/{rid}").json()["webhook_status"], timeout=15)
        assert status == "delivered:204"
        assert [(g["type"], g["review"]["id"]) for g in got] == [("review.approved", rid)]
    finally:
        hook.shutdown()
