"""Providers of the OpenAI wire format: `azure_openai` against a loopback fake Azure resource (deployment
URLs, api-version, api-key or Entra token from the vault) and the named presets (vllm, ollama, tgi, mistral,
groq, together, fireworks, deepseek, openrouter) against the OpenAI fake: each passes the provider
conformance suite, sends its auth header and leaves out the fields its server refuses."""

from __future__ import annotations

import json
from typing import Any

import pytest

from keel.core.errors import ConfigError, NotSupported, UpstreamRateLimited, UpstreamRefused, UpstreamRejected
from keel.core.settings import DeploymentConfig
from keel.gateway import registry
from keel.gateway.protocol import ProviderContext
from keel.gateway.providers.azure_openai import API_VERSION, AzureOpenAIProvider
from keel.gateway.providers.presets import PRESETS
from tests.fakes.azure_upstream import FakeAzureOpenAI
from tests.fakes.openai_upstream import FakeOpenAI
from tests.gateway.conformance import (
    WEATHER_TOOL, ProviderConformance, chat_request, collect, expect_error, run_with,
)

KEY = "azure-key-" + "s3cr3t" * 6
TOKEN = "eyJ0eXAiOiJKV1Qi.entra-token-" + "t0k3n" * 6


def vault(values: dict[str, str]) -> ProviderContext:
    return ProviderContext(get_secret=values.__getitem__)


def azure(url: str, *, secret: str = KEY, **options: Any) -> AzureOpenAIProvider:
    cfg = DeploymentConfig(alias="gpt", provider="azure_openai", model=options.pop("model", "gpt-4o-prod"),
                           base_url=url, credential="azure", timeout_s=options.pop("timeout_s", 5), options=options)
    return AzureOpenAIProvider(cfg, vault({"azure": secret}))


@pytest.fixture(scope="module")
def azure_upstream():
    with FakeAzureOpenAI(api_key=KEY, token=TOKEN) as fake:
        yield fake


@pytest.fixture
def azure_fake(azure_upstream):
    azure_upstream.reset()
    return azure_upstream


class TestAzureOpenAIConformance(ProviderConformance):
    @pytest.fixture
    def provider_factory(self, azure_fake):
        return lambda: azure(azure_fake.url)

    def test_embed_returns_one_vector_per_text_or_not_supported(self, azure_fake):
        """Embeddings go to the embedding deployment's own URL."""
        super().test_embed_returns_one_vector_per_text_or_not_supported(lambda: azure(azure_fake.url,
                                                                                      model="embed-prod"))


def test_azure_urls_api_version_and_api_key(azure_fake):
    run_with(azure(azure_fake.url + "/", api_version="2025-01-01-preview"),
             lambda p: p.chat(chat_request(tools=[WEATHER_TOOL])))
    seen = azure_fake.received[-1]
    assert seen["path"] == "/openai/deployments/gpt-4o-prod/chat/completions"
    assert seen["headers"]["api-key"] == KEY and "Authorization" not in seen["headers"]
    assert seen["body"]["tools"] == [WEATHER_TOOL]
    p = azure(azure_fake.url, api_version="2025-01-01-preview")
    assert str(p._url(p.chat_url).query["api-version"]) == "2025-01-01-preview"
    assert azure(azure_fake.url).chat_url.endswith(f"?api-version={API_VERSION}")


def test_azure_entra_token_is_a_bearer_and_is_read_again_after_its_refresh(azure_fake):
    tokens = [TOKEN, "expired-" + TOKEN]
    reads = []

    def get(name: str) -> str:
        reads.append(name)
        return tokens[0]

    cfg = DeploymentConfig(alias="gpt", provider="azure_openai", model="gpt-4o-prod", base_url=azure_fake.url,
                           credential="entra", options={"auth": "entra", "token_refresh_s": 0.000001})
    provider = AzureOpenAIProvider(cfg, ProviderContext(get_secret=get))

    async def body(p: AzureOpenAIProvider) -> None:
        await p.chat(chat_request())
        assert azure_fake.received[-1]["headers"]["Authorization"] == f"Bearer {TOKEN}"
        assert "api-key" not in azure_fake.received[-1]["headers"]
        tokens[0] = tokens[1]  # rotated in the vault to one the resource refuses
        err = await expect_error(p.chat(chat_request()))
        assert isinstance(err, UpstreamRefused) and tokens[1] not in json.dumps(err.to_problem())
    run_with(provider, body)
    assert len(reads) == 2


