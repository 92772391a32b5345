"""The official `openai` client against the real server on loopback, served by the bundled local
models: real generated text, real usage numbers, one ledger row per request."""

import asyncio
import json

import openai
import pytest

from conftest import eventually, wait_ledger


@pytest.fixture(scope="module")
def srv(module_server_factory):
    return module_server_factory(KEEL_EMBEDDED_MODELS="true", KEEL_TRACE_EXPORTER="jsonl")


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=srv.admin_key, max_retries=0)


def test_models_lists_embedded_aliases(client):
    ids = {m.id for m in client.models.list()}
    assert {"local-chat", "local-embed"} <= ids


def test_chat_non_streaming_real_text_and_usage(client, srv):
    raw = client.chat.completions.with_raw_response.create(
        model="local-chat", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24, temperature=0, metadata={"use_case": "geo", "task_id": "t-1"})
    resp = raw.parse()
    text = resp.choices[0].message.content
    assert text and len(text.strip()) > 3
    assert resp.usage.prompt_tokens > 5 and 0 < resp.usage.completion_tokens <= 24
    assert resp.model == "local-chat"
    assert raw.headers["x-keel-deployment"] == "local-chat/local"
    rid = raw.headers["x-request-id"]
    rows = wait_ledger(srv.extra["db_url"], f"request_id = '{rid}'", 1)
    assert len(rows) == 1
    row = rows[0]
    assert row.status == "ok" and row.tokens_in == resp.usage.prompt_tokens
    assert row.tokens_out == resp.usage.completion_tokens and row.use_case == "geo" and row.task_id == "t-1"
    assert row.latency_ms > 0


def test_chat_streaming_with_usage(client, srv):
    stream = client.chat.completions.create(
        model="local-chat", messages=[{"role": "user", "content": "Name three colours."}], max_tokens=20,
        temperature=0, stream=True, stream_options={"include_usage": True})
    pieces, usage, finish = [], None, None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces).strip()
    assert finish in ("stop", "length")
    assert usage is not None and usage.completion_tokens > 0 and usage.prompt_tokens > 0
    rows = wait_ledger(srv.extra["db_url"], "stream = true AND status = 'ok'", 1)
    assert rows and rows[-1].ttft_ms is not None and rows[-1].ttft_ms > 0


def test_async_client_streaming_and_not(srv):
    async def run():
        client = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key=srv.admin_key, max_retries=0)
        resp = await client.chat.completions.create(
            model="local-chat", messages=[{"role": "user", "content": "Say hello."}], max_tokens=12)
        stream = await client.chat.completions.create(
            model="local-chat", messages=[{"role": "user", "content": "Say hi."}], max_tokens=12, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        await client.close()
        return resp, text

    resp, text = asyncio.run(run())
    assert resp.choices[0].message.content and resp.usage.total_tokens > 0
    assert text.strip()


def test_embeddings_float_and_base64(client):
    resp = client.embeddings.create(model="local-embed", input=["a cat sits on the mat", "stock markets fell"])
    assert len(resp.data) == 2 and len(resp.data[0].embedding) == 384
    assert resp.usage.prompt_tokens > 0
    floats = client.embeddings.create(model="local-embed", input="a cat", encoding_format="float")
    assert abs(sum(x * x for x in floats.data[0].embedding) - 1.0) < 1e-3


def test_clear_errors(client):
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert "local-chat" in str(exc.value)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    with pytest.raises(openai.BadRequestError) as exc:  # tools are served (test_local_tools.py), not with a format
        client.chat.completions.create(model="local-chat", messages=[{"role": "user", "content": "x"}], tools=tools,
                                       response_format={"type": "json_object"})
    assert "tools" in str(exc.value)
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="local-chat", input="x")
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="local-chat", max_tokens=10,
                                       messages=[{"role": "user", "content": "word " * 9000}])
    assert "context" in str(exc.value).lower()


def test_scoped_key_sees_only_its_models(srv):
    with srv.admin() as admin:
        key = admin.post("/admin/keys", json={"role": "member", "scopes": {"models": ["local-embed"]}}).json()["key"]
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0)
    assert [m.id for m in client.models.list()] == ["local-embed"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="local-chat", messages=[{"role": "user", "content": "x"}])


def test_spans_carry_request_id_and_usage(client, srv):
    raw = client.chat.completions.with_raw_response.create(
        model="local-chat", messages=[{"role": "user", "content": "Hi"}], max_tokens=5)
    rid = raw.headers["x-request-id"]
    path = srv.data_dir / "traces.jsonl"
    eventually(lambda: path.exists() and rid in path.read_text())
    spans = [json.loads(line) for line in path.read_text().splitlines() if rid in line]
    assert spans, "no span for the request"
    attrs = spans[0]["attributes"]
    assert attrs["gen_ai.request.model"] == "local-chat" and attrs["gen_ai.usage.output_tokens"] > 0
