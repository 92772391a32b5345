"""Egress as a company runs it, through a real Keel server: with HTTPS_PROXY set, a loopback CONNECT proxy
carries the traffic to a TLS upstream that Keel trusts through the install-wide CA bundle, and sees nothing
of a NO_PROXY host; a deployment's own CA bundle and client certificate reach an upstream that requires
mutual TLS (and without them the call fails cleanly); a deployment's extra headers from the vault
(`options.secret_headers`, secrets that serve `http_header`) arrive upstream, and their values appear in no
answer and no log line, even when the upstream echoes them back."""

from __future__ import annotations

import json

import pytest

from tests.fakes.tls import make_pki
from tests.fakes.tls_upstream import ThreadedProxy, TLSFakeOpenAI

pytestmark = pytest.mark.store

TOKEN = "corp-gw-token-" + "hush" * 8
PROVIDER_KEY = "sk-vllm-" + "k" * 24


@pytest.fixture(scope="module")
def egress(tmp_path_factory, module_server_factory):
    base = tmp_path_factory.mktemp("egress")
    (base / "corp").mkdir()
    (base / "partner").mkdir()
    corp, partner = make_pki(base / "corp"), make_pki(base / "partner")
    with TLSFakeOpenAI(tls=corp.server_context()) as proxied, \
            TLSFakeOpenAI(tls=partner.server_context(require_client_cert=True), host="localhost",
                          api_key=PROVIDER_KEY) as mutual, ThreadedProxy() as proxy:
        config = base / "keel.yaml"
        config.write_text(f"""
ledger_flush_interval_s: 0.05
outbound_ca_bundle: {corp.ca}
models:
  - {{alias: via-proxy, provider: openai_compatible, model: m, base_url: "{proxied.url}", timeout_s: 10}}
  - {{alias: mutual, provider: vllm, model: m, base_url: "{mutual.url}", credential: vllm-key, timeout_s: 10,
      options: {{ca_bundle: "{partner.ca}", client_cert: "{partner.client_cert}", client_key: "{partner.client_key}",
                 headers: {{X-Team: platform}}, secret_headers: {{X-Corp-Token: corp-token}}}}}}
  - {{alias: no-client-cert, provider: openai_compatible, model: m, base_url: "{mutual.url}", timeout_s: 5,
      options: {{ca_bundle: "{partner.ca}"}}}}
  - {{alias: untrusted, provider: openai_compatible, model: m, base_url: "{mutual.url}", timeout_s: 5}}
aliases:
  mutual: {{retries: 0}}
  no-client-cert: {{retries: 0}}
  untrusted: {{retries: 0}}
""")
        proxies = {"HTTPS_PROXY": proxy.url, "https_proxy": proxy.url, "NO_PROXY": "localhost",
                   "no_proxy": "localhost", "HTTP_PROXY": "", "http_proxy": "", "ALL_PROXY": "", "all_proxy": ""}
        srv = module_server_factory(config=config, **proxies)
        with srv.admin() as admin:
            for name, value, use in (("corp-token", TOKEN, "http_header"), ("vllm-key", PROVIDER_KEY, "provider")):
                r = admin.put(f"/admin/secrets/{name}", json={"value": value, "uses": [use]})
                assert r.status_code == 200, r.text
        yield srv, proxy, proxied, mutual


def chat(srv, model: str, **kw):
    with srv.admin() as admin:
        return admin.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "hi"}],
                                                        **kw})


def test_https_proxy_carries_the_upstream_traffic_and_the_ca_bundle_setting_is_trusted(egress):
    srv, proxy, proxied, _mutual = egress
    port = proxied.url.split(":")[2].split("/")[0]
    r = chat(srv, "via-proxy")
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"].startswith("Hello from the fake upstream")
    assert f"CONNECT 127.0.0.1:{port} HTTP/1.1" in proxy.request_lines()
    assert proxied.stats()["requests"] == 1


def test_a_no_proxy_host_goes_direct_with_the_deployments_own_ca_and_client_certificate(egress):
    srv, proxy, _proxied, mutual = egress
    before = len(proxy.heads)
    r = chat(srv, "mutual")
    assert r.status_code == 200, r.text
    with srv.admin() as admin, admin.stream("POST", "/v1/chat/completions", json={
            "model": "mutual", "stream": True, "messages": [{"role": "user", "content": "hi"}]}) as s:
        assert s.status_code == 200 and "[DONE]" in "".join(s.iter_text())
    assert len(proxy.heads) == before, "a NO_PROXY host must not go through the proxy"
    assert not [line for line in proxy.request_lines() if "localhost" in line]
    assert mutual.client_certs[-2:] == [{"commonName": "keel-client"}] * 2
    seen = mutual.received[-1]["headers"]
    assert seen["X-Corp-Token"] == TOKEN and seen["X-Team"] == "platform"
    assert seen["Authorization"] == f"Bearer {PROVIDER_KEY}"


@pytest.mark.parametrize("alias", ["no-client-cert", "untrusted"])
def test_without_the_client_certificate_or_the_ca_the_call_fails_cleanly(egress, alias):
    srv, _proxy, _proxied, mutual = egress
    sent = mutual.stats()["requests"]
    r = chat(srv, alias)
    assert r.status_code == 502 and r.headers["content-type"].startswith("application/problem+json"), r.text
    assert r.json()["code"] and "connection error" in r.json()["detail"]
    assert mutual.stats()["requests"] == sent  # the TLS handshake failed before any request


def test_header_secrets_appear_in_no_answer_and_no_log_even_when_echoed(egress):
    srv, _proxy, _proxied, mutual = egress
    mutual.refuse_with = True
    try:
        r = chat(srv, "mutual")
        with srv.admin() as admin, admin.stream("POST", "/v1/chat/completions", json={
                "model": "mutual", "stream": True, "messages": [{"role": "user", "content": "hi"}]}) as s:
            streamed = s.status_code, "".join(s.iter_text())
    finally:
        mutual.refuse_with = False
    assert r.status_code == 502 and "refused; you sent" in r.text, r.text
    assert "X-Corp-Token" in r.text and "***" in r.text  # the echo arrived, scrubbed
    for text in (r.text, json.dumps(dict(r.headers)), streamed[1]):
        assert TOKEN not in text and PROVIDER_KEY not in text
    with srv.admin() as admin:
        listed = admin.get("/admin/deployments").text + admin.get("/admin/secrets").text
    assert TOKEN not in listed and PROVIDER_KEY not in listed
    logs = srv.logs()
    assert TOKEN not in logs and PROVIDER_KEY not in logs