def test_azure_errors_missing_deployment_and_429_with_retry_after(azure_fake):
    err = run_with(azure(azure_fake.url, model="nope"), lambda p: expect_error(p.chat(chat_request())))
    assert isinstance(err, UpstreamRejected) and err.status == 404 and "does not exist" in err.detail
    azure_fake.fail_next("429")
    err = run_with(azure(azure_fake.url), lambda p: expect_error(p.stream(chat_request(stream=True))))
    assert isinstance(err, UpstreamRateLimited) and err.retry_after == 2.0 and err.headers["Retry-After"] == "2"
    err = run_with(azure(azure_fake.url, secret="wrong-key-xyz"), lambda p: expect_error(p.chat(chat_request())))
    assert isinstance(err, UpstreamRefused) and "wrong-key-xyz" not in json.dumps(err.to_problem())


def test_azure_streamed_tool_calls_skip_the_filter_chunk(azure_fake):
    deltas = run_with(azure(azure_fake.url), lambda p: collect(p.stream(chat_request(stream=True,
                                                                                     tools=[WEATHER_TOOL]))))
    calls = [c for d in deltas for c in d.tool_calls or ()]
    assert calls[0]["function"]["name"] == "get_weather"
    assert "".join(c["function"].get("arguments", "") for c in calls) == '{"city":"Paris"}'
    assert [d.finish_reason for d in deltas if d.finish_reason] == ["tool_calls"]


def test_azure_configuration_mistakes_are_config_errors():
    for options, text in (({"auth": "oauth"}, "options.auth"), ({}, "base_url")):
        with pytest.raises(ConfigError, match=text):
            cfg = DeploymentConfig(alias="a", provider="azure_openai", model="d", options=options,
                                   base_url=None if not options else "https://x.openai.azure.com")
            AzureOpenAIProvider(cfg, vault({}))


# -- presets -----------------------------------------------------------------------------------------------------

class FakeAlwaysUsage(FakeOpenAI):
    """Servers (Mistral) that send usage on the last chunk without being asked with stream_options."""

    def events(self, model, words, call, finish, usage, fault):
        events = super().events(model, words, call, finish, usage, fault)
        if usage is None and fault is None:
            prompt = 5
            done = events.pop()
            events += [self.chunk(model, usage={"prompt_tokens": prompt, "completion_tokens": len(words),
                                                "total_tokens": prompt + len(words)}), done]
        return events


@pytest.fixture(scope="module")
def preset_upstream():
    with FakeAlwaysUsage(api_key=KEY) as fake:
        yield fake


@pytest.fixture
def preset_fake(preset_upstream):
    preset_upstream.reset()
    return preset_upstream


def preset(name: str, url: str, **cfg: Any) -> Any:
    config = DeploymentConfig(alias=name, provider=name, model="m", base_url=url, credential="key", **cfg)
    return registry.get(name)(config, vault({"key": KEY}))


def _conformance(name: str) -> type:
    class Conformance(ProviderConformance):
        can_embed = PRESETS[name].can_embed

        @pytest.fixture
        def provider_factory(self, preset_fake):
            return lambda: preset(name, preset_fake.url)

        def test_embed_returns_one_vector_per_text_or_not_supported(self, provider_factory):
            if self.can_embed:
                super().test_embed_returns_one_vector_per_text_or_not_supported(provider_factory)
            else:  # the server has no embeddings endpoint: the request is the upstream's to refuse
                pytest.skip(f"{name} serves no embeddings")
    Conformance.__name__ = Conformance.__qualname__ = f"Test{name.title()}Conformance"
    return Conformance


for _name in PRESETS:
    globals()[f"Test{_name.title()}Conformance"] = _conformance(_name)


def test_every_preset_is_registered_with_its_default_base_url():
    for name, p in PRESETS.items():
        cls = registry.get(name)
        assert cls.name == name and cls.default_base_url == p.base_url
        provider = cls(DeploymentConfig(alias="a", provider=name, model="m"), vault({}))
        assert provider.chat_url == p.base_url + "/chat/completions"
        assert "Authorization" not in provider._request_headers()  # no credential set: none sent


CLIENT_BODY = {"logit_bias": {"50256": -100}, "user": "u-1", "store": True, "metadata": {"a": "b"}, "seed": 7,
               "max_completion_tokens": 9, "parallel_tool_calls": False, "tool_choice": "auto",
               "stream_options": {"include_usage": True}}


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_drop_and_rename_what_their_server_refuses(preset_fake, name):
    req = chat_request(tools=[WEATHER_TOOL])
    req.body.update(CLIENT_BODY)
    req.seed = 7
    req.tool_choice = "auto"
    run_with(preset(name, preset_fake.url), lambda p: p.chat(req))
    seen = preset_fake.received[-1]
    sent, quirks = seen["body"], PRESETS[name]
    assert seen["headers"]["Authorization"] == f"Bearer {KEY}"
    for key in quirks.drop:
        assert key not in sent, (name, key)
    for old, new in quirks.rename.items():
        assert old not in sent and new in sent, (name, old)
    kept = set(CLIENT_BODY) - set(quirks.drop) - set(quirks.rename) - {"stream_options"}
    assert kept <= set(sent), (name, kept - set(sent))
    for header, value in quirks.headers.items():
        assert seen["headers"][header] == value


