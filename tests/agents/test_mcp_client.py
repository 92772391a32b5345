"""Agents using tools of real MCP servers (the SDK's MCPServer, over stdio and streamable HTTP on loopback): the
listed schemas reach the model, an allowed call works, a call that breaks a rule or names a tool outside the
mandate is refused with its rule and never reaches the server (the server counts calls), stdio commands are
only those an admin allowed, HTTP servers obey the egress rules, and a header secret appears in no response,
action log, audit event or log line; an HTTP server is reached through Keel's outbound settings (the
environment's proxy unless NO_PROXY covers it, the CA bundle and client certificate) with the egress rules intact."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from conftest import loopback_process
from keel.agents.mandate import McpServerSpec
from keel.agents.mcp_client import McpClients, McpEgressDenied, McpUnavailable
from keel.core.errors import ConfigError
from keel.core.outbound import Outbound
from keel.core.settings import load_settings
from tests.agents.conftest import ScriptedModel, call, define, detail, run, say
from tests.fakes.proxy import LoopbackProxy
from tests.fakes.tls import PKI, make_pki
from tests.knowledge.conftest import make_key, make_team

pytestmark = pytest.mark.store
SERVER = Path(__file__).parent / "mcp_billing.py"
SECRET = "Bearer sk-mcp-7f3a9c1e5d2b8a4f"

MANDATE = """\
name: {name}
model: agent-model
goal: handle refunds
mcp_servers:
  billing: {{command: billing}}
  crm: {{url: "{crm}/mcp", headers: {{Authorization: {{secret: crm-token}}}}}}
tools:
  refund:
    mcp: billing
    tool: issue_refund
    rules: ["amount <= 500", "account matches 'ACME-.*'"]
  customer: {{mcp: crm, tool: lookup_customer}}
  notes: {{mcp: crm, tool: customer_notes}}
