"""Soak: minutes of mixed traffic against one real `keel serve`, and whether its memory stays flat.

A fresh SQLite store, the bundled embedding model (ONNX Runtime) for ingestion, search and `/v1/embeddings`,
and a loopback fake OpenAI upstream (`tests/fakes`, 5 ms) behind the chat alias, so the chat traffic measures
Keel rather than a model. First `--ingest N` documents (pieces of Debian's python3.11-doc reST tree, ~2 KB
each) go in through the upload API and are waited for; then `--concurrency` clients loop over a mix of chat
completions, streamed chats read to the end, streams cut after the first event (the client drops the
connection), embeddings, hybrid searches and workflow starts, for `--minutes`.

The server's RSS (its process and any children) is sampled every 5 s. Growth after warm-up compares the
median of the last three samples with the median of the three at the end of warm-up (the first fifth of the
run, at least 30 s). Target: growth <= 5 %, no errors (a cut stream is not an error).

Prints one JSON line.
    .venv/bin/python bench/soak.py [--minutes 10] [--ingest 200] [--concurrency 6] [--server-env K=V ...]
(`--server-env MALLOC_MMAP_THRESHOLD_=131072` etc. set the server's environment and `--embed-options` the
embedder's deployment options, for A/B runs of memory settings.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parent.parent
ADMIN = "sk-keel-soaksoak0000_" + "s" * 40
SOURCES = Path("/usr/share/doc/python3.11/html/_sources")
TARGET_GROWTH_PCT = 5.0
MIX = {"chat": 30, "stream": 15, "cut": 10, "embed": 15, "search": 25, "workflow": 5}
WORKFLOW = """\
name: soak_flow
inputs: {type: object, properties: {n: {type: integer}}}
steps:
  - id: shape
    type: transform
    output: "item {{ inputs.n }}"
