"""YAML alias bombs ("billion laughs") at every endpoint that parses caller YAML: a few hundred bytes of anchors and
aliases expand to 9^8 nodes once the validator walks them — minutes of a CPU and gigabytes of memory from one
request by a builder (a workflow or an agent mandate) or an auditor (a policy draft check). Each is refused with a
4xx problem in well under a second's work, naming the cause; YAML with a few ordinary aliases still parses."""

from __future__ import annotations

import pytest

from conftest import problem

pytestmark = pytest.mark.store


def bomb(depth: int = 8) -> str:
    """A flow sequence whose last element expands to 9**depth scalars."""
    items = ["&a0 [x, x, x, x, x, x, x, x, x]"] + [
        f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, depth)]
    return "[" + ", ".join(items) + "]"


@pytest.fixture(scope="module")
def world(module_server_factory):
    srv = module_server_factory()
    keys = {}
    with srv.admin() as a:
        assert a.post("/admin/teams", json={"name": "red"}).status_code in (201, 409)
        for role in ("builder", "auditor"):
            keys[role] = a.post("/admin/keys", json={"role": role, "team": "red", "name": role}).json()["key"]
    keys["admin"] = srv.admin_key
    return srv, keys


DEEP = "[" * 5000 + "]" * 5000  # nesting past the parser's recursion: was a 500 with a RecursionError
CASES = {  # name → (role, method, path, body with BOMB where the payload goes)
    "workflow": ("builder", "POST", "/v1/workflows",
                 {"spec": "name: bomb_flow\nsteps:\n  - id: s\n    type: transform\n    output: BOMB\n"}),
    "agent": ("builder", "POST", "/v1/agents", {"spec": "name: bomb_agent\nmodel: m\ngoal: g\ncollections: BOMB\n"}),
    "policy-check": ("auditor", "POST", "/admin/policy/check", "name: bomb\nguards: {input: {pii: BOMB}}\n"),
    "policy-put": ("admin", "PUT", "/admin/policy", "name: bomb\nguards: {input: {pii: BOMB}}\n"),
}


def _with(body, payload: str):
    return {k: v.replace("BOMB", payload) for k, v in body.items()} if isinstance(body, dict) \
        else body.replace("BOMB", payload)


@pytest.mark.parametrize("payload, named", [(bomb(), "alias"), (DEEP, "nest")], ids=["aliases", "deep"])
@pytest.mark.parametrize("case", CASES)
def test_an_alias_bomb_is_refused_at_once(world, case, payload, named):
    """Guards: one small request pinning a CPU for minutes (and its memory) in YAML validation, or a 500."""
    srv, keys = world
    role, method, path, body = CASES[case]
    body = _with(body, payload)
    kw = {"json": body} if isinstance(body, dict) else {"content": body.encode(),
                                                        "headers": {"Content-Type": "application/yaml"}}
    with srv.client(keys[role], timeout=30) as c:
        r = c.request(method, path, **kw)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    out = problem(r, r.status_code)
    assert named in str(out).lower(), out


def test_ordinary_aliases_still_parse(world):
    """A workflow reusing one anchored value twice is still accepted."""
    srv, keys = world
    spec = ("name: anchored_flow\nsteps:\n  - id: a\n    type: transform\n    output: &greeting {text: hello}\n"
            "  - id: b\n    type: transform\n    output: *greeting\n")
    with srv.client(keys["builder"]) as c:
        r = c.post("/v1/workflows", json={"spec": spec})
    assert r.status_code == 201, r.text
