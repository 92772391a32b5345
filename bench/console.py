"""Console: the time of each page at N ledger rows (default 100,000), as a signed-in browser would fetch it.

A real `keel serve` on a fresh SQLite store, its ledger filled with N rows over the last 30 days (5 teams, 40
keys, 6 models, 8 use cases; written straight into the table before the server starts: seeding, not what is
measured). An admin session (all rows visible) and a member session (its own key's rows) each fetch every page
`--repeat` times in turn over one keep-alive connection; the time is the request's wall time on loopback. The
baseline in the same run is `GET /v1/usage` (group_by=day) with the admin key: the API's own exact report over the
raw rows, so `overview_vs_api` says what the console's rollup-based reports (keel/observe/rollup_report.py) save.
The seeded rows are counted into the daily rollups as the obs_0005 migration's backfill would (`rollup.rebuild`).

With `--documents N` (default 10,000) one collection of team0 (made through the API) gets N documents of one chunk
each, written straight into the knowledge tables (seeding again), and the Knowledge pages are timed on it: the
collection page and a later page of its documents.

Target: p95 <= 150 ms per page at 100k rows and 10k documents. Prints one JSON line.
    .venv/bin/python bench/console.py [--rows 100000] [--documents 10000] [--repeat 15]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from keel.core.db import Store  # noqa: E402
from keel.identity import service as identity  # noqa: E402
from keel.knowledge.tables import chunks, documents  # noqa: E402
from keel.observe import rollup  # noqa: E402
from keel.observe.tables import usage_ledger  # noqa: E402

ADMIN = "sk-keel-benchconsole_" + "b" * 40
PAGES = ["/console/overview", "/console/usage", "/console/usage?group_by=model", "/console/usage?group_by=key&page=2",
         "/console/usage?group_by=use_case&team=team1", "/console/audit", "/console/audit?action=key.create",
         "/console/workflows", "/console/keys", "/console/people", "/console/inbox", "/console/knowledge",
         "/console/playground", "/console/agents"]
OPTIONAL = ["/console/budgets", "/console/limits", "/console/deployments"]  # admin pages of newer builds, when served
MEMBER_PAGES = ["/console/overview", "/console/usage", "/console/usage?group_by=model", "/console/workflows",
                "/console/playground", "/console/knowledge"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seed(db_url: str, rows: int) -> str:
    """Teams, keys and `rows` ledger rows; returns a member key whose own calls are 1/40th of them."""
    store = Store.open(db_url)
    store.upgrade()
    identity.bootstrap(store, ADMIN)
    teams = [identity.create_team(store, f"team{i}")["id"] for i in range(5)]
    keys = []
    member = None
    for i in range(40):
        raw, rec = identity.create_key(store, role="member", name=f"k{i}", team=f"team{i % 5}")
        keys.append((rec["id"], teams[i % 5]))
        member = member or raw
    rnd = random.Random(7)
    now = datetime.now(UTC)
    models = [f"model-{i}" for i in range(6)]
    uses = [None, "chat", "knowledge.answer", "support", "workflow:lead_intake", "agent:helper", "search", "eval"]
    batch = []
    with store.engine.begin() as conn:
        for n in range(rows):
            key_id, team_id = keys[n % len(keys)]
            tin, tout = rnd.randint(20, 2000), rnd.randint(5, 500)
            batch.append({"request_id": f"req_bench{n:08d}", "ts": now - timedelta(seconds=rnd.uniform(0, 29 * 86400)),
                          "key_id": key_id, "team_id": team_id, "kind": "chat", "alias": rnd.choice(models),
                          "deployment": "bench/dep", "provider": "openai_compatible", "tokens_in": tin,
                          "tokens_out": tout, "cost": (tin + 2 * tout) / 1e6, "latency_ms": rnd.lognormvariate(5, 0.6),
                          "status": "error" if rnd.random() < 0.02 else "ok", "http_status": 200,
                          "cache_hit": rnd.random() < 0.1, "use_case": rnd.choice(uses)})
            if len(batch) == 5000:
                conn.execute(usage_ledger.insert(), batch)
                batch = []
        if batch:
            conn.execute(usage_ledger.insert(), batch)
        rollup.rebuild(conn)  # rows written straight into the table: count them into the daily rollups (the backfill)
    store.dispose()
    return member


def seed_documents(db_url: str, collection_id: str, n: int) -> None:
    """`n` documents of one chunk each in the collection, written straight into the tables (no embedding)."""
    store = Store.open(db_url)
    now = datetime.now(UTC)
    with store.engine.begin() as conn:
        for start in range(0, n, 2000):
            ids = range(start, min(n, start + 2000))
            conn.execute(documents.insert(), [
                {"id": f"doc_bench{i:07d}", "collection_id": collection_id, "source": f"handbook/section-{i:05d}.md",
                 "title": f"Section {i}", "format": "markdown", "content_hash": f"{i:064x}", "size_bytes": 900,
                 "chunk_count": 1, "meta": {}, "created_at": now, "updated_at": now} for i in ids])
            conn.execute(chunks.insert(), [
                {"document_id": f"doc_bench{i:07d}", "collection_id": collection_id, "ordinal": 0,
                 "section": f"Section {i}", "text": f"Section {i} of the handbook: how refunds are approved. " * 12,
                 "span_start": 0, "span_end": 900, "tokens": 150} for i in ids])
    store.dispose()


def signed_in(url: str, key: str) -> httpx.Client:
    c = httpx.Client(base_url=url, timeout=60)
    csrf = re.search(r'name="csrf" value="([^"]+)"', c.get("/console/sign-in").text).group(1)
    assert c.post("/console/sign-in", data={"csrf": csrf, "key": key}).status_code == 303
    return c


def timed(c: httpx.Client, path: str, repeat: int) -> list[float]:
    out = []
    c.get(path)  # warm-up
    for _ in range(repeat):
        t = time.perf_counter()
        r = c.get(path)
        out.append((time.perf_counter() - t) * 1000)
        assert r.status_code == 200, (path, r.status_code, r.text[:300])
    return out


def summary(ms: list[float]) -> dict[str, float]:
    ordered = sorted(ms)
    return {"p50_ms": round(statistics.median(ordered), 1),
            "p95_ms": round(ordered[max(0, int(len(ordered) * 0.95 + 0.5) - 1)], 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--documents", type=int, default=10_000)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="keel-bench-console-"))
    db = f"sqlite:///{base / 'keel.db'}"
    t = time.perf_counter()
    member = seed(db, args.rows)
    seed_s = time.perf_counter() - t
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEEL_")}
    env.update({"KEEL_DATA_DIR": str(base / "data"), "KEEL_DATABASE_URL": db, "KEEL_BOOTSTRAP_ADMIN_KEY": ADMIN,
                "KEEL_MASTER_KEY": "bench-master-key", "KEEL_EMBEDDED_MODELS": "false", "KEEL_LOG_REQUESTS": "false"})
    (base / "data").mkdir()
    log = open(base / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "keel", "serve", "--port", str(port)], env=env, cwd=str(base),
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"keel did not start:\n{(base / 'server.log').read_text()[-3000:]}")
            time.sleep(0.1)
        admin, mem = signed_in(url, ADMIN), signed_in(url, member)
        served = [p for p in OPTIONAL if admin.get(p).status_code == 200]
        if args.documents:
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60) as api:
                r = api.post("/v1/collections", json={"name": "bench-docs", "classification": "internal",
                                                      "owner_team": "team0"})
                assert r.status_code == 201, r.text
            t = time.perf_counter()
            seed_documents(db, r.json()["id"], args.documents)
            seed_s += time.perf_counter() - t
            served += ["/console/knowledge/bench-docs",
                       f"/console/knowledge/bench-docs?after=handbook/section-{args.documents // 2:05d}.md"]
        pages = {p: summary(timed(admin, p, args.repeat)) for p in PAGES + served}
        member_pages = {p: summary(timed(mem, p, args.repeat)) for p in MEMBER_PAGES}
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60) as api:
            baseline = summary(timed(api, "/v1/usage?group_by=day", args.repeat))
        worst = max(v["p95_ms"] for v in [*pages.values(), *member_pages.values()])
        print(json.dumps({"bench": "console", "rows": args.rows, "documents": args.documents, "repeat": args.repeat, "seed_s": round(seed_s, 1),
                          "admin": pages, "member": member_pages, "api_usage_by_day": baseline,
                          "overview_vs_api": round(pages["/console/overview"]["p50_ms"] / baseline["p50_ms"], 2),
                          "worst_p95_ms": worst, "target_p95_ms": 150, "met": worst <= 150}))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
