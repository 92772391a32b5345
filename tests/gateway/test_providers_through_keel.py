"""Each new provider kind behind a real Keel server, driven by the official SDKs: `azure_openai`, `gemini`,
`bedrock` and a preset (`groq`), each to its loopback fake, with credentials stored in the vault through the
admin API. The `openai` SDK chats, streams and calls tools; the `anthropic` SDK sends Messages; the ledger
holds the tokens each upstream reported; an upstream 429 comes back as a 429 with Retry-After."""

from __future__ import annotations

import json

import anthropic
import openai
import orjson
import pytest

from conftest import wait_ledger
from tests.fakes.azure_upstream import FakeAzureOpenAI
from tests.fakes.bedrock_upstream import FakeBedrock
from tests.fakes.gemini_upstream import FakeGemini
from tests.fakes.openai_upstream import FakeOpenAI

pytestmark = pytest.mark.store

REPLY = "Paris is the capital of France."
SECRETS = {"azure-key": "azure-" + "a" * 30, "google-key": "AIza" + "g" * 30, "groq-key": "gsk_" + "q" * 30,
           "aws": orjson.dumps({"access_key_id": "AKIAKEEL", "secret_access_key": "s" * 40}).decode()}
ALIASES = ("azure", "gemini", "bedrock", "groq")
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def fakes():
    started = {"azure": FakeAzureOpenAI(api_key=SECRETS["azure-key"], reply=REPLY).start(),
               "gemini": FakeGemini(api_key=SECRETS["google-key"], reply=REPLY).start(),
               "bedrock": FakeBedrock(access_key="AKIAKEEL", secret_key="s" * 40, reply=REPLY).start(),
               "groq": FakeOpenAI(api_key=SECRETS["groq-key"], reply=REPLY).start()}
    yield started
    for fake in started.values():
        fake.stop()


@pytest.fixture(scope="module")
def srv(tmp_path_factory, module_server_factory, fakes):
    base = tmp_path_factory.mktemp("kinds")
    (base / "keel.yaml").write_text(f"""
ledger_flush_interval_s: 0.05
models:
  - {{alias: azure, provider: azure_openai, model: gpt-4o-prod, base_url: "{fakes['azure'].url}",
      credential: azure-key, options: {{api_version: "2024-10-21"}}}}
  - {{alias: gemini, provider: gemini, model: gemini-fake, base_url: "{fakes['gemini'].url}", credential: google-key}}
  - {{alias: bedrock, provider: bedrock, model: "anthropic.claude-fake-v1:0", base_url: "{fakes['bedrock'].url}",
      credential: aws, options: {{region: eu-central-1}}}}
  - {{alias: groq, provider: groq, model: llama-fake, base_url: "{fakes['groq'].url}", credential: groq-key}}
  - {{alias: azure-embed, provider: azure_openai, model: embed-prod, kind: embedding,
      base_url: "{fakes['azure'].url}", credential: azure-key}}
  - {{alias: gemini-embed, provider: gemini, model: text-embedding-fake, kind: embedding,
      base_url: "{fakes['gemini'].url}", credential: google-key}}
aliases:
  azure: {{retries: 0}}
""")
    server = module_server_factory(config=base / "keel.yaml")
    with server.admin() as admin:
        for name, value in SECRETS.items():
            assert admin.put(f"/admin/secrets/{name}", json={"value": value}).status_code == 200
    return server


@pytest.fixture(scope="module")
def oai(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=srv.admin_key, max_retries=0)


@pytest.mark.parametrize("alias", ALIASES)
def test_openai_sdk_chat_stream_and_tools(srv, oai, alias):
    raw = oai.chat.completions.with_raw_response.create(model=alias, messages=[{"role": "user", "content": "hi"}])
    done = raw.parse()
    assert done.choices[0].message.content == REPLY and done.usage.completion_tokens > 0
    row = wait_ledger(srv.extra["db_url"], f"request_id = '{raw.headers['x-request-id']}'")[0]
    assert (row.provider, row.tokens_in, row.tokens_out, row.status) == (
        ("azure_openai" if alias == "azure" else alias), done.usage.prompt_tokens, done.usage.completion_tokens, "ok")

    chunks = list(oai.chat.completions.create(model=alias, messages=[{"role": "user", "content": "hi"}], stream=True,
                                              stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == REPLY
    assert chunks[-1].usage and chunks[-1].usage.completion_tokens > 0

    call = oai.chat.completions.create(model=alias, messages=[{"role": "user", "content": "Weather in Paris?"}],
                                       tools=[TOOL]).choices[0]
    assert call.finish_reason == "tool_calls"
    tool_call = call.message.tool_calls[0]
    assert tool_call.function.name == "get_weather" and json.loads(tool_call.function.arguments) == {"city": "Paris"}
    answer = oai.chat.completions.create(model=alias, tools=[TOOL], messages=[
        {"role": "user", "content": "Weather in Paris?"}, call.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": tool_call.id, "content": "18C"}])
    assert "18C" in answer.choices[0].message.content


@pytest.mark.parametrize("alias", ["gemini", "bedrock"])
def test_anthropic_sdk_messages_through_the_new_kinds(srv, alias):
    client = anthropic.Anthropic(base_url=srv.url, api_key=srv.admin_key, max_retries=0)
    msg = client.messages.create(model=alias, max_tokens=100, messages=[{"role": "user", "content": "hi"}])
    assert msg.content[0].text == REPLY and msg.usage.output_tokens > 0
    with client.messages.stream(model=alias, max_tokens=100, messages=[{"role": "user", "content": "hi"}]) as s:
        assert "".join(s.text_stream) == REPLY


@pytest.mark.parametrize("alias", ["gemini", "azure", "bedrock"])
def test_an_upstream_429_is_a_429_with_retry_after(srv, oai, fakes, alias):
    fakes[alias].fail_next("429", times=3)
    with pytest.raises(openai.RateLimitError) as exc:
        oai.chat.completions.create(model=alias, messages=[{"role": "user", "content": "hi"}])
    wait = exc.value.response.headers["retry-after"]
    # Gemini's RetryInfo and Azure's retry-after say 2 s; Bedrock's throttling names no time: Keel's own default.
    assert wait == "2" if alias != "bedrock" else int(wait) >= 1
    fakes[alias].reset()


@pytest.mark.parametrize("alias", ["azure-embed", "gemini-embed"])
def test_embeddings_through_the_new_kinds(oai, alias):
    out = oai.embeddings.create(model=alias, input=["hello", "world", "hello"])
    vectors = [d.embedding for d in out.data]
    assert len(vectors) == 3 and vectors[0] == vectors[2] != vectors[1] and out.usage.prompt_tokens > 0
