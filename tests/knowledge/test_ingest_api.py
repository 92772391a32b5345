"""Upload → background job → documents and chunks, over the real HTTP API: every format, content-hash
idempotency, atomic replacement, per-file errors in a broken batch, search fields and filters,
answers with citations (streaming too), and metering of every embedding call."""

from __future__ import annotations

import json

import pytest

from conftest import ledger_rows, wait_ledger

from .conftest import fake_chat_config, upload, wait_job
from .files import CSV, HTML, JSON, MD, RST, make_docx, make_pdf, make_zip_bomb

pytestmark = pytest.mark.store

EVERY_FORMAT = {
    "handbook.md": MD, "ops/index.rst": RST, "onboarding.html": HTML, "people.csv": CSV, "catalog.json": JSON,
    "travel.docx": make_docx(), "notes.txt": b"The coffee machine on floor three is descaled every Friday.\n",
    "billing.pdf": make_pdf(["Invoices are paid within thirty days.", "Refunds are issued to the original card."],
                            title="Billing"),
}


@pytest.fixture(scope="module")
def ksrv(kserver_factory, upstream, tmp_path_factory):
    return kserver_factory(KEEL_CONFIG=str(fake_chat_config(tmp_path_factory.mktemp("cfg"), upstream)))


@pytest.fixture(scope="module")
def admin(ksrv):
    with ksrv.admin() as a:
        assert a.post("/v1/collections", json={"name": "docs", "classification": "internal"}).status_code == 201
        r = upload(a, "docs", EVERY_FORMAT)
        assert r.status_code == 200, r.text
        yield a


def search(a, query, **kw):
    r = a.post("/v1/search", json={"query": query, "collections": ["docs"], **kw})
    assert r.status_code == 200, r.text
    return r.json()["data"]


def test_every_format_ingests(admin):
    docs = admin.get("/v1/collections/docs/documents").json()["data"]
    assert {d["source"] for d in docs} == set(EVERY_FORMAT)
    assert {d["format"] for d in docs} == {"md", "rst", "html", "csv", "json", "docx", "txt", "pdf"}
    assert all(d["chunk_count"] >= 1 for d in docs)
    c = admin.get("/v1/collections/docs").json()
    assert c["document_count"] == len(EVERY_FORMAT) and c["dims"] == 384


def test_hits_carry_document_section_page_span_and_score(admin):
    hit = search(admin, "Where are refunds issued to?", top_k=3)[0]
    assert hit["source"] == "billing.pdf" and hit["page"] == 2 and hit["title"] == "Billing"
    assert hit["document_id"].startswith("doc_") and hit["score"] > 0 and hit["span"]["end"] > hit["span"]["start"]
    hit = search(admin, "daily allowance in Zurich")[0]
    assert hit["source"] == "travel.docx" and hit["section"].endswith("Approvals")
    hit = search(admin, "who answers pages when on call?")[0]
    assert hit["source"] == "ops/index.rst" and "On-call" in hit["section"]


def test_modes_filters_and_top_k(admin):
    assert len(search(admin, "policy", top_k=2)) <= 2
    only_pdf = search(admin, "refunds invoices holidays", filters={"format": "pdf"}, top_k=10)
    assert only_pdf and {h["source"] for h in only_pdf} == {"billing.pdf"}
    assert {h["source"] for h in search(admin, "refunds", filters={"source": "ops/*"}, top_k=10)} <= {"ops/index.rst"}
    bm25 = search(admin, "descaled", mode="bm25")
    assert bm25[0]["source"] == "notes.txt" and bm25[0]["ranks"]["vector"] is None
    assert search(admin, "coffee machine maintenance", mode="vector")[0]["source"] == "notes.txt"
    bad = admin.post("/v1/search", json={"query": "x", "filters": {"format": {"$in": 1}}})
    assert bad.status_code == 400 and bad.json()["code"] == "bad_request"


def test_reupload_unchanged_skips_and_changed_replaces_chunks(admin):
    again = upload(admin, "docs", {"notes.txt": EVERY_FORMAT["notes.txt"]}).json()
    assert again["items"][0]["status"] == "unchanged" and again["chunks"] == 0
    changed = upload(admin, "docs", {"notes.txt": b"The tea kettle on floor four is replaced every spring.\n"}).json()
    assert changed["items"][0]["status"] == "changed"
    assert changed["items"][0]["document_id"] == again["items"][0]["document_id"]
    assert search(admin, "descaled", mode="bm25") == []
    assert search(admin, "kettle", mode="bm25")[0]["source"] == "notes.txt"
    assert admin.get("/v1/collections/docs").json()["document_count"] == len(EVERY_FORMAT)


