"""The issue's fleet on one PostgreSQL store and one real Redis: two `keel serve --role api` replicas and two
`keel worker`s, shared by the tests of this module (in order: the schedule needs both workers alive, the ingest
test kills one).

- a cron schedule fires once per due time although both workers check it (each effect reaches the loopback
  receiver once, no due time skipped or doubled);
- 200 documents uploaded through both replicas are all indexed although the worker holding an ingest job is
  SIGKILLed mid-way, and no document has a chunk twice (counted in the store).
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from conftest import TEST_DB, KeelServer, eventually, fake_upstream, new_db_url, start_server
from tests.workflows.conftest import define, receiver, wait_run

pytestmark = [pytest.mark.store,
              pytest.mark.skipif(TEST_DB != "postgres", reason="a fleet of processes shares a PostgreSQL store")]
DOCS = 200
FAST = {"KEEL_WORKER_HEARTBEAT_S": "0.5", "KEEL_WORKER_TAKEOVER_S": "3", "KEEL_WORKER_CONCURRENCY": "4",
        "KEEL_WORKFLOW_SCHEDULE_INTERVAL_S": "0.3"}


@dataclass
class Fleet:
    db_url: str
    api: list[KeelServer]
    workers: list[KeelServer]
    receiver: str

    def sql(self, query: str, **params: Any) -> list[Any]:
        engine = sa.create_engine(self.db_url)
        try:
            with engine.connect() as conn:
                return conn.execute(sa.text(query), params).all()
        finally:
            engine.dispose()


def fleet_config(tmp: Path, base_url: str) -> Path:
    cfg = tmp / "keel.yaml"
    cfg.write_text(f"""
models:
  - {{alias: local-embed, provider: openai_compatible, model: embed-fake, id: local-embed/fake, kind: embedding,
      base_url: {base_url}}}
""")
    return cfg


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, pg_server, redis_url) -> Iterator[Fleet]:  # noqa: ANN001
    base = tmp_path_factory.mktemp("fleet")
    db_url = new_db_url(base, pg_server)
    procs: list[KeelServer] = []
    # Each embedding call takes 0.4 s upstream, so ingesting 200 documents takes long enough to kill a worker
    # in the middle of it.
    with fake_upstream("--latency-ms", "400") as root, receiver() as rcv:
        cfg = fleet_config(base, root + "/v1")
        try:
            api = [start_server(base / f"api{i}", db_url, config=cfg, wait=False, KEEL_ROLE="api",
                                KEEL_REDIS_URL=redis_url) for i in range(2)]
            procs += api
            workers = [start_server(base / f"w{i}", db_url, command="worker", config=cfg, wait=False,
                                    KEEL_REDIS_URL=redis_url, **FAST) for i in range(2)]
            procs += workers
            for srv in procs:  # started together: one migrates the store while the others wait for its lock
                eventually(srv.healthy, timeout=180, interval=0.1)
            yield Fleet(db_url, api, workers, rcv)
        finally:
            for srv in procs:
                srv.stop()


def ticking(rcv: str, cron: str | None) -> str:
    trigger = f'triggers:\n  - {{type: schedule, cron: "{cron}", inputs: {{}}}}\n' if cron else ""
    return f"""
name: ticking
allow_hosts: ["{rcv.split('://', 1)[1]}"]
{trigger}steps:
  - id: push
    type: http
    method: POST
    url: "{rcv}/tick"
    body: {{run: "{{{{ run.id }}}}"}}
"""


def test_a_schedule_fires_once_per_due_time_with_two_workers(fleet: Fleet) -> None:
    """Guards schedules on a fleet: both workers check a cron trigger due every 2 s (each every 0.3 s); every due
    time from the first on, up to one both workers are well past, started exactly one run (its id derived from
    the due time), and each run's push reached the receiver exactly once."""
    api = fleet.api[0]
    defined_at = time.time()
    define(api, ticking(fleet.receiver, "* * * * * */2"))

    def due(run: dict[str, Any]) -> int:
        return int(run["id"].rsplit("_", 1)[1])

    def settled() -> list[dict[str, Any]] | None:
        cutoff = time.time() - 2  # both workers have checked the schedule several times since
        with api.admin() as c:
            runs = [r for r in c.get("/v1/workflows/ticking/runs?limit=100").json()["data"] if due(r) <= cutoff]
        return runs if len(runs) >= 4 else None
    try:
        runs = eventually(settled, timeout=60, interval=0.3)
    finally:
        define(api, ticking(fleet.receiver, None))  # a version without the schedule: no more runs start
    for r in runs:
        assert wait_run(api, "ticking", r["id"], timeout=60)["status"] == "completed"
    dues = sorted(due(r) for r in runs)
    assert all(r["trigger"] == "schedule" for r in runs), runs
    assert dues[0] <= defined_at + 2, (defined_at, dues)  # the first due time after the definition
    assert dues == list(range(dues[0], dues[-1] + 1, 2)), dues  # each later one once: none doubled or skipped
    stats = httpx.get(fleet.receiver + "/_stats").json()
    assert stats["repeats"] == 0, stats
    assert all(stats["by_key"].get(f"{r['id']}.push") == 1 for r in runs), stats
    logs = "".join(w.logs() for w in fleet.workers)
    assert "scheduled run not started" not in logs and "Traceback" not in logs, logs[-3000:]


