"""CPU per request of each API shape through the whole app, in this process: chat completions, Responses
(stored, the default; `--shapes` adds `responses_nostore`, i.e. `store: false`) and Messages, plain and
streamed, driven as ASGI calls straight into Keel's app (no HTTP server, no load generator) against a
loopback fake upstream in another process.

The figure is this process's CPU time (every thread: the ledger's and the response store's writers
included) per request over `--rounds` rounds, each shape taking its turn for `--requests` requests at
concurrency `--concurrency` in every round (in the reverse order every other round), so a machine whose
load drifts weighs on every shape alike: on a shared machine it moves far less than req/s does (still ±5 %
when the machine is loaded: compare runs made back to back). Each turn ends by writing out the ledger's and
the response store's batches, so a shape's deferred writes are billed to it, not to the shape after it.
Prints ONE JSON line with each shape's µs per request and its ratio to chat completions (plain, or
streamed for the `_stream` shapes): `vs_chat` over all rounds, `vs_chat_median` the median of the rounds'
ratios (a round that a neighbour's burst hit counts once).

    .venv/bin/python bench/ingress_cpu.py [--requests 200] [--rounds 20] [--concurrency 32] [--shapes ...]

About 60 s with the defaults. Same Keel set-up as `bench/gateway.py` (auth, budgets, rate limits and the
ledger on; content guards off; SQLite under a temporary data dir).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.gateway import ADMIN, PY, ROOT, SHAPES, free_port, stop, wait_http  # noqa: E402


def configure(tmp: Path, upstream: str) -> None:
    """`bench/gateway.py`'s Keel: its keel.yaml, policy and environment."""
    cfg = tmp / "keel.yaml"
    cfg.write_text(f"models:\n  - alias: bench\n    provider: openai_compatible\n    model: gpt-fake\n"
                   f"    base_url: {upstream}\n    input_price_per_1m: 0.15\n    output_price_per_1m: 0.6\n"
                   f"    rpm: 100000000\n    tpm: 100000000000\n")
    policy = tmp / "policy.yaml"
    policy.write_text("name: bench\nguards: {input: {}, output: {}, context: {}}\n")
    os.environ.update({"KEEL_DATA_DIR": str(tmp / "keel"), "KEEL_BOOTSTRAP_ADMIN_KEY": ADMIN,
                       "KEEL_POLICY_FILE": str(policy), "KEEL_EMBEDDED_MODELS": "false", "KEEL_CONFIG": str(cfg),
                       "KEEL_LOG_LEVEL": "warning"})


class Driver:
    """ASGI calls into `asgi`: a lifespan task, and one request at a time per `call`."""

    def __init__(self, asgi: Any) -> None:
        self.asgi = asgi
        self._life_in: asyncio.Queue[dict] = asyncio.Queue()
        self._life_out: asyncio.Queue[dict] = asyncio.Queue()
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        self._task = asyncio.create_task(self.asgi(scope, self._life_in.get, self._life_out.put))
        await self._life_in.put({"type": "lifespan.startup"})
        msg = await self._life_out.get()
        if msg["type"] != "lifespan.startup.complete":
            raise SystemExit(f"keel did not start: {msg}")

    async def stop(self) -> None:
        await self._life_in.put({"type": "lifespan.shutdown"})
        await self._life_out.get()
        assert self._task is not None
        await self._task

    async def call(self, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes) -> tuple[int, bytes]:
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
                 "root_path": "", "headers": headers, "client": ("127.0.0.1", 50000),
                 "server": ("127.0.0.1", 8080), "state": {}}
        sent = False
        status, chunks = 0, []

        async def receive() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # the client stays connected
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.asgi(scope, receive, send)
        return status, b"".join(chunks)


def headers(token: str, n: int) -> list[tuple[bytes, bytes]]:
    return [(b"host", b"keel"), (b"authorization", b"Bearer " + token.encode()),
            (b"content-type", b"application/json"), (b"content-length", str(n).encode())]


