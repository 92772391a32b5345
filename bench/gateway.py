"""Gateway throughput and added latency: direct vs a minimal proxy vs Keel vs the LiteLLM proxy.

One run, one machine, one upstream (a fast loopback OpenAI-compatible fake with fixed latency).
Load comes from `wrk` (C, so the load generator costs little CPU next to the servers). Added latency
at concurrency 1 is measured in rounds, each server round right after a round straight to the upstream,
and reported as the median over rounds of the difference (see `c1_rounds`).
Keel's Responses (`/v1/responses`) and Messages (`/v1/messages`) shapes are measured on the same Keel server
against its chat completions (`keel_shapes`, interleaved; `--no-shapes` skips them). `--otlp stages|calls`
adds Keel tracing every request at that detail and exporting it over OTLP to a loopback collector
(`--sample 0.1`: keeping that share of traces with the parent-based ratio sampler).
Prints ONE JSON line: {"direct": {...}, "minimal": {...}, "keel": {...}, "keel_shapes": {...}, "litellm": {...},
"ratios": {...}}.

    .venv/bin/python bench/gateway.py [--duration 10] [--no-litellm]

Needs `wrk` (Debian package) and, for the LiteLLM column, `make bench-litellm` (a separate venv
`.venv-litellm` with `litellm[proxy]`, so its dependencies never mix with Keel's).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
LITELLM = ROOT / ".venv-litellm" / "bin" / "litellm"
ADMIN = "sk-keel-benchbench000_" + "b" * 40
BODY = {"model": "bench", "messages": [{"role": "user", "content": "Say hello in five words."}], "max_tokens": 16}
# Keel's other API shapes, the same question (measured on the Keel server against its chat completions)
SHAPES = {
    "chat": ("/v1/chat/completions", BODY),
    "responses": ("/v1/responses", {"model": "bench", "input": "Say hello in five words.", "max_output_tokens": 16}),
    "messages": ("/v1/messages", {"model": "bench", "max_tokens": 16,
                                  "messages": [{"role": "user", "content": "Say hello in five words."}]}),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 120, headers: dict | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=2, headers=headers)
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


def rss_mb(pid: int) -> float:
    """Resident memory of a process and all its children."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
            todo += [int(c) for c in children]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return round(total / 1024, 1)


def cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system) used so far by a process and its children processes."""
    if pid is None:
        return 0.0
    total, todo, tick = 0.0, [pid], os.sysconf("SC_CLK_TCK")
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


LUA = """
wrk.method = "POST"
wrk.body = %s
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %s"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests":%%d,"duration_us":%%d,"p50_us":%%d,"p99_us":%%d,"errors":%%d,"non2xx":%%d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout, e.status))
end
"""


def wrk(url: str, token: str, body: dict, conc: int, duration: float, tmp: Path) -> dict:
    script = tmp / f"wrk-{conc}.lua"
    script.write_text(LUA % (json.dumps(json.dumps(body)), token))
    out = subprocess.run(["wrk", "-t1", f"-c{conc}", f"-d{max(1, int(duration))}s", "--timeout", "10s", "-s", str(script), url],
                         capture_output=True, text=True, check=True).stdout
    data = json.loads(out.split("WRKJSON ", 1)[1].splitlines()[0])
    secs = data["duration_us"] / 1e6
    return {"rps": round(data["requests"] / secs, 1), "p50_ms": data["p50_us"] / 1000, "p99_ms": data["p99_us"] / 1000,
            "errors": data["errors"] + data["non2xx"]}


def median(xs: list[float]) -> float:
    return round(statistics.median(xs), 3)


def c1_rounds(url: str, token: str, body: dict, direct: str, rounds: int, tmp: Path, seen: list[dict]) -> dict:
    """Concurrency 1 in `rounds` rounds of 2 s, each right after a round straight to the upstream: the
    added latency is taken within a round (the machine drifts over a run by more than the differences
    measured), then the median over rounds is reported. The direct rounds go to `seen` (`direct`'s own)."""
    own, added = [], []
    for _ in range(rounds):
        d = wrk(direct, "x", body, 1, 2, tmp)
        c1 = wrk(url, token, body, 1, 2, tmp)
        seen.append(d)
        own.append(c1)
        added.append((c1["p50_ms"] - d["p50_ms"], c1["p99_ms"] - d["p99_ms"]))
    return {"p50_ms_c1": median([r["p50_ms"] for r in own]), "p99_ms_c1": median([r["p99_ms"] for r in own]),
            "added_p50_ms_c1": median([a[0] for a in added]), "added_p99_ms_c1": median([a[1] for a in added]),
            "errors": sum(r["errors"] for r in own)}


def measure(name: str, url: str, token: str, duration: float, tmp: Path, pid: int | None, *, direct: str,
            rounds: int, seen: dict[str, list[dict]]) -> dict:
    res: dict = {}
    for stream in (False, True):
        key = "stream" if stream else "plain"
        body = {**BODY, "stream": stream}
        wrk(url, token, body, 10, 2, tmp)  # warm-up
        # direct's own concurrency-1 figures are its rounds interleaved with the servers' (see `main`)
        c1 = {"errors": 0} if url == direct else c1_rounds(url, token, body, direct, rounds, tmp,
                                                             seen.setdefault(key, []))
        before = cpu_s(pid)
        c50 = wrk(url, token, body, 50, duration, tmp)
        cpu_us = (cpu_s(pid) - before) / max(c50["rps"] * max(1, int(duration)), 1) * 1e6
        res[key] = {"rps_c50": c50["rps"], **c1, "cpu_us_per_req": round(cpu_us, 1),
                    "errors": c1["errors"] + c50["errors"]}
    out = dict(res["plain"])
    out["stream"] = res["stream"]
    out["rss_mb"] = rss_mb(pid) if pid else None
    print(f"# {name}: {json.dumps(out)}", file=sys.stderr)
    return out


def settle(pid: int, quiet_s: float = 0.25, deadline_s: float = 15.0) -> None:
    """Until the process's deferred work is done (the batched ledger and stored-response writes of the requests
    just served): its CPU over `quiet_s` below 5 % of a core, or `deadline_s` passed."""
    end = time.monotonic() + deadline_s
    last = cpu_s(pid)
    while time.monotonic() < end:
        time.sleep(quiet_s)
        now = cpu_s(pid)
        if now - last < 0.05 * quiet_s:
            return
        last = now


def shapes(url: str, token: str, duration: float, tmp: Path, pid: int) -> dict:
    """Throughput at c=50 of each API shape on one Keel server, plain and streamed, in the order
    chat, responses, messages, messages, responses, chat (each shape's two runs averaged, so a drift of the
    machine over the run falls on every shape alike); ratios against chat completions. Each run starts once the
    server has finished the previous run's deferred writes (`settle`), so no shape's throughput pays for another's
    batched writes; its CPU per request includes its own, up to the server settling after it."""
    runs: dict[str, dict[str, list[float]]] = {}
    order = [*SHAPES, *reversed(SHAPES)]
    for stream in (False, True):
        key = "stream" if stream else "plain"
        for name in order:
            path, body = SHAPES[name]
            body = {**body, "stream": stream}
            if name not in runs or key not in runs[name]:
                wrk(url + path, token, body, 10, 1, tmp)  # warm-up
            settle(pid)
            before = cpu_s(pid)
            r = wrk(url + path, token, body, 50, duration, tmp)
            settle(pid)
            if r["errors"]:
                print(f"# keel {name} ({key}): {r['errors']} errors", file=sys.stderr)
            cpu = (cpu_s(pid) - before) / max(r["rps"] * max(1, int(duration)), 1) * 1e6
            runs.setdefault(name, {}).setdefault(key, []).append(r["rps"])
            runs[name].setdefault(key + "_cpu", []).append(cpu)
    out = {name: {"rps_c50": round(statistics.mean(r["plain"]), 1), "stream_rps_c50": round(statistics.mean(r["stream"]), 1),
                  "cpu_us_per_req": round(statistics.mean(r["plain_cpu"]), 1)} for name, r in runs.items()}
    for name in SHAPES:
        if name != "chat":
            out[name]["vs_chat_rps_c50"] = round(out[name]["rps_c50"] / out["chat"]["rps_c50"], 3)
            out[name]["vs_chat_stream_rps_c50"] = round(out[name]["stream_rps_c50"] / out["chat"]["stream_rps_c50"], 3)
    print(f"# keel shapes: {json.dumps(out)}", file=sys.stderr)
    return out


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_keel(tmp: Path, upstream: str, extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str, str]:
    port = free_port()
    cfg = tmp / "keel.yaml"
    cfg.write_text(f"models:\n  - alias: bench\n    provider: openai_compatible\n    model: gpt-fake\n"
                   f"    base_url: {upstream}\n    input_price_per_1m: 0.15\n    output_price_per_1m: 0.6\n"
                   f"    rpm: 100000000\n    tpm: 100000000000\n")
    # Auth, budgets, rate limits and the ledger on; content guards off (bench/guards.py measures those).
    policy = tmp / "policy.yaml"
    policy.write_text("name: bench\nguards: {input: {}, output: {}, context: {}}\n")
    env = {**os.environ, "KEEL_DATA_DIR": str(tmp / "keel"), "KEEL_BOOTSTRAP_ADMIN_KEY": ADMIN,
           "KEEL_POLICY_FILE": str(policy),
           "KEEL_EMBEDDED_MODELS": "false", "KEEL_CONFIG": str(cfg), "KEEL_LOG_LEVEL": "warning", **(extra_env or {})}
    log = open(tmp / "keel.log", "wb")
    proc = subprocess.Popen([PY, "-m", "keel", "serve", "--port", str(port)], env=env, cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/healthz", timeout=60)
    except RuntimeError:
        sys.exit("keel did not start:\n" + (tmp / "keel.log").read_text()[-3000:])
    h = {"Authorization": f"Bearer {ADMIN}"}
    key = httpx.post(url + "/admin/keys", headers=h, json={"role": "member", "name": "bench"}).json()
    # Budgets and rate limits on for the bench key, high enough never to refuse.
    for path, body in ((f"/admin/limits/keys/{key['id']}", {"rpm": 100_000_000, "tpm": 100_000_000_000}),
                       ("/admin/budgets", {"scope": "key", "scope_id": key["id"], "amount": 1_000_000,
                                           "period": "month"})):
        r = httpx.request("PUT" if "limits" in path else "POST", url + path, headers=h, json=body)
        if r.status_code >= 300:
            print(f"# keel: could not configure {path}: {r.status_code} {r.text[:200]}", file=sys.stderr)
    return proc, url, key["key"]


def start_litellm(tmp: Path, upstream: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cfg = tmp / "litellm.yaml"
    cfg.write_text(f"model_list:\n  - model_name: bench\n    litellm_params:\n      model: openai/gpt-fake\n"
                   f"      api_base: {upstream}\n      api_key: fake\n"
                   "general_settings:\n  master_key: sk-bench\n")
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"}
    proc = subprocess.Popen([str(LITELLM), "--config", str(cfg), "--port", str(port), "--num_workers", "1"],
                            env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health/liveliness", timeout=300)
    return proc, url


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--latency-ms", type=float, default=20)
    ap.add_argument("--no-litellm", action="store_true")
    ap.add_argument("--otlp", choices=("stages", "calls"), default=None,
                    help="also Keel tracing every request at this detail, exported over OTLP to a loopback collector")
    ap.add_argument("--sample", type=float, default=None,
                    help="with --otlp: the share of traces kept (OTEL_TRACES_SAMPLER=parentbased_traceidratio), "
                         "every request when not given")
    ap.add_argument("--no-shapes", action="store_true", help="skip the Responses and Messages columns")
    ap.add_argument("--only", default="", help="comma list of servers to measure (direct is always run)")
    ap.add_argument("--rounds", type=int, default=4, help="concurrency-1 rounds of 2 s per server and mode")
    ap.add_argument("--ab", default="", help="NAME=A,B: an A/B of Keel under two values of the environment variable "
                    "NAME, measured in the order A B B A (each as `keel[NAME=value]`, its two figures kept apart)")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed: apt-get install -y wrk")
    tmp = Path(tempfile.mkdtemp(prefix="keel-bench-"))
    up_port = free_port()
    upstream = subprocess.Popen([PY, "-m", "tests.fakes.openai_upstream", "--port", str(up_port), "--latency-ms",
                                 str(args.latency_ms)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    up = f"http://127.0.0.1:{up_port}/v1"
    wait_http(f"http://127.0.0.1:{up_port}/_stats")
    results: dict = {}
    direct = up + "/chat/completions"
    seen: dict[str, list[dict]] = {}
    run = {"direct": direct, "rounds": args.rounds, "seen": seen}
    try:
        results["direct"] = measure("direct", direct, "x", args.duration, tmp, upstream.pid, **run)
        wanted = set(args.only.split(",")) if args.only else {"minimal", "keel", "litellm"}
        if "minimal" in wanted:
            port = free_port()
            proc = subprocess.Popen([PY, str(ROOT / "bench" / "minimal_proxy.py"), "--port", str(port),
                                     "--upstream", up], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_http(f"http://127.0.0.1:{port}/")
            results["minimal"] = measure("minimal", f"http://127.0.0.1:{port}/v1/chat/completions", "bench",
                                         args.duration, tmp, proc.pid, **run)
            stop(proc)
        if "keel" in wanted and args.ab:
            name, values = args.ab.split("=", 1)
            a, b = values.split(",")
            for i, value in enumerate((a, b, b, a)):
                proc, url, key = start_keel(tmp, up, {name: value})
                label = f"keel[{name}={value}]#{1 + (i in (2, 3))}"
                results[label] = measure(label, url + "/v1/chat/completions", key, args.duration, tmp, proc.pid, **run)
                stop(proc)
        elif "keel" in wanted:
            proc, url, key = start_keel(tmp, up)
            results["keel"] = measure("keel", url + "/v1/chat/completions", key, args.duration, tmp, proc.pid, **run)
            if not args.no_shapes:
                results["keel_shapes"] = shapes(url, key, args.duration / 2, tmp, proc.pid)
            stop(proc)
        if "keel" in wanted and args.otlp:
            # Every request traced and exported over OTLP/HTTP to a loopback collector (bench/otlp_sink.py).
            sink_port = free_port()
            sink = subprocess.Popen([PY, str(ROOT / "bench" / "otlp_sink.py"), "--port", str(sink_port)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_http(f"http://127.0.0.1:{sink_port}/stats")
            env = {"KEEL_TRACE_EXPORTER": "otlp", "KEEL_TRACE_DETAIL": args.otlp,
                   "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink_port}",
                   "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
            label = f"keel_otlp[{args.otlp}]"
            if args.sample is not None:
                env.update(OTEL_TRACES_SAMPLER="parentbased_traceidratio", OTEL_TRACES_SAMPLER_ARG=str(args.sample))
                label = f"keel_otlp[{args.otlp},{args.sample:g}]"
            proc, url, key = start_keel(tmp, up, env)
            results[label] = measure(label, url + "/v1/chat/completions", key, args.duration, tmp, proc.pid, **run)
            stop(proc)
            results[label]["collector"] = httpx.get(f"http://127.0.0.1:{sink_port}/stats").json()
            stop(sink)
        if "litellm" in wanted and not args.no_litellm and LITELLM.exists():
            proc, url = start_litellm(tmp, up)
            results["litellm"] = measure("litellm", url + "/v1/chat/completions", "sk-bench", args.duration, tmp,
                                         proc.pid, **run)
            stop(proc)
        for key in ("plain", "stream"):
            if not seen.get(key):  # no server measured: direct's rounds alone
                body = {**BODY, "stream": key == "stream"}
                seen[key] = [wrk(direct, "x", body, 1, 2, tmp) for _ in range(args.rounds)]
    finally:
        stop(upstream)
    d = results["direct"]
    for key, target in (("plain", d), ("stream", d["stream"])):
        target.update({"p50_ms_c1": median([r["p50_ms"] for r in seen[key]]),
                       "p99_ms_c1": median([r["p99_ms"] for r in seen[key]]),
                       "added_p50_ms_c1": 0.0, "added_p99_ms_c1": 0.0})
    ratios = {}
    for label in (k for k in results if k.startswith("keel[") and "minimal" in results):
        ratios[f"{label}_vs_minimal_rps_c50"] = round(results[label]["rps_c50"] / results["minimal"]["rps_c50"], 3)
    if "keel" in results and "minimal" in results:
        ratios["keel_vs_minimal_rps_c50"] = round(results["keel"]["rps_c50"] / results["minimal"]["rps_c50"], 3)
    if "keel" in results and "litellm" in results:
        k = results["keel"]
        ratios["keel_vs_litellm_rps_c50"] = round(k["rps_c50"] / max(results["litellm"]["rps_c50"], 0.1), 2)
    for label in (k for k in results if k.startswith("keel_otlp[") and "keel" in results):
        ratios[f"{label}_vs_keel_rps_c50"] = round(results[label]["rps_c50"] / results["keel"]["rps_c50"], 3)
    for name, shape in results.get("keel_shapes", {}).items():
        if name != "chat":
            ratios[f"keel_{name}_vs_chat_rps_c50"] = shape["vs_chat_rps_c50"]
            ratios[f"keel_{name}_vs_chat_stream_rps_c50"] = shape["vs_chat_stream_rps_c50"]
    results["ratios"] = ratios
    print(json.dumps(results))


if __name__ == "__main__":
    main()
