"""PII at every request site, both directions: with input and output PII set to `redact`, no value the
caller sent reaches the upstream from any string of the body (messages and their parts, tool names,
descriptions and parameter schemas, response_format, keys Keel does not know), encoded values included;
the caller gets its own values back wherever the upstream put their placeholders (answer, tool-call
arguments, streamed deltas split anywhere), and values the upstream made up (plain, percent-encoded,
base64) never reach the caller. Regression: tool descriptions and unknown keys went upstream raw,
fidelity 0.5, and percent-encoded injected values leaked."""

from __future__ import annotations

import base64
import json
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import pytest

from tests.fakes.openai_upstream import FakeOpenAI

pytestmark = pytest.mark.store

EMAIL, SSN, CARD, PHONE = "zqvbnmlk@example.com", "219-09-9999", "4111-1111-1111-1111", "415-555-0142"
VALUES = (EMAIL, SSN, CARD, PHONE)
# What the upstream makes up: never the caller's, so it must not reach the caller.
INJECTED = ("mallory@evil-corp.example", quote("trudy.x@evil-corp.example", safe=""),
            base64.b64encode(b"eve.secret@evil-corp.example").decode(), "378282246310005")

POLICY = """
name: pii-sites
guards:
  input:  {pii: redact}
  output: {pii: redact}
"""


def strings(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in [k, *strings(v)]]
    if isinstance(node, list):
        return [s for v in node for s in strings(v)]
    return []


class EchoUpstream(FakeOpenAI):
    """Answers with every string it received (so placeholders come back), then values of its own; with tools,
    calls the first one with arguments that echo the tool's description. Streams cut text into 3-character
    events so values are split across chunks."""

    def answer(self, body: dict[str, Any]) -> tuple[list[str], dict[str, Any] | None, str]:
        received = [s for s in strings({k: v for k, v in body.items() if k not in ("model", "stream",
                                                                                     "stream_options")})]
        tools = body.get("tools")
        if tools and body.get("tool_choice") != "none":
            fn = tools[0]["function"]
            args = orjson.dumps({"note": fn.get("description", ""), "made_up": INJECTED[0]}).decode()
            return [], {"id": "call_1", "type": "function", "function": {"name": fn["name"], "arguments": args}}, \
                "tool_calls"
        text = "You sent: " + " | ".join(received) + " . Also: " + " ".join(INJECTED) + " done"
        if body.get("stream"):
            return [text[i:i + 3] for i in range(0, len(text), 3)], None, "stop"
        return [text], None, "stop"

    def events(self, model, words, call, finish, usage, fault):  # tool arguments cut in 3-character pieces too
        if not call:
            return super().events(model, words, call, finish, usage, fault)
        args = call["function"]["arguments"]
        out = [self.chunk(model, {"role": "assistant", "content": ""}),
               self.chunk(model, {"tool_calls": [{"index": 0, "id": call["id"], "type": "function",
                                                  "function": {"name": call["function"]["name"], "arguments": ""}}]})]
        out += [self.chunk(model, {"tool_calls": [{"index": 0, "function": {"arguments": args[i:i + 3]}}]})
                for i in range(0, len(args), 3)]
        out.append(self.chunk(model, {}, finish))
        out.append(b"data: [DONE]\n\n")
        return out


@pytest.fixture(scope="module")
def echo():
    fake = EchoUpstream().start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def srv(tmp_path_factory, module_server_factory, echo):
    base = tmp_path_factory.mktemp("pii-sites")
    (base / "policy.yaml").write_text(POLICY)
    (base / "keel.yaml").write_text(
        f"models:\n  - {{alias: echo, provider: openai_compatible, model: echo-1, base_url: {echo.url}}}\n")
    return module_server_factory(config=base / "keel.yaml", KEEL_POLICY_FILE=str(base / "policy.yaml"))


