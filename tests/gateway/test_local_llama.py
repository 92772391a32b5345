"""The `local` provider against the real bundled SmolLM2 model (llama.cpp in-process, offline).

The provider is called directly; the HTTP path has its own tests. One model load per module."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
import sys
import time

import pytest

from keel.core.errors import ConfigError, ContextOverflow, NotSupported
from keel.core.settings import DeploymentConfig
from keel.gateway.protocol import ChatRequest, Provider, ProviderContext
from keel.gateway.providers.local_llama import LocalLlamaProvider, bundled_model_path

# One llama.cpp thread: on a small shared machine, two spinning threads on two busy cores crawl.
CTX = ProviderContext(get_secret=lambda name: "", threads=1)
HELLO = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to paint."}]
LONG_TEXT = "The quick brown fox jumps over the lazy dog. " * 130  # ~1300 tokens, more than the 1024 context

DECODE_PROBE = f"""
import llama_cpp
m = llama_cpp.Llama(model_path={str(bundled_model_path())!r}, n_ctx=256, n_threads=1, verbose=False)
out = []
for token in m.generate(m.tokenize(b"Hello, my name is", add_bos=False), temp=0):
    out.append(token)
    if len(out) == 4:
        break
print(m.detokenize(out).decode(errors="replace"))
"""


def req(messages, **kw) -> ChatRequest:
    kw.setdefault("max_tokens", 16)
    kw.setdefault("temperature", 0)
    return ChatRequest(model="local-chat", messages=messages, **kw)


async def collect(agen):
    return [d async for d in agen]


@pytest.fixture(scope="module")
def decode_probe() -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", DECODE_PROBE], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def provider(decode_probe):
    if decode_probe.returncode != 0:
        pytest.skip("llama.cpp dies on decode on this machine; see test_llama_cpp_build_decodes")
    prov = LocalLlamaProvider(DeploymentConfig(alias="local-chat", provider="local", model="SmolLM2-135M-Instruct",
                                               context_window=1024), CTX)
    prov.load()
    yield prov
    asyncio.run(prov.close())


def test_llama_cpp_build_decodes(decode_probe):
    """Guards the portable llama.cpp build: a native-flags build (AVX-512/AMX kernels) dies with SIGILL or
    SIGSEGV on the first decode on these machines, which would take the whole server down."""
    rc = decode_probe.returncode
    died = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"
    assert rc == 0, (f"loading the bundled model and decoding 4 tokens died with {died}: {decode_probe.stderr[-800:]}\n"
                     "llama-cpp-python was built with native CPU flags; rebuild it portably: CMAKE_ARGS='"
                     "-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_OPENMP=OFF' "
                     "pip install --no-cache-dir --force-reinstall --no-deps llama-cpp-python==0.3.36")
    assert decode_probe.stdout.strip()


def test_is_a_provider(provider):
    assert isinstance(provider, Provider)
    assert (provider.name, provider.can_stream, provider.supports_tools, provider.can_embed) == ("local", True, True,
                                                                                               False)


def test_chat_generates_text_with_real_usage(provider):
    result = asyncio.run(provider.chat(req(HELLO)))
    assert result.content and result.content.strip()
    assert result.finish_reason in ("stop", "length")
    assert result.usage.prompt_tokens == provider.count_tokens(HELLO) > 10  # the template's system prompt counts
    assert 0 < result.usage.completion_tokens <= 16


def test_stream_yields_role_pieces_then_finish_and_usage(provider):
    deltas = asyncio.run(collect(provider.stream(req(STORY, max_tokens=24))))
    assert deltas[0].role == "assistant"
    pieces = [d.content for d in deltas if d.content]
    assert len(pieces) >= 5 and "".join(pieces).strip()
    last = deltas[-1]
    assert last.finish_reason == "length" and last.usage is not None
    assert last.usage.prompt_tokens == provider.count_tokens(STORY)
    assert last.usage.completion_tokens == 24 >= len(pieces)


def test_early_aclose_stops_generation_and_next_request_works(provider, caplog):
    """Guards the disconnect path: a client that goes away must not keep the single worker generating."""

    async def go():
        agen = provider.stream(req(STORY, max_tokens=300))  # cancelled after a few tokens, so still quick
        seen = 0
        async for delta in agen:
            seen += bool(delta.content)
            if seen == 3:
                break
        await agen.aclose()
        return seen, await provider.chat(req(HELLO, max_tokens=8))

    with caplog.at_level(logging.INFO, logger="keel.gateway.local"):
        seen, after = asyncio.run(go())
    assert after.content and after.usage.completion_tokens > 0
    stopped = [r.args[0] for r in caplog.records if r.getMessage().startswith("generation cancelled after")]
    # the worker may run a few tokens ahead of the reader; it must not go on towards max_tokens
    assert len(stopped) == 1 and seen <= stopped[0] < seen + 30


def test_concurrent_requests_are_serialised(provider):
    prompts = [[{"role": "user", "content": q}] for q in
               ("Name a colour.", "What is two plus two?", "Say hello to Alice.")]

    async def go():
        return await asyncio.gather(provider.chat(req(prompts[0])), provider.chat(req(prompts[1])),
                                    collect(provider.stream(req(prompts[2]))))

    first, second, streamed = asyncio.run(go())
    for result, messages in ((first, prompts[0]), (second, prompts[1])):
        assert result.content and result.usage.prompt_tokens == provider.count_tokens(messages)
    assert "".join(d.content or "" for d in streamed).strip()
    assert streamed[-1].usage.prompt_tokens == provider.count_tokens(prompts[2])


def test_event_loop_is_not_blocked_during_generation(provider):
    async def go():
        gaps, start = [], time.monotonic()
        last = start
        task = asyncio.ensure_future(provider.chat(req(STORY, max_tokens=32)))
        while not task.done():
            await asyncio.sleep(0.01)  # the subject: how late each 10 ms tick wakes while the model generates
            now = time.monotonic()
            gaps.append(now - last)
            last = now
        await task
        return gaps, last - start

    gaps, total = asyncio.run(go())
    assert len(gaps) > 5 and max(gaps) < total / 3  # a blocking call would show as one gap as long as the call


def test_seed_makes_sampling_repeatable(provider):
    results = [asyncio.run(provider.chat(req(HELLO, temperature=1.0, seed=7))).content for _ in range(2)]
    assert results[0] == results[1]


def test_stop_sequence_ends_the_answer(provider):
    result = asyncio.run(provider.chat(req([{"role": "user", "content": "Count from 1 to 10 with commas."}],
                                           stop=["5"], max_tokens=32)))
    assert "5" not in result.content and result.finish_reason == "stop"


def test_context_overflow_names_the_numbers(provider):
    with pytest.raises(ContextOverflow) as err:
        asyncio.run(provider.chat(req([{"role": "user", "content": LONG_TEXT}])))
    assert err.value.ids["context_window"] == 1024 and err.value.ids["prompt_tokens"] > 1024
    assert "trim" in err.value.fix
    with pytest.raises(ContextOverflow) as err:
        asyncio.run(provider.chat(req(HELLO, max_tokens=2000)))
    assert "max_tokens 2000" in err.value.detail


def test_trim_drops_oldest_messages_until_it_fits(provider):
    system = {"role": "system", "content": "You are terse."}
    last = {"role": "user", "content": "Say hello."}
    messages = [system, {"role": "user", "content": LONG_TEXT}, {"role": "assistant", "content": "Noted."}, last]
    result = asyncio.run(provider.chat(req(messages, body={"keel": {"context_overflow": "trim"}})))
    assert result.content and result.usage.prompt_tokens == provider.count_tokens([system, messages[2], last])
    with pytest.raises(ContextOverflow):  # the last user message alone does not fit: nothing left to drop
        asyncio.run(provider.chat(req([system, {"role": "user", "content": LONG_TEXT}],
                                      body={"keel": {"context_overflow": "trim"}})))


def test_tools_give_a_call_and_embeddings_are_not_supported(provider):
    """Tools are served through constrained output (tests/gateway/test_local_tools.py has the HTTP path)."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    result = asyncio.run(provider.chat(req(HELLO, tools=tools, tool_choice="required", max_tokens=24)))
    assert result.tool_calls[0]["function"] == {"name": "f", "arguments": "{}"}
    with pytest.raises(NotSupported):
        asyncio.run(provider.embed(["hello"]))


def test_json_modes_return_parseable_json(provider):
    asked = [{"role": "user", "content": "Reply with a JSON object with key ok set to true."}]
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    result = asyncio.run(provider.chat(req(asked, max_tokens=32, response_format={
        "type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})))
    assert isinstance(json.loads(result.content)["ok"], bool)
    result = asyncio.run(provider.chat(req(asked, max_tokens=32, response_format={"type": "json_object"})))
    assert result.finish_reason == "stop" and isinstance(json.loads(result.content), dict)


def test_missing_model_file_is_a_config_error():
    with pytest.raises(ConfigError, match="does not exist"):
        LocalLlamaProvider(DeploymentConfig(alias="x", provider="local", path="/nonexistent/model.gguf"), CTX)


def test_context_window_is_capped_to_the_trained_context(provider):
    prov = LocalLlamaProvider(DeploymentConfig(alias="big", provider="local", context_window=16384), CTX)
    try:
        assert prov.n_ctx == 8192
    finally:
        asyncio.run(prov.close())