"""
QUERIES = ["how do I read a file", "what is a decorator", "exceptions and tracebacks", "unicode strings",
           "list comprehension", "import a module", "threads and the GIL", "dictionary ordering"]


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    sys.exit(f"{url} did not answer in {timeout}s")


def pieces(n: int, size: int = 2000) -> list[tuple[str, bytes]]:
    """`n` documents of about `size` characters, cut at blank lines from the reST tree."""
    if not SOURCES.is_dir():
        sys.exit("no python3.11-doc sources: apt-get update && apt-get install -y python3.11-doc")
    out: list[tuple[str, bytes]] = []
    for p in sorted(SOURCES.rglob("*.txt")):
        buf: list[str] = []
        for para in p.read_text(errors="replace").split("\n\n"):
            buf.append(para)
            if sum(map(len, buf)) >= size:
                out.append((f"{p.stem}-{len(out)}.txt", "\n\n".join(buf).encode()))
                buf = []
                if len(out) >= n:
                    return out
    return out


def rss_mb(pid: int) -> float:
    try:
        proc = psutil.Process(pid)
        return (proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))) / 2**20
    except psutil.Error:
        return float("nan")


class Run:
    def __init__(self, url: str) -> None:
        self.url = url
        self.counts = {k: 0 for k in MIX}
        self.errors: dict[str, int] = {}
        self.first_errors: list[str] = []
        self.headers = {"Authorization": f"Bearer {ADMIN}"}

    def fail(self, kind: str, what: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        if len(self.first_errors) < 5:
            self.first_errors.append(f"{kind}: {what[:200]}")

    async def one(self, s: aiohttp.ClientSession, kind: str, i: int) -> None:
        chat = {"model": "soak-chat", "messages": [{"role": "user", "content": f"Say hello number {i}"}],
                "max_tokens": 32}
        if kind == "chat":
            async with s.post(self.url + "/v1/chat/completions", json=chat, headers=self.headers) as r:
                body = await r.read()
                ok = r.status == 200
        elif kind in ("stream", "cut"):
            async with s.post(self.url + "/v1/chat/completions", json={**chat, "stream": True},
                              headers=self.headers) as r:
                ok = r.status == 200
                if kind == "cut":
                    await r.content.readline()
                    r.close()  # drop the connection mid-stream, as a client that went away
                    body = b""
                else:
                    body = await r.read()
                    ok = ok and b"[DONE]" in body
        elif kind == "embed":
            async with s.post(self.url + "/v1/embeddings", headers=self.headers,
                              json={"model": "soak-embed", "input": [f"soak text {i}", random.choice(QUERIES)]}) as r:
                body = await r.read()
                ok = r.status == 200
        elif kind == "search":
            async with s.post(self.url + "/v1/search", headers=self.headers,
                              json={"query": random.choice(QUERIES), "collections": ["soak"], "top_k": 5}) as r:
                body = await r.read()
                ok = r.status == 200
        else:
            async with s.post(self.url + "/v1/workflows/soak_flow/runs", headers=self.headers,
                              json={"inputs": {"n": i}}) as r:
                body = await r.read()
                ok = r.status == 201
        if ok:
            self.counts[kind] += 1
        else:
            self.fail(kind, f"{r.status} {body[:200]!r}")

    async def client(self, deadline: float, seed: int) -> None:
        rnd = random.Random(seed)
        kinds, weights = list(MIX), list(MIX.values())
        i = 0
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
            while time.monotonic() < deadline:
                kind = rnd.choices(kinds, weights)[0]
                i += 1
                try:
                    await self.one(s, kind, seed * 1_000_000 + i)
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    self.fail(kind, repr(exc))


async def prepare(url: str, n: int) -> float:
    """The collection (with `n` documents, waited for) and the workflow; returns ingest seconds."""
    h = {"Authorization": f"Bearer {ADMIN}"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as s:
        async with s.post(url + "/v1/collections", headers=h, json={"name": "soak", "classification": "internal",
                                                                    "embedding_model": "soak-embed"}) as r:
            assert r.status == 201, await r.text()
        async with s.post(url + "/v1/workflows", headers=h, json={"spec": WORKFLOW}) as r:
            assert r.status in (200, 201), await r.text()
        t0 = time.monotonic()
        docs = pieces(n)
        for start in range(0, len(docs), 50):
            form = aiohttp.FormData()
            for name, data in docs[start:start + 50]:
                form.add_field("files", data, filename=name, content_type="text/plain")
            async with s.post(url + "/v1/collections/soak/documents?wait=300", headers=h, data=form) as r:
                job = await r.json()
                assert r.status == 200 and job["status"] == "succeeded", job
        return time.monotonic() - t0


async def drive(url: str, pid: int, args: argparse.Namespace) -> dict[str, Any]:
    run = Run(url)
    duration = args.minutes * 60
    warm = max(30.0, duration / 5)
    start = time.monotonic()
    deadline = start + duration
    clients = [asyncio.create_task(run.client(deadline, k + 1)) for k in range(args.concurrency)]
    samples: list[tuple[float, float]] = []
    while time.monotonic() < deadline:
        samples.append((time.monotonic() - start, rss_mb(pid)))
        await asyncio.sleep(5)
    await asyncio.gather(*clients)
    samples.append((time.monotonic() - start, rss_mb(pid)))
    at_warm = [m for t, m in samples if t <= warm][-3:]
    last = [m for _, m in samples][-3:]
    warm_mb, end_mb = statistics.median(at_warm), statistics.median(last)
    total = sum(run.counts.values())
    return {"requests": run.counts, "errors": run.errors, "first_errors": run.first_errors,
            "rps": round(total / duration, 1), "warmup_s": warm,
            "rss_mb": {"warm": round(warm_mb), "end": round(end_mb), "max": round(max(m for _, m in samples))},
            "rss_growth_after_warmup_pct": round(100 * (end_mb - warm_mb) / warm_mb, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--ingest", type=int, default=200, help="documents ingested before the traffic")
    ap.add_argument("--concurrency", type=int, default=6)
    ap.add_argument("--server-env", action="append", default=[], metavar="K=V")
    ap.add_argument("--embed-options", default="{}", help="the bundled embedder's deployment options (JSON), "
                    'e.g. \'{"cpu_mem_arena": true}\' for the ONNX Runtime arena')
    args = ap.parse_args()
    extra = dict(kv.split("=", 1) for kv in args.server_env)
    base = Path(tempfile.mkdtemp(prefix="keel-soak-"))
    up_port, port = free_port(), free_port()
    upstream = subprocess.Popen([sys.executable, "-m", "tests.fakes.openai_upstream", "--port", str(up_port),
                                 "--latency-ms", "5"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cfg = base / "keel.yaml"
    cfg.write_text(f"models:\n  - {{alias: soak-chat, provider: openai_compatible, model: fake, "
                   f"base_url: 'http://127.0.0.1:{up_port}/v1'}}\n"
                   f"  - {{alias: soak-embed, provider: local_embed, kind: embedding, options: {args.embed_options}}}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEEL_")}
    env.update({"KEEL_DATA_DIR": str(base / "data"), "KEEL_BOOTSTRAP_ADMIN_KEY": ADMIN, "KEEL_LOG_REQUESTS": "false",
                "KEEL_MASTER_KEY": "soak-master-key", "KEEL_WORKFLOWS_DIR": str(base / "none"), "KEEL_EMBEDDED_MODELS": "false", **extra})
    log = open(base / "server.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "keel", "serve", "--port", str(port), "--config", str(cfg)],
                              cwd=base, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"http://127.0.0.1:{up_port}/v1/models", upstream)
        wait_http(url + "/healthz", server)
        rss_start = rss_mb(server.pid)
        say(f"server up ({rss_start:.0f} MB); ingesting {args.ingest} documents")
        ingest_s = asyncio.run(prepare(url, args.ingest))
        rss_ingest = rss_mb(server.pid)
        say(f"ingested in {ingest_s:.0f}s ({rss_ingest:.0f} MB); {args.minutes} min of traffic")
        out = asyncio.run(drive(url, server.pid, args))
    finally:
        server.send_signal(signal.SIGTERM)
        upstream.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        upstream.wait(10)
    out["rss_mb"] = {"start": round(rss_start), "after_ingest": round(rss_ingest), **out["rss_mb"]}
    ok = not out["errors"] and out["rss_growth_after_warmup_pct"] <= TARGET_GROWTH_PCT
    print(json.dumps({"bench": "soak", "minutes": args.minutes, "ingested_docs": args.ingest,
                      "ingest_s": round(ingest_s, 1), "concurrency": args.concurrency, "server_env": extra,
                      "embed_options": json.loads(args.embed_options), **out,
                      "target_growth_pct": TARGET_GROWTH_PCT, "ok": ok}))


if __name__ == "__main__":
    main()
