"""Agents: Keel's per-step overhead against calling the same scripted model and tool directly, in one run.

A loopback OpenAI-compatible upstream (a subprocess: `python bench/agents.py --upstream --port P`) plays a
model that asks for the trivial `record` tool N times (turn i = the number of assistant messages so far,
N read from the task) and then answers. Measured, alternating run by run after one warm-up each:

(a) Keel: a real `keel serve` on a fresh SQLite store runs the agent (`record` into one table) through
    `POST /v1/agents/bench_agent/runs` with `wait_s`; the run's wall time as the caller sees it.
(b) Direct: a loop in this process that posts the same chat completions to the same upstream with aiohttp
    (one keep-alive session), runs the tool inline (appends the row to a list) and sends its result back.
(c) The direct loop again, its model calls through Keel's `/v1/chat/completions` (admin key): roughly how much
    of the overhead is the governed model call, and how much the agent layer around it (`agent_layer_step_p50_ms`,
    Keel's step less this one; approximate, as the agent's prompts are not byte for byte the loop's). A gateway
    call scans the whole conversation, so this share grows with N.

A step is one model call and the tool call it asked for (the final answer's call and the run's start are
spread over the N steps). Per run: wall time / N; reported: p50 over the runs for both, and Keel's overhead
per step (the difference of the p50s; target <= 10 ms on SQLite). CPU time per step beside it (the machine may be
shared, and wall time then measures the neighbours too): Keel's is the `keel serve` process's (all its threads,
from /proc), the direct loop's this process's; `overhead_cpu_step_p50_ms` is their difference. Keel's step includes what the agent layer
adds by design: the governed gateway path (policy, guards, budgets, ledger), the mandate's checks, the
durable checkpoints of each model and tool call, the action log and the tool output's context guards.
`load_1m`: the machine's 1-minute load average before and after the run.

Prints one JSON line.
    .venv/bin/python bench/agents.py [--steps 20] [--runs 7]

`--trees new=.,old=/tmp/old` compares Keel of source trees instead (e.g. this checkout against a `git archive`
export of an earlier commit): a server per tree, up together on the same upstream, the same agent run on each in
turn (A B B A …), per tree the p50 of wall and CPU ms per step. The host's speed drifts over minutes by more than a
change moves it; interleaved runs share the drift, where one whole bench run after another does not.
"""

from __future__ import annotations

import argparse
import asyncio
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
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PY = sys.executable
ADMIN = "sk-keel-benchbench000_" + "a" * 40
TARGET_STEP_OVERHEAD_MS = 10
AGENT = "bench_agent"
MANDATE = f"""\
name: {AGENT}
model: bench-model
goal: Record each item you are told to record, then say done.
tools:
  record: {{tables: [bench]}}
budgets: {{steps: 1000, tokens: 100000000}}
"""
RECORD_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["table", "data"],
                 "properties": {"table": {"type": "string"}, "data": {"type": "object"}, "key": {"type": "string"}}}


