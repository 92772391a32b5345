"""Policy: parsing with field/line errors, classification resolution, and the guarantee that restricted
data never reaches a non-local deployment — not through a mixed alias, not through fallbacks, not through
collections whose chunks went into the prompt — with a 403 naming the rule instead of a silent reroute."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from opentelemetry import trace

from keel.core.db import Store
from keel.core.settings import AliasConfig, DeploymentConfig, Settings
from keel.gateway.deployments import Deployments
from keel.gateway.pipeline import Call, Gateway, Providers
from keel.gateway.protocol import ChatRequest, ProviderContext
from keel.gateway.router import Router
from keel.governance import service as governance_service
from keel.governance.policy.engine import PolicyDenied, PolicyEngine
from keel.governance.policy.model import DEFAULT_POLICY, PolicyInvalid, parse_policy
from keel.identity.principal import Principal
from keel.observe.ledger import Ledger
from tests.fakes.openai_upstream import FakeOpenAI
from tests.governance.conftest import POLICY, bodies, chat

SECRET = "Project NIGHTJAR payroll numbers"


def test_invalid_policy_names_field_and_line():
    text = "name: p\ndata_rules:\n  - name: r\n    classification: restricted\n    providerz: [local]\n" \
           "guards:\n  input: {pii: explode}\n"
    with pytest.raises(PolicyInvalid) as exc:
        parse_policy(text, "p.yaml")
    errors = {e["field"]: e["line"] for e in exc.value.ids["errors"]}
    assert errors == {"data_rules[0].providerz": 5, "guards.input.pii": 7}
    with pytest.raises(PolicyInvalid) as exc:
        parse_policy("data_rules:\n  - {name: r, classification: secret}\n")
    assert exc.value.ids["errors"][0]["field"] == "data_rules[0].classification"
    assert "allowed: public, internal, confidential, restricted" in exc.value.detail


def test_classification_is_the_highest_of_team_metadata_and_collections():
    engine = PolicyEngine(parse_policy(POLICY), version=7)
    assert engine.decide().classification == "internal"
    assert engine.decide(team="public").classification == "internal"  # never below the policy default
    d = engine.decide(team="confidential", explicit="public",
                      collections=[{"id": "hr", "classification": "restricted"}, {"id": "wiki", "classification": "public"}])
    assert d.classification == "restricted" and d.reasons == ["collection hr"] and d.policy_version == 7
    assert engine.decide(team="confidential").guards["input"]["pii"] == "redact"
    assert engine.decide(use_case="support-reply").review is True
    with pytest.raises(Exception) as exc:
        engine.decide(explicit="top-secret")
    assert "top-secret" in str(exc.value)


def test_use_case_can_only_tighten_guards():
    engine = PolicyEngine(parse_policy(POLICY.replace(
        "use_cases:\n", "use_cases:\n  lax: {risk: low, guards: {input: {secrets: allow}}}\n")), 1)
    assert engine.decide(use_case="lax").guards["input"]["secrets"] == "block"


# -- through the real gateway and router, in process ------------------------------------------------------

@pytest.fixture(scope="module")
def fakes():
    with FakeOpenAI() as cloud, FakeOpenAI() as onprem:
        yield cloud, onprem


@pytest.fixture
def governed_gateway(db_url, tmp_path, fakes):
    cloud, onprem = fakes
    cloud.reset()
    onprem.reset()
    models = [dict(alias="cloud", model="gpt", id="cloud/remote", base_url=cloud.url),
              dict(alias="onprem", model="llama", id="onprem/vllm", base_url=onprem.url),
              dict(alias="mixed", model="gpt", id="mixed/remote", base_url=cloud.url, weight=1000),
              dict(alias="mixed", model="llama", id="mixed/onprem", base_url=onprem.url, weight=1),
              dict(alias="cloud-first", model="gpt", id="cloud-first/remote", base_url=cloud.url),
              dict(alias="broken-onprem", model="fault:500", id="onprem/broken", base_url=onprem.url)]
    settings = Settings(data_dir=tmp_path, embedded_models=False,
                        models=[DeploymentConfig(provider="openai_compatible", **m) for m in models],
                        aliases={"cloud-first": AliasConfig(fallbacks=["onprem"]),
                                 "broken-onprem": AliasConfig(retries=0, fallbacks=["cloud", "onprem"])})
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    store = Store.open(db_url)
    store.upgrade()
    deployments = Deployments(store, settings, ProviderContext(get_secret=lambda name: ""))
    gov = governance_service.build(settings, store, deployments, policy_file=policy)
    gw = Gateway(deployments, Ledger(store), trace.get_tracer("test"), stages=gov.stages,
                 router=Router(Providers(deployments), settings, allow=gov.allow))
    yield gw, gov, cloud, onprem
    store.dispose()


def new_call(alias: str, *, classification: str | None = None, collections: list[dict[str, Any]] | None = None,
             stream: bool = False) -> Call:
    call = Call(request_id=uuid.uuid4().hex, principal=Principal(key_id="k1", role="member"), kind="chat",
                alias=alias, metadata={"classification": classification} if classification else {},
                chat=ChatRequest(model=alias, messages=[{"role": "user", "content": f"Summarise: {SECRET}"}],
                                 stream=stream))
    if collections:
        call.annotations["collections"] = collections
    return call


def run(gw: Gateway, coro: Any) -> Any:
    async def main() -> Any:
        try:
            return await coro
        finally:
            await gw.deployments.close()
    return asyncio.run(main())


def leaked(fake: FakeOpenAI) -> int:
    return sum(SECRET in str(b) for b in bodies(fake))


@pytest.mark.store
def test_restricted_collection_never_reaches_a_cloud_deployment(governed_gateway):
    gw, gov, cloud, onprem = governed_gateway
    hr = [{"id": "col_hr", "classification": "restricted"}]

    async def scenario() -> None:
        with pytest.raises(PolicyDenied) as exc:  # named model is cloud-only: refused, not rerouted
            await gw.chat(new_call("cloud", collections=hr))
        assert exc.value.ids["rule"] == "restricted-on-prem-only" and "col_hr" in exc.value.detail
        with pytest.raises(PolicyDenied):  # primary cloud-only even though a fallback is on-prem
            await gw.chat(new_call("cloud-first", collections=hr))
        for _ in range(30):  # weight 1000:1 towards the cloud deployment, yet every call goes on-prem
            await gw.chat(new_call("mixed", collections=hr))
        for stream in (False, True):  # on-prem primary fails; the cloud fallback is skipped, on-prem used
            call = new_call("broken-onprem", collections=hr, stream=stream)
            if stream:
                async for _ in gw.chat_stream(call):
                    pass
            else:
                await gw.chat(call)
            assert call.deployment.deployment_id() == "onprem/vllm"
            skipped = [a for a in call.annotations["attempts"]]
            assert all(a.get("deployment") != "cloud/remote" for a in skipped)

    run(gw, scenario())
    assert leaked(cloud) == 0
    assert leaked(onprem) == 34  # 30 mixed + 2 × (failed on-prem try + on-prem fallback)
    actions = [e["action"] for e in gov.audit.events(limit=100)]
    assert actions.count("policy.deny") == 2 and "data.access" in actions


@pytest.mark.store
def test_unrestricted_calls_flow_and_default_policy_keeps_restricted_local(governed_gateway, tmp_path):
    gw, gov, cloud, _onprem = governed_gateway

    async def scenario() -> None:
        r = await gw.chat(new_call("cloud"))
        assert r.content and gov.allow(new_call("cloud"), gw.deployments.for_alias("cloud")[0])

    run(gw, scenario())
    assert leaked(cloud) == 1
    engine = PolicyEngine(parse_policy(DEFAULT_POLICY), 1)
    d = engine.decide(explicit="restricted")
    local = DeploymentConfig(alias="local-chat", provider="local")
    remote = DeploymentConfig(alias="gpt", provider="openai_compatible")
    assert engine.allowed(d, [local, remote]) == [local]


# -- over HTTP, through the governed server ----------------------------------------------------------------

@pytest.mark.store
def test_http_denial_is_403_policy_denied_naming_the_rule(governed, keys, upstreams):
    before = leaked(upstreams["cloud"])
    r = chat(governed, keys.keys[("member", "red")], "cloud", f"about {SECRET}",
             metadata={"classification": "restricted"})
    assert r.status_code == 403 and r.json()["code"] == "policy_denied"
    assert r.json()["rule"] == "restricted-on-prem-only" and r.json()["policy_version"] >= 1
    ok = chat(governed, keys.keys[("member", "red")], "onprem", f"about {SECRET}",
              metadata={"classification": "restricted"})
    assert ok.status_code == 200
    assert leaked(upstreams["cloud"]) == before
    bad = chat(governed, keys.keys[("member", "red")], "cloud", "hi", metadata={"classification": "ultra"})
    assert bad.status_code == 400 and "ultra" in bad.json()["detail"]


@pytest.mark.store
def test_team_default_classification_applies(governed, keys, upstreams):
    """Team blue is confidential: its PII is redacted before it leaves, and cloud-first is refused."""
    r = chat(governed, keys.keys[("member", "blue")], "cloud-first", "hi")
    assert r.status_code == 403 and r.json()["rule"] == "confidential-no-cloud-first"


@pytest.mark.store
def test_policy_test_endpoint_explains(governed, keys):
    with keys.client("auditor", None) as c:
        r = c.post("/v1/policy/test", json={"model": "mixed", "collections": [{"id": "hr", "classification": "restricted"}]})
    body = r.json()
    assert r.status_code == 200 and body["allowed"] and body["classification"] == "restricted"
    verdicts = {d["deployment"]: d["allowed"] for d in body["deployments"]}
    assert verdicts == {"mixed/remote": False, "mixed/onprem": True}
    with keys.client("auditor", None) as c:
        denied = c.post("/v1/policy/test", json={"model": "cloud", "team": "blue", "classification": "restricted"}).json()
    assert not denied["allowed"] and "restricted-on-prem-only" in denied["denial"]