def document(i: int) -> bytes:
    return (f"# Note {i}\n\nThis is fleet note number {i}. It records topic {i % 17} and the customer "
            f"account {i * 7919 % 10007}.\n").encode()


def upload(srv: KeelServer, collection: str, numbers: range) -> str:
    files = {f"note-{i:03d}.md": document(i) for i in numbers}
    parts = [("files", (name, body, "text/markdown")) for name, body in files.items()]
    with srv.admin() as c:
        r = c.post(f"/v1/collections/{collection}/documents", files=parts, data={"sources": json.dumps(list(files))})
    assert r.status_code == 202, r.text
    return r.json()["id"]


@pytest.mark.timeout(400)
def test_ingest_survives_a_killed_worker_without_duplicate_chunks(fleet: Fleet) -> None:
    """Guards ingest on a fleet: 200 documents uploaded as two jobs through both API replicas; the worker holding
    a job that is part-way done is SIGKILLed; once its lease runs out the live worker carries the job on from the
    first unfinished file. Every document is indexed once, with each chunk once."""
    with fleet.api[0].admin() as c:
        assert c.post("/v1/collections", json={"name": "fleet", "classification": "internal"}).status_code == 201
    jobs = [upload(fleet.api[0], "fleet", range(0, DOCS // 2)), upload(fleet.api[1], "fleet", range(DOCS // 2, DOCS))]

    def part_way() -> tuple[str, int] | None:
        rows = fleet.sql("SELECT j.lease_owner, count(*) FILTER (WHERE i.status <> 'pending') AS done, count(*) AS n "
                         "FROM knowledge_jobs j JOIN knowledge_job_items i ON i.job_id = j.id "
                         "WHERE j.status = 'running' AND j.lease_owner IS NOT NULL GROUP BY j.lease_owner")
        return next(((r.lease_owner, r.done) for r in rows if 0 < r.done < r.n), None)
    owner, done_before = eventually(part_way, timeout=120, interval=0.05)
    victim = next(w for w in fleet.workers if f":{w.proc.pid}:" in owner)
    victim.stop(signal.SIGKILL)
    killed = time.monotonic()

    def finished() -> list[str] | None:
        with fleet.api[1].admin() as c:
            states = [c.get(f"/v1/jobs/{j}", params={"items": "none"}).json()["status"] for j in jobs]
        return states if all(s not in ("queued", "running") for s in states) else None
    states = eventually(finished, timeout=180, interval=0.5)
    took = time.monotonic() - killed
    assert states == ["succeeded", "succeeded"], states

    docs = fleet.sql("SELECT d.source, d.chunk_count, count(k.id) AS chunks, count(DISTINCT k.ordinal) AS ordinals "
                     "FROM knowledge_documents d LEFT JOIN knowledge_chunks k ON k.document_id = d.id "
                     "GROUP BY d.id, d.source, d.chunk_count")
    assert sorted(d.source for d in docs) == sorted(f"note-{i:03d}.md" for i in range(DOCS))
    assert all(d.chunks >= 1 and d.chunks == d.ordinals == d.chunk_count for d in docs), \
        [d for d in docs if not (d.chunks >= 1 and d.chunks == d.ordinals == d.chunk_count)]
    items = fleet.sql("SELECT status, count(*) AS n FROM knowledge_job_items GROUP BY status")
    assert {r.status: r.n for r in items} == {"new": DOCS}, items
    survivor = next(w for w in fleet.workers if w is not victim)
    with survivor.admin() as c:  # the documents are searchable through the store's index
        hits = c.post("/v1/search", json={"query": "fleet note number 123", "collections": ["fleet"], "top_k": 3})
    assert hits.status_code == 200, hits.text
    print(f"worker killed with {done_before} files of its job done; all {DOCS} indexed {took:.1f}s later")