async def run(args: argparse.Namespace, upstream: str, tmp: Path) -> dict:
    configure(tmp, upstream)
    from keel.app import create_app
    from keel.core.logs import configure_logging
    from keel.core.server import GIL_SWITCH_INTERVAL_S, settle_heap
    from keel.core.settings import load_settings

    settings, _ = load_settings()
    configure_logging(settings.log_level)  # as `keel serve`: warnings only, the switch interval, the heap
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    built = create_app(settings)
    state = built.app.state
    drv = Driver(built.asgi)
    await drv.start()
    try:
        admin = headers(ADMIN, 0)
        body = orjson.dumps({"role": "member", "name": "bench"})
        status, out = await drv.call("POST", "/admin/keys", headers(ADMIN, len(body)), body)
        assert status < 300, out
        key = orjson.loads(out)
        for method, path, b in (("PUT", f"/admin/limits/keys/{key['id']}", {"rpm": 100_000_000, "tpm": 100_000_000_000}),
                                ("POST", "/admin/budgets", {"scope": "key", "scope_id": key["id"], "amount": 1_000_000,
                                                            "period": "month"})):
            raw = orjson.dumps(b)
            status, out = await drv.call(method, path, admin[:2] + headers(ADMIN, len(raw))[2:], raw)
            assert status < 300, (path, out)
        shapes = {**SHAPES, "responses_nostore": (SHAPES["responses"][0], {**SHAPES["responses"][1], "store": False})}
        cases = {}
        for stream in (False, True):
            for name in args.shapes.split(","):
                path, b = shapes[name]
                raw = orjson.dumps({**b, "stream": stream})
                cases[name + ("_stream" if stream else "")] = (path, headers(key["key"], len(raw)), raw)

        async def burst(path: str, h: list, raw: bytes, n: int) -> None:
            left = n

            async def worker() -> None:
                nonlocal left
                while left > 0:
                    left -= 1
                    status, out = await drv.call("POST", path, h, raw)
                    if status != 200:
                        raise SystemExit(f"{path}: {status} {out[:300]!r}")

            await asyncio.gather(*(worker() for _ in range(args.concurrency)))
            await state.observe.ledger.flush()  # this turn's deferred writes, in its own time
            await state.responses.flush()

        for path, h, raw in cases.values():
            await burst(path, h, raw, 200)  # warm-up
        settle_heap()
        spent: dict[str, float] = dict.fromkeys(cases, 0.0)
        ratios: dict[str, list[float]] = {name: [] for name in cases if not name.startswith("chat")}
        for i in range(args.rounds):
            turn: dict[str, float] = {}
            for name in (list(cases) if i % 2 == 0 else list(reversed(cases))):
                path, h, raw = cases[name]
                t = time.process_time()
                await burst(path, h, raw, args.requests)
                turn[name] = time.process_time() - t
                spent[name] += turn[name]
            for name in ratios:
                ratios[name].append(turn[name] / turn["chat_stream" if name.endswith("_stream") else "chat"])
        per_req = {name: cpu / (args.rounds * args.requests) * 1e6 for name, cpu in spent.items()}
    finally:
        await drv.stop()
    out: dict[str, Any] = {"cpu_us_per_req": {k: round(v, 1) for k, v in per_req.items()}}
    out["vs_chat"] = {k: round(v / per_req["chat_stream" if k.endswith("_stream") else "chat"], 3)
                      for k, v in per_req.items() if not k.startswith("chat")}
    out["vs_chat_median"] = {k: round(statistics.median(v), 3) for k, v in ratios.items()}
    out.update(requests=args.requests, rounds=args.rounds, concurrency=args.concurrency)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--latency-ms", type=float, default=0)
    ap.add_argument("--shapes", default="chat,responses,messages",
                    help="of chat, responses, responses_nostore (`store: false`), messages; chat first")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="keel-ingress-cpu-"))
    port = free_port()
    upstream = subprocess.Popen([PY, "-m", "tests.fakes.openai_upstream", "--port", str(port), "--latency-ms",
                                 str(args.latency_ms)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/_stats")
        import uvloop
        print(json.dumps(uvloop.run(run(args, f"http://127.0.0.1:{port}/v1", tmp))))
    finally:
        stop(upstream)


if __name__ == "__main__":
    main()