"""
PROXY_VARS = ("http_proxy", "https_proxy", "no_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
              "ALL_PROXY")
POLICY = "name: mcp-test\nguards:\n  context: {injection: quote, secrets: redact}\n"


def calls(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def world(tmp_path_factory, module_server_factory):
    model = ScriptedModel({
        "ok": [call("refund", {"amount": 120, "account": "ACME-1"}), call("customer", {"customer_id": "c-1"}),
               say("refunded")],
        "over": [call("refund", {"amount": 900, "account": "ACME-1"}),
                 call("refund", {"amount": 10, "account": "EVIL-9"}), say("could not")],
        "outside": [call("delete_everything", {}), call("issue_refund", {"amount": 5, "account": "ACME-1"}),
                    call("refund", {"amount": 5, "account": "ACME-1", "to": "attacker"}), say("no")],
        "ssrf": [say("never asked")],
        "notes": [call("notes", {"customer_id": "c-1"}), say("read")]}).start()
    base = tmp_path_factory.mktemp("agents-mcp")
    stdio_count, http_count = base / "stdio-calls.jsonl", base / "http-calls.jsonl"
    (base / "keel.yaml").write_text(
        f"models:\n  - {{alias: agent-model, provider: openai_compatible, model: m, base_url: {model.url}}}\n"
        "mcp_commands:\n  billing: "
        f"{orjson.dumps([sys.executable, str(SERVER), 'stdio', str(stdio_count)]).decode()}\n")
    (base / "policy.yaml").write_text(POLICY)
    with loopback_process("tests.agents.mcp_billing", str(http_count)) as crm:
        srv = module_server_factory(config=base / "keel.yaml", KEEL_POLICY_FILE=str(base / "policy.yaml"))
        for team in ("red", "blue"):
            make_team(srv, team)
        keys = {(role, team): make_key(srv, role, team) for role in ("builder", "member") for team in ("red", "blue")}
        with srv.client(keys[("builder", "red")]) as c:
            assert c.put("/v1/secrets/crm-token", json={"value": SECRET}).status_code == 200
        define(srv, MANDATE.format(name="refunds", crm=crm), key=keys[("builder", "red")])
        try:
            yield {"srv": srv, "keys": keys, "model": model, "crm": crm, "stdio": stdio_count, "http": http_count}
        finally:
            srv.stop()
            model.stop()


def _decisions(out: dict[str, Any]) -> list[tuple[str | None, str, str | None]]:
    return [(a["tool"], a["decision"], a["rule"]) for a in out["actions"] if a["kind"] == "tool"]


def test_allowed_calls_reach_the_stdio_and_the_http_server_with_the_listed_schemas(world):
    srv, keys = world["srv"], world["keys"]
    out = run(srv, "refunds", "[script:ok] refund ACME-1", key=keys[("member", "red")])
    assert out["status"] == "completed", out
    assert _decisions(out) == [("refund", "allowed", None), ("customer", "allowed", None)]
    assert '"refunded": 120' in out["actions"][1]["result"] and "gold tier" in out["actions"][3]["result"]
    assert [c["tool"] for c in calls(world["stdio"])] == ["issue_refund"]
    assert [(c["tool"], c["authorization"]) for c in calls(world["http"])] == [("lookup_customer", SECRET)]
    sent = [r["body"] for r in world["model"].received if r["path"].endswith("/chat/completions")][-1]
    tools = {t["function"]["name"]: t["function"] for t in sent["tools"]}
    assert set(tools) == {"refund", "customer", "notes"}  # the mandate's names, not the server's other tools
    assert set(tools["refund"]["parameters"]["properties"]) == {"amount", "account"}
    assert tools["customer"]["description"] == "The customer's name and tier."


def test_a_call_breaking_a_rule_is_refused_with_its_rule_and_never_reaches_the_server(world):
    srv, keys = world["srv"], world["keys"]
    before = len(calls(world["stdio"]))
    out = run(srv, "refunds", "[script:over] refund a lot", key=keys[("member", "red")])
    assert out["status"] == "completed"
    assert _decisions(out) == [("refund", "refused", "rules[0]: amount <= 500"),
                               ("refund", "refused", "rules[1]: account matches 'ACME-.*'")]
    assert len(calls(world["stdio"])) == before


def test_tools_outside_the_mandate_and_unlisted_arguments_are_refused(world):
    srv, keys = world["srv"], world["keys"]
    before = len(calls(world["stdio"])) + len(calls(world["http"]))
    out = run(srv, "refunds", "[script:outside] wipe it", key=keys[("member", "red")])
    assert _decisions(out) == [("delete_everything", "refused", "tools"), ("issue_refund", "refused", "tools"),
                               ("refund", "refused", "parameters")]
    assert len(calls(world["stdio"])) + len(calls(world["http"])) == before
    with srv.admin() as a:
        audited = a.get("/v1/audit", params={"action": "agent.action.refused", "limit": 1000}).json()["data"]
    assert {e["details"]["rule"] for e in audited if e["details"]["run_id"] == out["id"]} == {"tools", "parameters"}


def test_the_header_secret_appears_in_no_response_log_or_audit_event(world):
    srv, keys = world["srv"], world["keys"]
    out = run(srv, "refunds", "[script:ok] again", key=keys[("builder", "red")])
    assert calls(world["http"])[-1]["authorization"] == SECRET  # it was sent, to the server only
    with srv.admin() as a:
        seen = [a.get(f"/v1/agents/refunds/runs/{out['id']}").text, a.get("/v1/agents/refunds").text,
                a.get("/v1/audit", params={"limit": 1000}).text, a.get("/admin/secrets").text]
    seen += [json.dumps(out), json.dumps(detail(srv, "refunds", out["id"])), srv.logs()]
    token = SECRET.split()[1]
    assert not [s for s in seen if token in s]


def test_a_stdio_server_is_only_a_command_an_admin_allowed(world):
    srv, keys = world["srv"], world["keys"]
    spec = MANDATE.format(name="rogue", crm=world["crm"])
    r = define(srv, spec.replace("{command: billing}", "{command: sh}"), key=keys[("builder", "red")], status=(422,))
    assert r.json()["code"] == "agent_mcp_command_not_allowed" and "mcp_commands" in r.json()["detail"]
    r = define(srv, spec.replace("{command: billing}", "{command: /bin/sh}"), key=keys[("builder", "red")],
               status=(422,))
    assert r.json()["code"] == "agent_mandate_invalid"
    assert r.json()["errors"][0]["field"] == "mcp_servers.billing.command"
    r = define(srv, spec.replace("{command: billing}", "{command: billing, args: [-c, id]}"),
               key=keys[("builder", "red")], status=(422,))
    assert r.json()["errors"][0]["field"] == "mcp_servers.billing.args"


def test_an_http_server_obeys_the_egress_rules_and_the_teams_secrets(world):
    srv, keys = world["srv"], world["keys"]
    port = world["crm"].rsplit(":", 1)[1]
    spec = MANDATE.format(name="ssrf", crm="http://169.254.169.254")
    r = define(srv, spec, key=keys[("builder", "red")], status=(403,))
    assert r.json()["code"] == "agent_mcp_egress_denied"
    r = define(srv, MANDATE.format(name="blue_refunds", crm=world["crm"]), key=keys[("builder", "blue")],
               status=(403,))
    assert r.json()["code"] == "secret_not_allowed"  # red's secret is not blue's
    before = len(calls(world["http"]))
    define(srv, MANDATE.format(name="ssrf", crm=f"http://127.1:{port}"), key=keys[("builder", "red")])
    out = run(srv, "ssrf", "[script:ssrf] hi", key=keys[("member", "red")])  # 127.1 is 127.0.0.1 by another name
    assert out["status"] == "failed" and out["error"]["code"] == "agent_mcp_egress_denied", out
    assert "loopback" in out["error"]["detail"]
    assert len(calls(world["http"])) == before


def test_an_mcp_result_passes_the_context_guards_before_the_model_sees_it(world):
    """An injection in an MCP tool's result reaches the model quoted as inert data, and a secret in it redacted."""
    srv, model = world["srv"], world["model"]
    out = run(srv, "refunds", "[script:notes] read the notes", key=world["keys"][("member", "red")])
    assert out["status"] == "completed", out
    seen = [m for r in model.received if r["path"].endswith("/chat/completions")
            for m in r["body"]["messages"] if m["role"] == "tool" and "customer list" in (m.get("content") or "")]
    assert seen and all("<untrusted-data" in m["content"] and "AKIAIOSFODNN7EXAMPLE" not in m["content"] for m in seen)