def post(srv, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(srv.url + "/v1/chat/completions", json={"model": "echo", **body},
                      headers={"Authorization": f"Bearer {srv.admin_key}"}, timeout=30)


def sent_upstream(echo: EchoUpstream) -> str:
    raw = json.dumps([r["body"] for r in echo.received if r["path"].endswith("/chat/completions")])
    return raw


def assert_nothing_raw(upstream: str, values: tuple[str, ...] = VALUES) -> None:
    from urllib.parse import unquote
    for v in values:
        assert v not in upstream and v not in unquote(upstream), f"{v} reached the upstream"


TEXT = "Please review: " + ", ".join(VALUES)
SITES = {
    "system": {"messages": [{"role": "system", "content": TEXT}, {"role": "user", "content": "hi"}]},
    "content-part": {"messages": [{"role": "user", "content": [{"type": "text", "text": TEXT}]}]},
    "unknown-key": {"messages": [{"role": "user", "content": "hi"}], "session_note": TEXT,
                    "nested_extra": {"deep": [TEXT]}},
    "response-format": {"messages": [{"role": "user", "content": "hi"}],
                        "response_format": {"type": "json_schema", "json_schema": {
                            "name": "rec", "schema": {"type": "object", "description": TEXT}}}},
    "stop": {"messages": [{"role": "user", "content": "hi"}], "stop": [f"contact {EMAIL}"]},
    "assistant-tool-call": {"messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "lookup", "arguments": json.dumps({"who": EMAIL, "ssn": SSN})}}]},
        {"role": "tool", "tool_call_id": "c1", "content": f"found {CARD} and {PHONE}"}]},
    "encoded": {"messages": [{"role": "user", "content": "see " + quote(EMAIL, safe="") + " and "
                              + base64.b64encode(f"ssn {SSN}, card {CARD}, phone {PHONE}".encode()).decode()
                              + " and " + f"ssn {SSN}, card {CARD}, tel {PHONE}".encode().hex()}]},
}


@pytest.mark.parametrize("site", sorted(SITES))
@pytest.mark.parametrize("stream", [False, True])
def test_no_site_sends_values_upstream_and_caller_gets_them_back(srv, echo, site, stream):
    echo.reset()
    r = post(srv, {**SITES[site], "stream": stream})
    assert r.status_code == 200, r.text
    assert_nothing_raw(sent_upstream(echo))
    answer = r.text if not stream else "".join(
        (json.loads(line[6:])["choices"] or [{}])[0].get("delta", {}).get("content") or ""
        for line in r.text.splitlines() if line.startswith("data: {"))
    if not stream:
        answer = r.json()["choices"][0]["message"]["content"]
    if site != "encoded":  # the encoded forms come back as sent
        for v in VALUES if site not in ("stop",) else (EMAIL,):
            assert v in answer, f"{v} not restored for the caller ({site}, stream={stream})"
    from urllib.parse import unquote
    for made_up in INJECTED:
        assert made_up not in answer and made_up not in unquote(answer), f"the upstream's {made_up} leaked"
    assert "eve.secret" not in answer and "trudy.x" not in unquote(answer)


@pytest.mark.parametrize("stream", [False, True])
def test_tool_names_descriptions_and_schemas_are_redacted_and_arguments_restored(srv, echo, stream):
    echo.reset()
    tools = [{"type": "function", "function": {
        "name": "lookup_record", "description": TEXT,
        "parameters": {"type": "object", "properties": {"who": {"type": "string", "description": f"e.g. {EMAIL}",
                                                                "enum": [SSN]}}}}}]
    r = post(srv, {"messages": [{"role": "user", "content": "go"}], "tools": tools, "stream": stream})
    assert r.status_code == 200, r.text
    assert_nothing_raw(sent_upstream(echo))
    if stream:
        args, name = "", ""
        for line in r.text.splitlines():
            if line.startswith("data: {"):
                for tc in ((json.loads(line[6:])["choices"] or [{}])[0].get("delta", {}).get("tool_calls") or []):
                    args += (tc.get("function") or {}).get("arguments") or ""
                    name += (tc.get("function") or {}).get("name") or ""
    else:
        call = r.json()["choices"][0]["message"]["tool_calls"][0]
        args, name = call["function"]["arguments"], call["function"]["name"]
    assert name == "lookup_record"
    note = json.loads(args)  # still valid JSON after the values went back in
    for v in VALUES:
        assert v in note["note"], f"{v} not restored in the tool-call arguments (stream={stream})"
    assert INJECTED[0] not in args

