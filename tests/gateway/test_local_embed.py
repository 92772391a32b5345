"""The `local_embed` provider against the real bundled all-MiniLM-L6-v2 (ONNX Runtime in-process, offline).

One model load per module for the vector tests; the conformance suite makes its own providers."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from keel.core.errors import ConfigError, NotSupported
from keel.core.settings import DeploymentConfig
from keel.gateway import registry
from keel.gateway.protocol import ChatRequest, Provider, ProviderContext
from keel.gateway.providers.local_embed import LocalEmbedProvider, locate_model_files

from .conformance import ProviderConformance, chat_request

CTX = ProviderContext(get_secret=lambda name: "", threads=2)
TEXTS = ["hello", "The cat sat on the mat.", "How do I read a file line by line in Python?",
         "Budgets are reserved before the call and settled after it with real usage. " * 5,
         "", "Ünïcödé, emoji 🙂 and CJK 漢字 survive tokenization.", "x " * 40]


def make(**options) -> LocalEmbedProvider:
    return LocalEmbedProvider(DeploymentConfig(alias="local-embed", provider="local_embed", kind="embedding",
                                               options=options), CTX)


def embed(provider: LocalEmbedProvider, texts: list[str]):
    return asyncio.run(provider.embed(texts))


def cosine(a, b) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def provider() -> LocalEmbedProvider:
    return make()


class TestLocalEmbedConformance(ProviderConformance):
    supports_tools = False
    supports_json_mode = False
    can_stream = False
    can_embed = True

    @pytest.fixture
    def provider_factory(self):
        return make

    def test_chat_returns_text_and_usage(self, provider_factory):
        """An embedding model cannot chat: it says so with NotSupported instead of returning text."""
        with pytest.raises(NotSupported):
            self.run(provider_factory, lambda p: p.chat(chat_request()))

    def test_close_is_idempotent(self, provider_factory):
        async def used(p: Provider) -> None:
            await p.embed(["hello"])
            await p.close()
            await p.close()
            assert (await p.embed(["hello again"])).vectors, "a closed provider reloads on next use"
        self.run(provider_factory, used)


def test_registered_under_its_name():
    assert registry.get("local_embed") is LocalEmbedProvider


def test_vectors_have_384_dimensions_and_unit_norm(provider):
    result = embed(provider, TEXTS)
    vectors = np.array(result.vectors)
    assert vectors.shape == (len(TEXTS), 384) == (len(TEXTS), provider.dim)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert result.model == "all-MiniLM-L6-v2"


def test_same_input_gives_identical_floats(provider):
    assert embed(provider, TEXTS).vectors == embed(provider, TEXTS).vectors
    assert np.array_equal(provider.embed_sync(TEXTS), make().embed_sync(TEXTS))


def test_batching_does_not_change_vectors(provider):
    """Regression guard: padding and batch composition must not leak into a text's vector."""
    one_by_one = np.vstack([provider.embed_sync([t]) for t in TEXTS])
    small_batches = make(batch_size=3).embed_sync(TEXTS)
    assert np.abs(provider.embed_sync(TEXTS) - one_by_one).max() < 1e-5
    assert np.abs(small_batches - one_by_one).max() < 1e-5


def test_paraphrases_are_closer_than_unrelated_text(provider):
    a, b, c = provider.embed_sync(["How can I reset my password?", "I forgot my password and need to change it.",
                                   "The recipe needs two cups of flour and an egg."])
    assert cosine(a, b) > 0.6
    assert cosine(a, b) > cosine(a, c) + 0.3


def test_long_text_is_truncated_to_the_models_max_length(provider):
    long_text = "Keel routes every model call through one governed path. " * 200  # ~2000 word pieces
    result = embed(provider, [long_text, long_text + " A tail far beyond the limit changes nothing."])
    assert result.prompt_tokens == 2 * 256
    assert np.abs(np.array(result.vectors[0]) - np.array(result.vectors[1])).max() < 1e-6
    assert np.isclose(np.linalg.norm(result.vectors[0]), 1.0, atol=1e-5)
    assert make(max_length=512).count_tokens([{"role": "user", "content": long_text}]) == 512


def test_empty_list(provider):
    result = embed(provider, [])
    assert result.vectors == [] and result.prompt_tokens == 0
    assert provider.embed_sync([]).shape == (0, 384)


def test_prompt_tokens_are_real_word_piece_counts(provider):
    # [CLS] hello world [SEP] = 4; [CLS] the cat sat on the mat . [SEP] = 9
    assert embed(provider, ["hello world"]).prompt_tokens == 4
    assert embed(provider, ["hello world", "The cat sat on the mat."]).prompt_tokens == 13
    parts = [{"type": "text", "text": "The cat sat on the mat."}]
    assert provider.count_tokens([{"role": "user", "content": "hello world"}, {"role": "user", "content": parts}]) == 13


def test_chat_and_stream_raise_not_supported(provider):
    req = ChatRequest(model="local-embed", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(NotSupported, match="embedding model"):
        asyncio.run(provider.chat(req))
    with pytest.raises(NotSupported):
        provider.stream(req)


def test_session_is_created_once_under_concurrent_first_use():
    fresh = make()
    results: list[np.ndarray] = []
    threads = [threading.Thread(target=lambda: results.append(fresh.embed_sync(TEXTS))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and all(np.array_equal(r, results[0]) for r in results)


def test_embed_runs_off_the_event_loop(provider):
    """Other coroutines keep running while a batch is embedded."""
    async def main() -> int:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)  # the subject: a ticker that runs only while the loop is free
        task = asyncio.create_task(ticker())
        await provider.embed(["Budgets are reserved before the call. " * 30] * 64)
        task.cancel()
        return ticks
    assert asyncio.run(main()) > 5


def test_missing_model_files_are_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no ONNX model"):
        LocalEmbedProvider(DeploymentConfig(alias="e", provider="local_embed", path=str(tmp_path / "nope.onnx")), CTX)
    with pytest.raises(ConfigError, match="no ONNX model"):
        LocalEmbedProvider(DeploymentConfig(alias="e", provider="local_embed", path=str(tmp_path)), CTX)
    (tmp_path / "model.onnx").write_bytes(b"not a model")
    broken = LocalEmbedProvider(DeploymentConfig(alias="e", provider="local_embed", path=str(tmp_path)), CTX)
    with pytest.raises(ConfigError, match="cannot load"):
        broken.embed_sync(["hello"])


def test_path_may_name_a_directory_or_an_onnx_file(tmp_path):
    model, tokenizer = locate_model_files(None)
    (tmp_path / "model.onnx").symlink_to(model)
    (tmp_path / "tokenizer.json").symlink_to(tokenizer)
    for path in (tmp_path, tmp_path / "model.onnx"):
        p = LocalEmbedProvider(DeploymentConfig(alias="e", provider="local_embed", path=str(path)), CTX)
        assert p.tokenizer_file == tmp_path / "tokenizer.json"
        assert p.embed_sync(["hello"]).shape == (1, 384)


@pytest.mark.parametrize("options", [{"batch_size": 0}, {"batch_size": "32"}, {"max_length": 4096}])
def test_bad_options_are_a_config_error(options):
    with pytest.raises(ConfigError, match="options"):
        make(**options)
