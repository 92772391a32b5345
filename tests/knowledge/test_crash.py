"""kill -9 in the middle of an ingest job: nothing acknowledged is lost, the restarted server finishes
the job by itself, and neither the resume nor a full re-run creates a duplicate document or chunk."""

from __future__ import annotations

import signal

import pytest
import sqlalchemy as sa

from conftest import EMBEDDED, eventually

from .conftest import upload, wait_job

pytestmark = [pytest.mark.store, pytest.mark.slow]

PARAGRAPH = ("Section {i}.{j} of the operations manual explains how team {i} rotates the on-call duty, "
             "how incidents are escalated, which dashboards to watch, and how to hand over at the end of "
             "a shift so that nothing is forgotten between engineers. ")


def files(n: int = 48) -> dict[str, bytes]:
    return {f"manual/part{i:03d}.md": (f"# Part {i}\n\n" + "\n\n".join(
        f"## Topic {j}\n\n" + PARAGRAPH.format(i=i, j=j) * 3 for j in range(3))).encode() for i in range(n)}


def rows(db_url: str, sql: str) -> list:
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text(sql)).all()
    finally:
        engine.dispose()


def test_kill_9_mid_ingest_then_restart_finishes_without_duplicates(server_factory, db_url):
    srv = server_factory(**EMBEDDED)
    batch = files()
    with srv.admin() as a:
        assert a.post("/v1/collections", json={"name": "manual", "classification": "internal"}).status_code == 201
        job = upload(a, "manual", batch, wait=0).json()
        assert job["status"] in ("queued", "running")

        def two_files_in() -> dict[str, int] | None:
            counts = a.get(f"/v1/jobs/{job['id']}?items=none").json()["counts"]
            return counts if counts["new"] >= 2 else None
        counts = eventually(two_files_in, timeout=120)
    assert 0 < counts["new"] and counts["pending"] > 0, counts
    srv.stop(signal.SIGKILL)
    before = {r[0] for r in rows(db_url, "SELECT source FROM knowledge_documents")}
    assert before and len(before) < len(batch)

    srv = server_factory(**EMBEDDED)
    try:
        with srv.admin() as a:
            done = wait_job(a, job["id"], timeout=240)
            assert done["status"] == "succeeded", done
            assert done["counts"]["new"] == len(batch) and done["counts"]["pending"] == 0
            again = upload(a, "manual", batch).json()
            assert again["counts"]["unchanged"] == len(batch), again["counts"]
            hit = a.post("/v1/search", json={"query": "how does team 47 rotate on-call duty?", "top_k": 3}).json()
            assert hit["data"] and hit["data"][0]["source"].startswith("manual/")
    finally:
        srv.stop()
    docs = rows(db_url, "SELECT source, chunk_count, id FROM knowledge_documents")
    assert sorted(r[0] for r in docs) == sorted(batch), "every acknowledged file is a document, once"
    per_doc = dict(rows(db_url, "SELECT document_id, count(*) FROM knowledge_chunks GROUP BY document_id"))
    assert all(per_doc.get(r[2]) == r[1] for r in docs), "chunks match each document's count: no duplicates"
    assert rows(db_url, "SELECT count(*) FROM knowledge_chunks c LEFT JOIN knowledge_documents d "
                        "ON d.id = c.document_id WHERE d.id IS NULL")[0][0] == 0
    if db_url.startswith("sqlite"):
        cid = rows(db_url, "SELECT id FROM knowledge_collections")[0][0]
        indexed = rows(db_url, f'SELECT count(*) FROM "kn_fts_{cid}_docsize"')[0][0]
        assert indexed == sum(per_doc.values()), "the keyword index holds each chunk exactly once"
