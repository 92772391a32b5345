"""`local_rerank`: a cross-encoder reranker on ONNX Runtime + `tokenizers`, in process, offline.

No cross-encoder ships its weights inside a PyPI package today (the package lists were searched: the
candidates fetch their model from a hub at run time, or ship a pickled LightGBM model with no licence), so
no model is bundled: `path` names a directory holding `model.onnx` (a BERT-style sequence-classification
export such as `cross-encoder/ms-marco-MiniLM-L-6-v2`, Apache-2.0) and its `tokenizer.json`, or the
`.onnx` file itself with `tokenizer.json` beside it. Nothing is downloaded.

Each (query, document) pair is encoded as one `[CLS] query [SEP] document [SEP]` sequence truncated to
`options.max_length` word pieces (default 512, the document side first); the first logit is the score
(`options.activation: sigmoid` maps it to 0..1, as sentence-transformers does for one-label models).

Example:
    >>> p = LocalRerankProvider(DeploymentConfig(alias="rerank", provider="local_rerank", kind="rerank",
    ...     path="/models/ms-marco-MiniLM-L-6-v2"), ProviderContext(get_secret=lambda name: ""))
    >>> p.score_sync("what is python?", ["Python is a language.", "Snakes"])
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from keel.core.errors import ConfigError, NotSupported
from keel.core.settings import DeploymentConfig
from keel.gateway.protocol import ChatDelta, ChatRequest, ChatResult, EmbedResult, ProviderContext
from keel.gateway.reranking import RerankRequest, RerankResult

ACTIVATIONS = ("none", "sigmoid")


def locate(path: str | None) -> tuple[Path, Path]:
    """(model.onnx, tokenizer.json) from `path`: a directory holding both, or the .onnx file. A mistake is a
    ConfigError naming the field `path`."""
    if not path:
        raise ConfigError("path: local_rerank needs `path` (no reranker model is bundled)",
                          fix="set path to a directory with model.onnx and tokenizer.json of an ONNX cross-encoder "
                              "export, or use provider rerank_api for a remote reranker", field="path")
    p = Path(path).expanduser()
    if p.is_dir():
        onnx_files = sorted(p.glob("*.onnx")) + sorted(p.glob("onnx/*.onnx"))
        model = p / "model.onnx" if (p / "model.onnx").is_file() else (onnx_files[0] if onnx_files else None)
        tokenizer = p / "tokenizer.json"
    else:
        model = p if p.is_file() and p.suffix == ".onnx" else None
        tokenizer = p.with_name("tokenizer.json")
    if model is None:
        raise ConfigError(f"path: no ONNX model at {p}",
                          fix="set `path` to an .onnx file or a directory holding model.onnx", field="path")
    if not tokenizer.is_file():
        raise ConfigError(f"path: no tokenizer.json beside {model}",
                          fix="put the model's tokenizer.json next to it", field="path")
    return model, tokenizer


class LocalRerankProvider:
    """Scores (query, document) pairs with a BERT-style cross-encoder; deterministic, batch-independent.

    Inference runs in a worker thread, one batch at a time per provider, on at most `ctx.threads`
    (default: all cores) ONNX Runtime threads; pairs of similar length share a batch.
    """

    name: ClassVar[str] = "local_rerank"
    supports_tools: ClassVar[bool] = False
    supports_json_mode: ClassVar[bool] = False
    can_stream: ClassVar[bool] = False
    can_embed: ClassVar[bool] = False
    can_rerank: ClassVar[bool] = True

    def __init__(self, config: DeploymentConfig, ctx: ProviderContext) -> None:
        self.config = config
        self.deployment = config.deployment_id()
        self.model = config.model or "local-cross-encoder"
        try:
            self.check_options(config)
        except ConfigError as exc:
            raise ConfigError(f"deployment {self.deployment}: {exc.detail}", fix=exc.fix,
                              **{**exc.ids, "deployment": self.deployment}) from None
        self.batch_size = int(config.options.get("batch_size", 16))
        self.max_length = int(config.options.get("max_length", 512))
        self.sigmoid = config.options.get("activation", "none") == "sigmoid"
        self.threads = ctx.threads or os.cpu_count() or 1
        self.model_file, self.tokenizer_file = locate(config.path)
        self._tokenizer = Tokenizer.from_file(str(self.tokenizer_file))
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(self.max_length, strategy="only_second")
        self._session: ort.InferenceSession | None = None
        self._inputs: set[str] = set()
        self._load_lock = threading.Lock()
        self._run_lock = threading.Lock()

    @classmethod
    def check_options(cls, config: DeploymentConfig) -> None:
        """`path` holds an ONNX model and its tokenizer.json; `batch_size`, `max_length`, `activation` in range.
        (Whether the model loads is known at its first call, or at start with preload.)"""
        for key, default, low, high in (("batch_size", 16, 1, 1024), ("max_length", 512, 16, 4096)):
            value = config.options.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(f"options.{key}: {str(value)[:100]!r} is not an integer in {low}..{high}",
                                  fix=f"set options.{key}, or leave it out for {default}", field=f"options.{key}")
        activation = config.options.get("activation", "none")
        if activation not in ACTIVATIONS:
            raise ConfigError(f"options.activation: {str(activation)[:100]!r} is not one of {', '.join(ACTIVATIONS)}",
                              fix="use none (raw logits) or sigmoid", field="options.activation")
        locate(config.path)

    def load(self) -> ort.InferenceSession:
        """The ONNX Runtime session, created once on first use (or by the server's preload)."""
        with self._load_lock:
            if self._session is None:
                opts = ort.SessionOptions()
                opts.intra_op_num_threads = self.threads
                opts.inter_op_num_threads = 1
                opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
                try:
                    session = ort.InferenceSession(str(self.model_file), opts, providers=["CPUExecutionProvider"])
                except Exception as exc:  # ONNX Runtime's load errors have no public base class
                    raise ConfigError(f"deployment {self.deployment}: cannot load {self.model_file}: "
                                      f"{type(exc).__name__}: {str(exc)[:300]}",
                                      fix="point `path` at a valid ONNX cross-encoder", deployment=self.deployment
                                      ) from None
                inputs, output = {i.name for i in session.get_inputs()}, session.get_outputs()[0]
                if "input_ids" not in inputs or not inputs <= {"input_ids", "attention_mask", "token_type_ids"} \
                        or len(output.shape) != 2:
                    raise ConfigError(f"deployment {self.deployment}: {self.model_file} is not a BERT-style "
                                      f"cross-encoder (inputs {sorted(inputs)}, first output of rank {len(output.shape)})",
                                      fix="use an ONNX export whose first output is the logits, shape (batch, labels)",
                                      deployment=self.deployment)
                self._inputs, self._session = inputs, session
            return self._session

    def score_sync(self, query: str, documents: list[str]) -> tuple[list[float], int]:
        """One score per document (the given order) and the word pieces the model saw; blocking."""
        if not documents:
            return [], 0
        session = self.load()
        encodings = self._tokenizer.encode_batch([(query, d) for d in documents])
        lengths = [len(e.ids) for e in encodings]
        order = sorted(range(len(documents)), key=lambda i: lengths[i])
        out = np.empty(len(documents), np.float64)
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            ids = np.zeros((len(rows), max(lengths[i] for i in rows)), np.int64)
            mask, types = np.zeros_like(ids), np.zeros_like(ids)
            for r, i in enumerate(rows):
                e = encodings[i]
                ids[r, :lengths[i]] = e.ids
                mask[r, :lengths[i]] = 1
                types[r, :lengths[i]] = e.type_ids
            feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
            with self._run_lock:
                logits = session.run(None, {k: v for k, v in feeds.items() if k in self._inputs})[0]
            out[rows] = np.asarray(logits, np.float64)[:, 0]
        if self.sigmoid:
            out = 1.0 / (1.0 + np.exp(-out))
        return [float(s) for s in out], sum(lengths)

    async def rerank(self, req: RerankRequest) -> RerankResult:
        scores, tokens = await asyncio.to_thread(self.score_sync, req.query, req.documents)
        return RerankResult(scores=scores, tokens=tokens, model=self.model)

    def count_tokens(self, messages: list[dict[str, Any]]) -> int:
        texts = [m.get("content") if isinstance(m.get("content"), str) else "" for m in messages]
        return sum(len(e.ids) for e in self._tokenizer.encode_batch(texts)) if texts else 0

    async def embed(self, texts: list[str]) -> EmbedResult:
        raise self._not_this("embedding")

    async def chat(self, req: ChatRequest) -> ChatResult:
        raise self._not_this("chat")

    def stream(self, req: ChatRequest) -> AsyncIterator[ChatDelta]:
        raise self._not_this("chat")

    def _not_this(self, what: str) -> NotSupported:
        return NotSupported(f"deployment {self.deployment} is a reranker and cannot serve {what} requests",
                            fix="use this one with /v1/rerank", deployment=self.deployment)

    async def close(self) -> None:
        with self._load_lock:
            self._session = None