@pytest.mark.parametrize("value", ['{"bad name": [python]}', '{"billing": []}', '{"billing": [""]}', '[python]'])
def test_mcp_commands_are_checked_when_settings_load(value):
    with pytest.raises(ConfigError) as exc:
        load_settings(None, environ={"KEEL_MCP_COMMANDS": value})
    assert "mcp_commands" in exc.value.detail
    settings, sources = load_settings(None, environ={"KEEL_MCP_COMMANDS": '{"billing": [python, -m, billing_mcp]}'})
    assert settings.mcp_commands == {"billing": ["python", "-m", "billing_mcp"]} and sources["mcp_commands"] == "env"


# -- Keel's outbound settings: proxies from the environment, CA bundle, client certificate ---------------------

@pytest.fixture
def no_proxy_from_the_runner(monkeypatch):
    """The test starts with no proxy in the environment and sets the ones it means."""
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def crm_alone(tmp_path_factory) -> Iterator[str]:
    """The billing MCP server on plain HTTP, for calls made straight through `McpClients`."""
    with loopback_process("tests.agents.mcp_billing", str(tmp_path_factory.mktemp("mcp-out") / "calls.jsonl")) as url:
        yield url


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def tls_front(tls: ssl.SSLContext, plain_url: str) -> AsyncIterator[int]:
    """A loopback TLS endpoint (its port yielded) relaying each connection to the MCP server at `plain_url`."""
    port = int(plain_url.rsplit(":", 1)[1])

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    server = await asyncio.start_server(relay, "127.0.0.1", 0, ssl=tls)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def listed(url: str, **options: Any) -> set[str]:
    return set(await McpClients(**options).tools(McpServerSpec("crm", url=url), {}))


