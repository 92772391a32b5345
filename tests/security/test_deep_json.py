"""Deeply nested JSON in a request (under the JSON parser's own depth limit of 1024, over the 254 levels orjson
writes) reached the input guards' walk (past Python's recursion limit) and the provider's encoder: a 500. It is
a 400 problem at the edge now, naming the nesting, on every JSON model endpoint."""

from __future__ import annotations

import httpx
import pytest

from conftest import problem
from tests.fakes.openai_upstream import FakeOpenAI

pytestmark = pytest.mark.store

POLICY = """
name: deep-json
guards:
  input:  {pii: redact, secrets: block}
"""


@pytest.fixture(scope="module")
def srv(module_server_factory, tmp_path_factory):
    fake = FakeOpenAI(reply="ok").start()
    base = tmp_path_factory.mktemp("deep")
    (base / "policy.yaml").write_text(POLICY)
    (base / "keel.yaml").write_text(
        f"models:\n  - {{alias: up, provider: openai_compatible, model: m, id: up/one, base_url: {fake.url}}}\n")
    yield module_server_factory(config=base / "keel.yaml", KEEL_POLICY_FILE=str(base / "policy.yaml"))
    fake.stop()


@pytest.mark.parametrize("where", ["extra_field", "tools", "metadata", "message_content"])
def test_deep_nesting_is_never_a_500(srv, where):
    deep = "[" * 950 + '"a@b.example"' + "]" * 950
    fields = {
        "extra_field": f'"extra_field": {deep}',
        "tools": '"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", '
                 f'"properties": {{"x": {{"enum": {deep}}}}}}}}}}}]',
        "metadata": f'"metadata": {{"k": {deep}}}',
        "message_content": "",
    }
    content = f'[{{"type": "text", "text": "hi"}}, {deep}]' if where == "message_content" else '"hi"'
    extra = fields[where]
    body = ('{"model": "up", "messages": [{"role": "user", "content": ' + content + "}]"
            + (", " + extra if extra else "") + "}")
    r = httpx.post(srv.url + "/v1/chat/completions", content=body.encode(), timeout=60,
                   headers={"Authorization": f"Bearer {srv.admin_key}", "Content-Type": "application/json"})
    problem(r, 400, "nest")


@pytest.mark.parametrize("path, body", [
    ("/v1/responses", '{"model": "up", "input": DEEP}'),
    ("/v1/messages", '{"model": "up", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], "x": DEEP}'),
    ("/v1/embeddings", '{"model": "up", "input": DEEP}'),
    ("/v1/completions", '{"model": "up", "prompt": "hi", "x": DEEP}'),
])
def test_other_endpoints_refuse_deep_nesting(srv, path, body):
    deep = "[" * 300 + '"a"' + "]" * 300
    r = httpx.post(srv.url + path, content=body.replace("DEEP", deep).encode(), timeout=60,
                   headers={"Authorization": f"Bearer {srv.admin_key}", "x-api-key": srv.admin_key,
                            "Content-Type": "application/json"})
    assert r.status_code == 400 and "nest" in r.text, (r.status_code, r.text[:300])


def test_ordinary_nesting_passes(srv):
    """A tool schema a few dozen levels deep is still sent on."""
    schema: dict = {"type": "string"}
    for _ in range(40):
        schema = {"type": "object", "properties": {"x": schema}}
    r = httpx.post(srv.url + "/v1/chat/completions", timeout=60, headers={"Authorization": f"Bearer {srv.admin_key}"},
                   json={"model": "up", "messages": [{"role": "user", "content": "hi"}],
                         "tools": [{"type": "function", "function": {"name": "f", "parameters": schema}}]})
    assert r.status_code == 200, r.text[:300]