def test_single_choice_presets_refuse_n_before_any_request(preset_fake):
    for name in [n for n, p in PRESETS.items() if p.single_choice]:
        req = chat_request()
        req.body["n"] = 2
        with pytest.raises(NotSupported):
            run_with(preset(name, preset_fake.url), lambda p: p.chat(req))
    assert preset_fake.stats()["requests"] == 0


def test_preset_errors_keep_retry_after_and_hide_the_key(preset_fake):
    preset_fake.fail_next("429")
    err = run_with(preset("groq", preset_fake.url), lambda p: expect_error(p.chat(chat_request())))
    assert isinstance(err, UpstreamRateLimited) and err.retry_after == 2.0
    cfg = DeploymentConfig(alias="g", provider="groq", model="m", base_url=preset_fake.url, credential="key")
    err = run_with(registry.get("groq")(cfg, vault({"key": "gsk_wrong_" + "w" * 20})),
                   lambda p: expect_error(p.chat(chat_request())))
    assert isinstance(err, UpstreamRefused) and "gsk_wrong_" not in json.dumps(err.to_problem())




# -- extra headers from the vault ----------------------------------------------------------------------------

HEADER_SECRET = "corp-" + "h3ad3r" * 6


def with_headers(url: str, secrets: dict[str, str], **options: Any) -> Any:
    def header_secret(name: str) -> str:
        if name not in secrets:
            from keel.identity.vault import denied
            raise denied(name, None, "http_header")
        return secrets[name]
    cfg = DeploymentConfig(alias="g", provider="groq", model="m", base_url=url, credential="key", options=options)
    return registry.get("groq")(cfg, ProviderContext(get_secret={"key": KEY}.__getitem__,
                                                     get_header_secret=header_secret))


def test_secret_headers_are_sent_and_scrubbed_from_errors(preset_fake):
    p = with_headers(preset_fake.url, {"corp": HEADER_SECRET}, secret_headers={"X-Corp-Token": "corp"},
                     headers={"X-Team": "platform"})
    run_with(p, lambda p: p.chat(chat_request()))
    seen = preset_fake.received[-1]["headers"]
    assert seen["X-Corp-Token"] == HEADER_SECRET and seen["X-Team"] == "platform"

    class Echo(FakeAlwaysUsage):
        def check_auth(self, request):
            return self.error_response(400, f"bad header {request.headers.get('X-Corp-Token')}")

    with Echo() as echo:
        for call in (lambda p: expect_error(p.chat(chat_request())),
                     lambda p: expect_error(p.stream(chat_request(stream=True)))):
            err = with_headers(echo.url, {"corp": HEADER_SECRET}, secret_headers={"X-Corp-Token": "corp"})
            err = run_with(err, call)
            assert "bad header ***" in err.detail and HEADER_SECRET not in json.dumps(err.to_problem())


@pytest.mark.parametrize("options,text", [
    ({"secret_headers": {"X-Corp-Token": "nowhere"}}, "header secret 'nowhere'"),
    ({"secret_headers": ["X-Corp-Token"]}, "options.secret_headers must map"),
    ({"secret_headers": {"X-Corp-Token": ""}}, "options.secret_headers must map"),
])
def test_unusable_secret_headers_are_config_errors_before_any_request(preset_fake, options, text):
    with pytest.raises(ConfigError, match=text) as exc:
        run_with(with_headers(preset_fake.url, {}, **options), lambda p: p.chat(chat_request()))
    assert exc.value.fix
    assert preset_fake.stats()["requests"] == 0


def test_a_header_secret_with_a_line_break_is_refused():
    p = with_headers("http://127.0.0.1:9/v1", {"corp": "a\r\nX-Evil: 1"}, secret_headers={"X-Corp-Token": "corp"})
    with pytest.raises(ConfigError, match="X-Corp-Token' has a character HTTP does not allow") as exc:
        run_with(p, lambda p: p.chat(chat_request()))
    assert "X-Evil" not in exc.value.detail and "line breaks" in exc.value.fix
