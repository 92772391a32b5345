"""Tokens/s and time to first token (TTFT) of the bundled chat model, streamed through Keel's HTTP
server with the official `openai` client, against llama.cpp called directly in the same run.

Same prompts, same max_tokens, temperature 0, a warm-up first. The two sides take turns answer by
answer (never generating at the same time), so machine noise hits both alike; medians are reported.
Prints one JSON line; `ratio_tokens_per_s` is keel/direct (target >= 0.9).
Run: `.venv/bin/python bench/local_model.py` (KEEL_LOCAL_THREADS sets llama.cpp's threads on both sides).
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import llama_cpp
import openai

from keel.gateway.providers.local_llama import bundled_model_path

PROMPTS = [
    "Explain how a bicycle works.",
    "Write a short poem about the sea.",
    "List five uses of a paperclip and explain each.",
]
MAX_TOKENS = 128
ADMIN_KEY = "sk-keel-benchbench00_" + "b" * 40  # sk-keel-<12 chars>_<20+ chars>

ROUNDS = 3  # each round streams every prompt once directly and once through Keel, alternating

# A stream function takes a prompt and yields (text piece, completion tokens if known) as they arrive.
StreamFn = Callable[[str], Iterator[tuple[str, int | None]]]


def measure(stream: StreamFn, prompt: str) -> dict:
    """Stream one answer: TTFT, tokens, and tokens/s after the first token."""
    t0 = time.perf_counter()
    first, pieces, usage = None, [], None
    for piece, n in stream(prompt):
        if n is not None:
            usage = n
        if piece:
            first = first or time.perf_counter()
            pieces.append(piece)
    end = time.perf_counter()
    tokens = usage if usage is not None else len(pieces)
    return {"ttft": first - t0, "tokens": tokens, "tps": (tokens - 1) / (end - first), "text": "".join(pieces)}


def summary(runs: list[dict]) -> dict:
    return {"tokens_per_s": round(statistics.median(r["tps"] for r in runs), 1),
            "ttft_ms": round(1000 * statistics.median(r["ttft"] for r in runs), 1),
            "tokens": sum(r["tokens"] for r in runs)}


def direct_stream(llm: llama_cpp.Llama) -> StreamFn:
    def stream(prompt: str) -> Iterator[tuple[str, int | None]]:
        for chunk in llm.create_chat_completion(messages=[{"role": "user", "content": prompt}], stream=True,
                                                max_tokens=MAX_TOKENS, temperature=0):
            yield chunk["choices"][0]["delta"].get("content") or "", None
    return stream


def keel_stream(client: openai.OpenAI) -> StreamFn:
    def stream(prompt: str) -> Iterator[tuple[str, int | None]]:
        for chunk in client.chat.completions.create(
                model="local-chat", messages=[{"role": "user", "content": prompt}], stream=True,
                max_tokens=MAX_TOKENS, temperature=0, stream_options={"include_usage": True}):
            piece = chunk.choices[0].delta.content if chunk.choices else None
            yield piece or "", chunk.usage.completion_tokens if chunk.usage else None
    return stream


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_keel(data_dir: Path, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEEL_")}
    env.update(KEEL_DATA_DIR=str(data_dir), KEEL_BOOTSTRAP_ADMIN_KEY=ADMIN_KEY, KEEL_EMBEDDED_MODELS="true",
               KEEL_LOCAL_THREADS=str(threads))
    log = open(data_dir / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "keel", "serve", "--port", str(port)], stdout=log,
                            stderr=subprocess.STDOUT, env=env, cwd=str(data_dir))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=1) as resp:
                if resp.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    sys.exit(f"keel did not start:\n{(data_dir / 'server.log').read_text(errors='replace')[-3000:]}")


def main() -> None:
    # llama.cpp threads, the same on both sides: KEEL_LOCAL_THREADS when set, else Keel's default (half the cores)
    threads = int(os.environ.get("KEEL_LOCAL_THREADS") or 0) or max(1, (os.cpu_count() or 2) // 2)
    with tempfile.TemporaryDirectory(prefix="keel-bench-") as tmp:
        proc, url = start_keel(Path(tmp), threads)
        try:
            client = openai.OpenAI(base_url=url + "/v1", api_key=ADMIN_KEY, max_retries=0, timeout=300)
            via_keel = keel_stream(client)
            llm = llama_cpp.Llama(model_path=str(bundled_model_path()), n_ctx=8192, n_threads=threads,
                                  n_threads_batch=threads, verbose=False)
            direct = direct_stream(llm)
            for prompt in PROMPTS[:1]:  # warm-up: loads Keel's model, fills caches on both sides
                measure(direct, prompt), measure(via_keel, prompt)
            runs: dict[str, list[dict]] = {"direct": [], "keel": []}
            for _ in range(ROUNDS):  # alternate, so machine noise hits both sides alike
                for prompt in PROMPTS:
                    runs["direct"].append(measure(direct, prompt))
                    runs["keel"].append(measure(via_keel, prompt))
        finally:
            proc.terminate()
            proc.wait(30)
    d, k = summary(runs["direct"]), summary(runs["keel"])
    print(json.dumps({
        "bench": "local_model", "model": bundled_model_path().name, "threads": threads, "max_tokens": MAX_TOKENS,
        "answers_per_side": len(runs["keel"]),
        "direct_tokens_per_s": d["tokens_per_s"], "keel_tokens_per_s": k["tokens_per_s"],
        "ratio_tokens_per_s": round(k["tokens_per_s"] / d["tokens_per_s"], 3),
        "direct_ttft_ms": d["ttft_ms"], "keel_ttft_ms": k["ttft_ms"],
        "tokens": {"direct": d["tokens"], "keel": k["tokens"]},
        "same_text": sum(a["text"] == b["text"] for a, b in zip(runs["direct"], runs["keel"])),
    }))


if __name__ == "__main__":
    main()
