"""Every mistake a client can make comes back as application/problem+json — never a 500 or a traceback."""

import pytest

from conftest import eventually

pytestmark = pytest.mark.store


def _problem(resp, status, code):
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    body = resp.json()
    assert body["status"] == status and body["code"] == code
    assert body["detail"] and body["title"] and body["type"]
    assert "Traceback" not in resp.text
    assert resp.headers["x-request-id"] == body["request_id"]
    return body


def test_health_needs_no_key_and_readyz_checks_store(server):
    with server.client() as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        ready = c.get("/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"


def test_unknown_route_wrong_method_malformed_json_validation(server):
    with server.admin() as c:
        _problem(c.get("/no/such/route"), 404, "not_found")
        _problem(c.delete("/healthz"), 405, "method_not_allowed")
        _problem(c.post("/admin/teams", content=b'{"name": ', headers={"content-type": "application/json"}),
                 400, "malformed_json")
        body = _problem(c.post("/admin/teams", json={"name": ""}), 422, "validation_error")
        assert body["errors"][0]["field"] == "name"
        _problem(c.post("/admin/teams", json={"name": "x", "bogus": 1}), 422, "validation_error")


def test_oversize_body_is_413(server_factory):
    srv = server_factory(KEEL_MAX_BODY_BYTES="2048")
    with srv.admin() as c:
        body = _problem(c.post("/admin/teams", json={"name": "x" * 5000}), 413, "payload_too_large")
        assert "2048" in body["detail"]

        def chunks():
            for _ in range(10):
                yield b"x" * 1000

        _problem(c.post("/admin/teams", content=chunks(), headers={"content-type": "application/json"}),
                 413, "payload_too_large")
        assert c.get("/healthz").status_code == 200


def test_the_request_id_is_keels_own_and_the_clients_is_echoed_and_logged_beside_it(server):
    """Regression (hole 7): a client's `x-request-id` became Keel's request id. Keel's id is its own on every
    request; the client's (`x-client-request-id`, or `x-request-id`) comes back as `x-client-request-id`
    and is on the log lines next to Keel's, for correlation."""
    with server.admin() as c:
        r = c.get("/v1/me", headers={"x-request-id": "req-from-client-1"})
        r2 = c.get("/v1/me", headers={"x-client-request-id": "req-from-client-1"})
    rid = r.headers["x-request-id"]
    assert rid.startswith("req_") and rid != r2.headers["x-request-id"]
    assert r.headers["x-client-request-id"] == r2.headers["x-client-request-id"] == "req-from-client-1"
    both = f'"request_id":"{rid}","client_request_id":"req-from-client-1"'
    eventually(lambda: both in server.logs())  # the access line is written as the response completes