def test_an_http_server_goes_through_the_environments_proxy_unless_no_proxy_covers_it(
        monkeypatch, no_proxy_from_the_runner, crm_alone):
    """MCP servers by URL honour HTTP_PROXY and NO_PROXY like every outbound call (the SDK's client once ignored
    them), and through a proxy a name that resolves to loopback is still refused before the proxy is asked."""
    async def main() -> None:
        async with LoopbackProxy() as proxy:
            monkeypatch.setenv("HTTP_PROXY", proxy.url.replace("http://", "http://keel:pw@"))
            assert "lookup_customer" in await listed(crm_alone + "/mcp")
            port = crm_alone.rsplit(":", 1)[1]
            assert proxy.heads and {line.split(" ")[1] for line in proxy.request_lines()} == {
                f"http://127.0.0.1:{port}/mcp"}
            assert all(b"Proxy-Authorization: Basic a2VlbDpwdw==" in head for head in proxy.heads)  # keel:pw
            seen = len(proxy.heads)
            with pytest.raises(McpEgressDenied, match="loopback"):
                await listed(f"http://127.1:{port}/mcp")  # 127.0.0.1 by another name
            monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
            assert "lookup_customer" in await listed(crm_alone + "/mcp")
            assert len(proxy.heads) == seen

    asyncio.run(main())


def test_an_https_server_is_tunnelled_to_the_checked_address_and_trusts_keels_ca_bundle_and_certificate(
        monkeypatch, no_proxy_from_the_runner, crm_alone, pki):
    """TLS to an MCP server uses the CA bundle and client certificate of Keel's settings, also through a proxy's
    CONNECT, which asks for the address Keel checked (the name is still what TLS verifies)."""
    async def main() -> None:
        settings, _ = load_settings(environ={"KEEL_OUTBOUND_CA_BUNDLE": str(pki.ca),
                                             "KEEL_OUTBOUND_CLIENT_CERT": str(pki.client_cert),
                                             "KEEL_OUTBOUND_CLIENT_KEY": str(pki.client_key)})
        outbound = Outbound.from_settings(settings)
        async with tls_front(pki.server_context(require_client_cert=True), crm_alone) as port, \
                LoopbackProxy() as proxy:
            url = f"https://127.0.0.1:{port}/mcp"
            with pytest.raises(McpUnavailable, match="(?i)certificate"):
                await listed(url)  # the system's trust store does not know the test CA
            with pytest.raises(McpUnavailable):
                await listed(url, tls=Outbound(ca_bundle=str(pki.ca)).ssl_context())  # and no client certificate
            assert "lookup_customer" in await listed(url, tls=outbound.ssl_context())
            monkeypatch.setenv("HTTPS_PROXY", proxy.url)
            monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # not for https URLs
            for target in (url, f"https://localhost:{port}/mcp"):
                assert "lookup_customer" in await listed(target, tls=outbound.ssl_context())
            assert proxy.heads and set(proxy.request_lines()) == {f"CONNECT 127.0.0.1:{port} HTTP/1.1"}
            with pytest.raises(McpUnavailable, match="(?i)certificate"):
                await listed(url)  # through the proxy, the server's certificate is still checked

    asyncio.run(main())


def test_an_https_proxy_url_in_the_environment_is_refused_naming_the_fix(monkeypatch, no_proxy_from_the_runner):
    monkeypatch.setenv("HTTPS_PROXY", "https://proxy.example:3128")
    with pytest.raises(ConfigError, match="https:// URL") as exc:
        asyncio.run(listed("https://mcp.example/mcp"))
    assert "HTTPS_PROXY" in exc.value.fix