def say(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def task(steps: int, k: int) -> str:
    return f"Record {steps} items, one call each (run {k}). steps={steps}"


# -- the scripted upstream (runs in its own process) -------------------------------------------------------
def serve_upstream(argv: list[str]) -> None:
    from tests.fakes.openai_upstream import FakeOpenAI

    class StepModel(FakeOpenAI):
        """Asks for `record` until the conversation holds N assistant turns (N from `steps=N` in the task)."""

        def answer(self, body: dict[str, Any]) -> tuple[list[str], dict[str, Any] | None, str]:
            messages = body["messages"]
            text = next((m.get("content") or "" for m in messages if m.get("role") == "user"), "")
            n = int(text.rsplit("steps=", 1)[1]) if "steps=" in text else 0
            turn = sum(1 for m in messages if m.get("role") == "assistant")
            if turn >= n:
                return ["done"], None, "stop"
            args = json.dumps({"table": "bench", "data": {"item": turn}})
            return [], {"id": f"call_{turn}", "type": "function",
                        "function": {"name": "record", "arguments": args}}, "tool_calls"

    StepModel.main(argv)


# -- (b) the direct loop ----------------------------------------------------------------------------------
async def direct_run(session: Any, url: str, steps: int, k: int, model: str = "m",
                     headers: dict[str, str] | None = None) -> float:
    """One agent run without Keel's agent layer: model call, tool inline, result back, until the model answers."""
    rows: list[dict[str, Any]] = []
    messages: list[dict[str, Any]] = [{"role": "system", "content": "Record each item, then say done."},
                                      {"role": "user", "content": task(steps, k)}]
    tools = [{"type": "function", "function": {"name": "record", "description": "Write a row.",
                                               "parameters": RECORD_SCHEMA}}]
    t0 = time.perf_counter()
    while True:
        async with session.post(url, json={"model": model, "messages": messages, "tools": tools},
                                headers=headers) as r:
            r.raise_for_status()
            msg = (await r.json())["choices"][0]["message"]
        messages.append(msg)
        calls = msg.get("tool_calls") or []
        if not calls:
            break
        for c in calls:
            args = json.loads(c["function"]["arguments"])
            rows.append(args)
            result = {"id": f"row_{len(rows)}", "table": args["table"]}
            messages.append({"role": "tool", "tool_call_id": c["id"], "content": json.dumps(result)})
    wall = time.perf_counter() - t0
    if len(rows) != steps:
        raise RuntimeError(f"direct run recorded {len(rows)} rows, not {steps}")
    return wall


# -- (a) Keel ---------------------------------------------------------------------------------------------
class Server:
    """`keel serve` on a fresh data dir and SQLite store, its models in a keel.yaml; stopped by `stop()`."""

    def __init__(self, base: Path, upstream: str, tree: Path = ROOT) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        data = base / "data"
        data.mkdir(parents=True)
        cfg = base / "keel.yaml"
        cfg.write_text(f"models:\n  - {{alias: bench-model, provider: openai_compatible, model: m, "
                       f"base_url: {upstream}}}\n")
        self.log_path = base / "keel.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("KEEL_")}
        env.update({"KEEL_DATA_DIR": str(data), "KEEL_DATABASE_URL": f"sqlite:///{base / 'keel.db'}",
                    "KEEL_BOOTSTRAP_ADMIN_KEY": ADMIN, "KEEL_MASTER_KEY": "bench-master-key",
                    "KEEL_EMBEDDED_MODELS": "false", "KEEL_LOG_REQUESTS": "false", "PYTHONUNBUFFERED": "1",
                    # the Keel of this tree, not the venv's editable install: a `git archive` copy of another
                    # commit run with the same venv would otherwise serve the checkout's code
                    "PYTHONPATH": os.pathsep.join([str(tree), *filter(None, [os.environ.get("PYTHONPATH")])])})
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([PY, "-m", "keel", "serve", "--port", str(self.port), "--config", str(cfg)],
                                         env=env, cwd=base, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_http(self.url + "/healthz", self.proc, self.logs)
        except BaseException:
            self.stop()
            raise

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        stop(self.proc)


def cpu_s(pid: int) -> float | None:
    """CPU time (user + system, all threads) process `pid` has used, from /proc; None where there is none."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def keel_run(session: Any, srv: Server, steps: int, k: int) -> tuple[float, float | None]:
    """The run's wall time and the CPU time `keel serve` used meanwhile (None without /proc)."""
    headers = {"Authorization": f"Bearer {ADMIN}"}
    cpu0 = cpu_s(srv.proc.pid)
    t0 = time.perf_counter()
    async with session.post(f"{srv.url}/v1/agents/{AGENT}/runs", headers=headers,
                            json={"task": task(steps, k), "wait_s": 120}) as r:
        out = await r.json()
    wall = time.perf_counter() - t0
    cpu1 = cpu_s(srv.proc.pid)
    if r.status != 200 or out.get("status") != "completed":
        raise RuntimeError(f"keel run ended {r.status} {out.get('status')}: {out.get('error')}\n{srv.logs()}")
    allowed = [a for a in out.get("actions", []) if a.get("decision") == "allowed"]
    if len(allowed) < steps:
        raise RuntimeError(f"keel run logged {len(allowed)} allowed actions, not at least {steps}: {out}")
    return wall, None if cpu0 is None or cpu1 is None else cpu1 - cpu0


# -- plumbing ---------------------------------------------------------------------------------------------
def wait_http(url: str, proc: subprocess.Popen, logs: Any = None) -> None:
    import httpx
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode}:\n{logs() if logs else ''}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer in 120 s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def measure(srv: Server, upstream: str, steps: int, runs: int) -> dict[str, Any]:
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        await define(session, srv)
        keel, direct, gateway, keel_cpu, direct_cpu = [], [], [], [], []
        admin = {"Authorization": f"Bearer {ADMIN}"}
        for k in range(runs + 1):  # run 0 warms all up; alternating keeps the machine's load shared fairly
            c0 = time.process_time()
            d = await direct_run(session, upstream + "/chat/completions", steps, k) * 1000 / steps
            dc = (time.process_time() - c0) * 1000 / steps
            wall, cpu = await keel_run(session, srv, steps, k)
            a = wall * 1000 / steps
            g = await direct_run(session, srv.url + "/v1/chat/completions", steps, k, "bench-model", admin) * 1000 / steps
            if k:
                direct.append(d)
                keel.append(a)
                gateway.append(g)
                direct_cpu.append(dc)
                if cpu is not None:
                    keel_cpu.append(cpu * 1000 / steps)
            say(f"  run {k}: keel {a:.2f} ms/step, direct {d:.2f}, direct loop through keel's gateway {g:.2f}"
                + (f"; cpu: keel {cpu * 1000 / steps:.2f} ms/step, direct {dc:.2f}" if cpu is not None else ""))
    cpu_cols: dict[str, Any] = {}
    if keel_cpu:
        kc, dcp = statistics.median(keel_cpu), statistics.median(direct_cpu)
        cpu_cols = {"keel_cpu_step_p50_ms": round(kc, 2), "direct_cpu_step_p50_ms": round(dcp, 2),
                    "overhead_cpu_step_p50_ms": round(kc - dcp, 2)}
    keel_p50, direct_p50, gateway_p50 = statistics.median(keel), statistics.median(direct), statistics.median(gateway)
    overhead = keel_p50 - direct_p50
    return {"keel_step_p50_ms": round(keel_p50, 2), "direct_step_p50_ms": round(direct_p50, 2),
            "overhead_step_p50_ms": round(overhead, 2),
            # the same direct loop with its model calls through Keel's /v1/chat/completions: the share of the
            # overhead that is the governed model call; the rest is the agent layer (checks, checkpoints, log)
            "gateway_loop_step_p50_ms": round(gateway_p50, 2),
            "agent_layer_step_p50_ms": round(keel_p50 - gateway_p50, 2), **cpu_cols,
            "keel_step_ms_runs": [round(x, 2) for x in keel], "direct_step_ms_runs": [round(x, 2) for x in direct],
            "met": overhead <= TARGET_STEP_OVERHEAD_MS}


async def measure_trees(servers: dict[str, Server], steps: int, runs: int) -> dict[str, Any]:
    """`--trees`: the trees' servers, all up at once, run the same agent in turn (A B B A …), so the host's drift
    (more than the differences looked for) falls on each alike; per tree the p50 of wall and CPU ms per step."""
    import aiohttp

    seen: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in servers}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        for srv in servers.values():
            await define(session, srv)
            for k in range(2):  # warm-up
                await keel_run(session, srv, steps, k)
        order = list(servers.items())
        for k in range(runs):
            for name, srv in (order if k % 2 == 0 else order[::-1]):
                wall, cpu = await keel_run(session, srv, steps, 10 + k)
                seen[name][0].append(wall * 1000 / steps)
                if cpu is not None:
                    seen[name][1].append(cpu * 1000 / steps)
    return {name: {"keel_step_p50_ms": round(statistics.median(w), 2),
                   **({"keel_cpu_step_p50_ms": round(statistics.median(c), 2)} if c else {}),
                   "keel_step_ms_runs": [round(x, 2) for x in w]} for name, (w, c) in seen.items()}


