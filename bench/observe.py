"""What tracing and metrics cost the gateway: server CPU per chat request with tracing off vs OTLP export
to a loopback collector — every stage a span, only the calls, or 10% of traces sampled — the four
servers side by side, taking turns of `--batch` requests, on one machine and one upstream; and the
metrics' cost per ledger row.

CPU time of the Keel process per request (its OTLP export process reported apart), not wall-clock throughput: on a shared, busy machine it is
the steadier measure of what each request costs. Metrics are always on (both columns carry them), so
their share is measured on its own: `Metrics.observe_row` per row, against the traced-off CPU per request.
Prints ONE JSON line.

    .venv/bin/python bench/observe.py [--requests 1200] [--batch 100] [--rounds 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.gateway import ADMIN, free_port, stop, wait_http  # noqa: E402
from keel.observe.metrics import Metrics  # noqa: E402
from tests.observe.otlp_receiver import HttpReceiver  # noqa: E402

BODY = {"model": "bench", "messages": [{"role": "user", "content": "Say hello in five words."}], "max_tokens": 16}


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_s(pid: int) -> float:
    """CPU seconds of a process's live children (the OTLP export process), whichever thread started them."""
    total = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except FileNotFoundError:
            continue
        for child in children:
            try:
                total += cpu_s(int(child))
            except FileNotFoundError:
                continue
    return total


def start_keel(tmp: Path, upstream: str, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = tmp / "keel.yaml"
    cfg.write_text(f"models:\n  - alias: bench\n    provider: openai_compatible\n    model: gpt-fake\n"
                   f"    base_url: {upstream}\n")
    port = free_port()
    full = {**os.environ, "KEEL_DATA_DIR": str(tmp / "keel"), "KEEL_BOOTSTRAP_ADMIN_KEY": ADMIN,
            "KEEL_EMBEDDED_MODELS": "false", "KEEL_CONFIG": str(cfg), "KEEL_LOG_LEVEL": "warning",
            "KEEL_LOG_REQUESTS": "false", **env}
    proc = subprocess.Popen([sys.executable, "-m", "keel", "serve", "--port", str(port)], env=full, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/healthz")
    return proc, url


async def load(url: str, n: int, concurrency: int = 8) -> None:
    headers = {"Authorization": f"Bearer {ADMIN}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as client:
        todo = iter(range(n))

        async def worker() -> None:
            for _ in todo:
                r = await client.post("/v1/chat/completions", json=BODY)
                assert r.status_code == 200, r.text

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def measure(tmp: Path, upstream: str, modes: dict[str, dict[str, str]], n: int,
            batch: int) -> tuple[dict[str, float], dict[str, float]]:
    """Server CPU milliseconds per request for each mode: the serving process's, and its export process's
    apart (the one that serves requests is what limits throughput). The servers run side by side and take
    turns, `batch` requests each, so a busy machine weighs on every mode alike."""
    servers = {mode: start_keel(tmp / mode, upstream, env) for mode, env in modes.items()}
    try:
        for _, url in servers.values():
            asyncio.run(load(url, 200))  # warm-up
        cpu, export = dict.fromkeys(servers, 0.0), dict.fromkeys(servers, 0.0)
        for _ in range(max(1, n // batch)):
            for mode, (proc, url) in servers.items():
                before, before_export = cpu_s(proc.pid), children_cpu_s(proc.pid)
                asyncio.run(load(url, batch))
                cpu[mode] += cpu_s(proc.pid) - before
                export[mode] += children_cpu_s(proc.pid) - before_export
        per = 1000 / (max(1, n // batch) * batch)
        return {m: c * per for m, c in cpu.items()}, {m: c * per for m, c in export.items()}
    finally:
        for proc, _ in servers.values():
            stop(proc)


def metrics_us_per_row(n: int = 200_000) -> float:
    m = Metrics()
    rows = [{"kind": "chat", "alias": f"a{i % 4}", "deployment": f"a{i % 4}/p/m", "team_id": f"t{i % 3}",
             "status": "ok", "tokens_in": 12, "tokens_out": 5, "cost": 1e-5, "latency_ms": 3.2, "ttft_ms": None,
             "cache_hit": False, "error_code": None, "meta": None} for i in range(64)]
    t = time.perf_counter()
    for i in range(n):
        m.observe_row(rows[i & 63])
    return (time.perf_counter() - t) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=1200)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--batch", type=int, default=100, help="requests per turn; the servers take turns")
    args = ap.parse_args()
    up_port = free_port()
    upstream = subprocess.Popen([sys.executable, "-m", "tests.fakes.openai_upstream", "--port", str(up_port),
                                 "--latency-ms", "2"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    receiver = HttpReceiver().start()
    otlp = {"KEEL_TRACE_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url}
    modes = {"off": {"KEEL_TRACE_EXPORTER": "none"},
             "otlp_stages": otlp,  # the default detail, every request sampled
             "otlp_calls": {**otlp, "KEEL_TRACE_DETAIL": "calls"},
             "otlp_stages_10pct": {**otlp, "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                                   "OTEL_TRACES_SAMPLER_ARG": "0.1"}}
    results: dict[str, list[float]] = {m: [] for m in modes}
    exports: dict[str, list[float]] = {m: [] for m in modes}
    try:
        wait_http(f"http://127.0.0.1:{up_port}/v1/models")
        with tempfile.TemporaryDirectory() as d:
            for r in range(args.rounds):
                got, exported = measure(Path(d) / f"r{r}", f"http://127.0.0.1:{up_port}/v1", modes, args.requests,
                                        args.batch)
                for mode, v in got.items():
                    results[mode].append(v)
                    exports[mode].append(exported[mode])
    finally:
        stop(upstream)
        receiver.stop()
    best = {k: sum(vs) / len(vs) for k, vs in results.items()}
    off = best["off"]
    metrics_us = metrics_us_per_row()
    print(json.dumps({
        "cpu_ms_per_request": {k: round(v, 3) for k, v in best.items()},
        "rounds": {k: [round(v, 3) for v in vs] for k, vs in results.items()},
        "cpu_ratio_to_off": {k: round(v / off, 3) for k, v in best.items() if k != "off"},
        "export_process_cpu_ms_per_request": {k: round(sum(v) / len(v), 3) for k, v in exports.items()},
        "spans_received": len(receiver.spans),
        "metrics_us_per_row": round(metrics_us, 2),
        "metrics_share_of_request_cpu": round(metrics_us / 1000 / off, 4),
        "requests_per_round": args.requests,
    }))


if __name__ == "__main__":
    main()