def test_broken_batch_reports_each_file_and_ingests_the_rest(admin):
    batch = {
        "corrupt.pdf": make_pdf(["fine"])[:80] + b"\x00garbage" * 50,
        "disguised.docx": make_pdf(["I am really a PDF"]),
        "picture.png": b"\x89PNG\r\n\x1a\n" + b"\x00" * 64,
        "zero.md": b"",
        "bomb.docx": make_zip_bomb(),
        "good-one.md": b"# Parking\n\nVisitors park in the north lot near reception.\n",
        "good-two.txt": b"The library opens at eight in the morning on weekdays.\n",
    }
    job = upload(admin, "docs", batch).json()
    assert job["status"] == "completed_with_errors"
    by = {it["source"]: it for it in job["items"]}
    assert by["good-one.md"]["status"] == "new" and by["good-two.txt"]["status"] == "new"
    expected = {"corrupt.pdf": "corrupt_file", "disguised.docx": "wrong_format", "picture.png": "unsupported_format",
                "zero.md": "empty_file", "bomb.docx": "zip_bomb"}
    for source, code in expected.items():
        assert by[source]["status"] == "failed" and by[source]["error"]["code"] == code, by[source]
        assert source in by[source]["error"]["detail"]
    assert job["counts"]["failed"] == 5 and job["counts"]["new"] == 2
    assert search(admin, "where do visitors park?")[0]["source"] == "good-one.md"
    assert admin.get(f"/v1/jobs/{job['id']}?items=failed").json()["items"][0]["status"] == "failed"


def test_upload_over_the_body_limit_is_a_clear_413(admin):
    r = admin.post("/v1/collections/docs/documents", files=[("files", ("big.txt", b"a" * (11 * 1024 * 1024)))])
    assert r.status_code == 413 and r.json()["code"] == "payload_too_large" and r.json()["fix"]


def test_background_job_status_and_delete_document(admin):
    r = admin.post("/v1/collections/docs/documents", files=[("files", ("later.md", b"# Later\n\nBike racks are "
                                                                      b"behind building C."))])
    assert r.status_code == 202 and r.headers["location"] == f"/v1/jobs/{r.json()['id']}"
    job = wait_job(admin, r.json()["id"])
    assert job["status"] == "succeeded"
    doc_id = job["items"][0]["document_id"]
    assert admin.get(f"/v1/documents/{doc_id}").json()["source"] == "later.md"
    assert admin.delete(f"/v1/collections/docs/documents/{doc_id}").status_code == 204
    assert admin.get(f"/v1/documents/{doc_id}").status_code == 404
    assert all(h["document_id"] != doc_id for h in search(admin, "bike racks", top_k=10))


def test_embedding_calls_go_through_the_gateway_and_are_metered(admin, ksrv):
    wait_ledger(ksrv.extra["db_url"], "kind = 'embedding' AND use_case = 'knowledge.search'")
    rows = ledger_rows(ksrv.extra["db_url"], "kind = 'embedding'")
    uses = {r.use_case for r in rows}
    assert {"knowledge.ingest", "knowledge.search"} <= uses, uses
    assert all(r.alias == "local-embed" and r.tokens_in > 0 for r in rows if r.use_case == "knowledge.ingest")


def test_answer_cites_passages_and_says_so_when_nothing_is_relevant(admin):
    r = admin.post("/v1/answer", json={"question": "Where are refunds issued to?", "collections": ["docs"],
                                       "top_k": 2, "max_tokens": 24, "model": "fake-chat"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["found"] and body["answer"].strip() and body["usage"]["completion_tokens"] > 0
    cites = body["citations"]
    assert cites[0]["source"] == "billing.pdf" and cites[0]["page"] == 2 and cites[0]["n"] == 1
    assert {"document_id", "title", "section", "page", "span", "score"} <= set(cites[0])
    none = admin.post("/v1/answer", json={"question": "What is the orbital period of Neptune's moon Triton?",
                                          "collections": ["docs"]}).json()
    assert none["found"] is False and none["citations"] == [] and "could not find" in none["answer"]


def test_answer_streams_citations_then_text(admin):
    with admin.stream("POST", "/v1/answer", json={"question": "When are invoices paid?", "collections": ["docs"],
                                                  "top_k": 2, "max_tokens": 16, "stream": True,
                                                  "model": "fake-chat"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert events[0]["type"] == "citations" and events[0]["citations"][0]["source"] == "billing.pdf"
    assert any(e["type"] == "delta" and e["content"] for e in events)
    assert events[-1]["type"] == "done" and events[-1]["usage"]["completion_tokens"] > 0


def test_answer_prompt_numbers_passages_and_is_metered_as_a_chat_call(admin, ksrv):
    body = admin.post("/v1/answer", json={"question": "Who gets 25 days of paid holiday?", "collections": ["docs"],
                                          "top_k": 3, "model": "fake-chat"}).json()
    assert body["found"] and [c["n"] for c in body["citations"]] == list(range(1, len(body["citations"]) + 1))
    wait_ledger(ksrv.extra["db_url"], "kind = 'chat' AND use_case = 'knowledge.answer' AND alias = 'fake-chat'")


def test_rerank_stage_reorders_only_the_fused_hits_through_the_gateway(admin, ksrv):
    plain = search(admin, "refunds invoices holidays", top_k=4)
    reranked = search(admin, "refunds invoices holidays", top_k=4, rerank="fake-chat")
    assert {h["chunk_id"] for h in reranked} <= {h["chunk_id"] for h in search(admin, "refunds invoices holidays",
                                                                               top_k=10)}
    assert len(reranked) == len(plain)
    wait_ledger(ksrv.extra["db_url"], "kind = 'chat' AND use_case = 'knowledge.rerank'")
