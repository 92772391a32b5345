"""Attacks on Keel's MCP endpoint at /mcp with raw HTTP: revoked, forged and missing keys, malformed and oversized
JSON-RPC, batches, wrong methods and content types — each a clean 4xx (a problem before MCP, or a JSON-RPC error
after it), never a 5xx, and no answer carries a traceback or a server path."""

from __future__ import annotations

import json

import httpx
import pytest

from conftest import eventually

pytestmark = pytest.mark.store
H = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
LIST = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}).encode()


def _call(name: str, args) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                       "params": {"name": name, "arguments": args}}).encode()


@pytest.fixture(scope="module")
def world(module_server_factory):
    srv = module_server_factory(KEEL_MAX_BODY_BYTES=str(256 * 1024))
    with srv.admin() as a:
        assert a.post("/admin/teams", json={"name": "red"}).status_code in (201, 409)
        made = a.post("/admin/keys", json={"role": "builder", "team": "red", "name": "mcp"}).json()
        revoked = a.post("/admin/keys", json={"role": "builder", "team": "red", "name": "gone"}).json()
        assert a.post(f"/admin/keys/{revoked['id']}/revoke").status_code == 200
    return srv, made["key"], revoked["key"]


def _post(srv, key, body: bytes, **headers: str) -> httpx.Response:
    h = {**H, **({"Authorization": f"Bearer {key}"} if key else {}), **headers}
    return httpx.post(srv.url + "/mcp", content=body, headers=h, timeout=60)


def _clean(r: httpx.Response) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:300])
    assert "Traceback" not in r.text and "/site-packages/" not in r.text and "keel/" not in r.text, r.text[:300]


def test_keys(world):
    srv, key, revoked = world
    assert _post(srv, key, LIST).status_code == 200
    for who in (None, revoked, "sk-keel-0123456789ab_" + "x" * 43, "not-a-key", "x" * 5000):
        r = _post(srv, who, LIST)
        assert r.status_code == 401 and r.headers["content-type"].startswith("application/problem+json"), who
        _clean(r)
    r = httpx.get(srv.url + "/mcp", headers={"Authorization": f"Bearer {revoked}"})
    assert r.status_code == 401  # the key is checked before the method


@pytest.mark.parametrize("body, status", [
    (b"{not json", 400), (b"[]", 400), (b"[" + LIST + b"," + LIST + b"]", 400), (b"", 400),
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"start_workflow","arguments":{"name":"x",'
     b'"inputs":' + b'{"a":' * 3000 + b"1" + b"}" * 3000 + b"}}}", 400),
    (_call("start_workflow", {"name": "x", "inputs": {"a": "b" * (300 * 1024)}}), 413),
    (_call("__init__", {}), 200), (_call("search", "not an object"), 200),
    (_call("run_agent", {"name": "x" * 101, "task": "t"}), 200), (_call("search", {"query": "q", "top_k": 10**9}), 200),
    (_call("start_workflow", {"name": "../../etc/passwd"}), 200),
])
def test_malformed_and_oversized_json_rpc(world, body, status):
    srv, key, _ = world
    r = _post(srv, key, body)
    assert r.status_code == status, (r.status_code, r.text[:300])
    _clean(r)
    if status == 200:  # refused inside MCP: an error result or a JSON-RPC error, nothing ran
        out = r.json()
        assert "error" in out or out["result"].get("isError") is True, out


def test_methods_and_content_types(world):
    srv, key, _ = world
    for method in ("GET", "DELETE", "PUT"):
        r = httpx.request(method, srv.url + "/mcp", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 405, (method, r.status_code)
        _clean(r)
    r = _post(srv, key, LIST, **{"Content-Type": "text/plain"})
    assert 400 <= r.status_code < 500
    _clean(r)


@pytest.mark.parametrize("method, params", [
    ("prompts/get", {"name": "nope"}), ("resources/read", {"uri": "file:///etc/passwd"}),
    ("prompts/list", {}), ("no/such/method", {}),
])
def test_an_unknown_name_or_method_is_a_json_rpc_error_and_one_log_line(world, method, params):
    """Guards: `prompts/get` (Keel serves no prompts) and other unknown requests logging a traceback at error
    level — log noise an anonymous-looking client can cause at will."""
    srv, key, _ = world
    before = len(srv.logs())
    r = _post(srv, key, json.dumps({"jsonrpc": "2.0", "id": 7, "method": method, "params": params}).encode())
    assert r.status_code in (200, 400), (r.status_code, r.text[:300])
    _clean(r)
    out = r.json()
    assert "error" in out or out.get("result") is not None, out
    if method != "prompts/list":
        assert out["error"]["code"] < 0 and out["id"] == 7, out
    eventually(lambda: srv.answered(r.headers["x-request-id"]) if "x-request-id" in r.headers else True)
    logged = srv.logs()[before:]
    assert "Traceback" not in logged and '"level":"error"' not in logged.lower() and "ERROR" not in logged, logged