async def define(session: Any, srv: Server) -> None:
    async with session.post(f"{srv.url}/v1/agents", data=MANDATE,
                            headers={"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/yaml"}) as r:
        if r.status >= 300:
            raise RuntimeError(f"defining the agent failed: {r.status} {await r.text()}")


def parse_trees(value: str) -> dict[str, Path]:
    trees = {}
    for item in value.split(","):
        name, _, path = item.partition("=")
        if not name or not path or not (Path(path) / "keel").is_dir():
            sys.exit(f"--trees takes name=path,… of Keel source trees (a `keel/` inside), not {item!r}")
        trees[name] = Path(path).resolve()
    return trees


def main() -> None:
    if sys.argv[1:2] == ["--upstream"]:
        serve_upstream(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--steps", type=int, default=20, help="N, tool calls the model asks for in each run")
    ap.add_argument("--runs", type=int, default=7, help="K, runs measured of each (after one warm-up)")
    ap.add_argument("--trees", help="name=path,… : instead, Keel of each source tree (a checkout, or a `git archive` "
                                    "copy sharing this venv), servers up together and runs interleaved")
    args = ap.parse_args()
    if not 1 <= args.steps <= 900 or args.runs < 1:
        sys.exit("--steps must be 1..900 (the mandate's step budget is 1000) and --runs at least 1")
    trees = parse_trees(args.trees) if args.trees else None
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanups below on SIGTERM too
    tmp = Path(tempfile.mkdtemp(prefix="keel-bench-agents-"))
    up_port = free_port()
    upstream_proc = subprocess.Popen([PY, str(Path(__file__).resolve()), "--upstream", "--port", str(up_port)],
                                     cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    upstream = f"http://127.0.0.1:{up_port}/v1"
    servers: dict[str, Server] = {}
    load_before = os.getloadavg()[0]
    try:
        wait_http(f"http://127.0.0.1:{up_port}/_stats", upstream_proc)
        if trees:
            for name, tree in trees.items():
                say(f"starting keel of {tree} on SQLite")
                servers[name] = Server(tmp / name, upstream, tree)
            say(f"{args.runs} runs of {args.steps} steps on each, interleaved")
            res = {"trees": asyncio.run(measure_trees(servers, args.steps, args.runs))}
        else:
            say("starting keel on SQLite")
            servers["keel"] = srv = Server(tmp / "keel", upstream)
            say(f"{args.runs} runs of {args.steps} steps each, keel and direct alternating")
            res = asyncio.run(measure(srv, upstream, args.steps, args.runs))
    finally:
        for srv in servers.values():
            srv.stop()
        stop(upstream_proc)
        shutil.rmtree(tmp, ignore_errors=True)
    res.update(steps=args.steps, runs=args.runs, backend="sqlite", target_overhead_ms=TARGET_STEP_OVERHEAD_MS,
               # the checkout(s) whose Keel `keel serve` ran (PYTHONPATH in `Server`)
               tree={n: str(t) for n, t in trees.items()} if trees else str(ROOT),
               # the machine's 1-minute load average before and after: on a shared machine wall times measure it too
               load_1m=[round(load_before, 2), round(os.getloadavg()[0], 2)])
    print(json.dumps(res))


if __name__ == "__main__":
    main()
