"""A document's chunks, through `GET /v1/documents/{id}/chunks` and the console's document page: in order, paged,
and only for callers who may read the document (another team or a key without one gets not-found)."""

from __future__ import annotations

import httpx
import pytest

from tests.console.test_sessions import sign_in
from tests.knowledge.conftest import make_key, make_team, upload

pytestmark = pytest.mark.store

TEXT = "\n\n".join(f"## Part {i}\n\n" + f"Refund rule {i}: approvals above {i}00 dollars need a manager. " * 30
                   for i in range(6)).encode()


def test_a_documents_chunks_for_its_readers_only(ksrv) -> None:
    make_team(ksrv, "red"), make_team(ksrv, "blue")
    keys = {who: make_key(ksrv, role, team) for who, role, team in (
        ("builder", "builder", "red"), ("member", "member", "red"), ("blue", "member", "blue"),
        ("nobody", "member", None))}
    with httpx.Client(base_url=ksrv.url, headers={"authorization": f"Bearer {keys['builder']}"}, timeout=60) as c:
        assert c.post("/v1/collections", json={"name": "refunds", "classification": "internal"}).status_code == 201
        job = upload(c, "refunds", {"rules.md": TEXT}).json()
        assert job["status"] == "succeeded", job
        doc = c.get("/v1/collections/refunds/documents").json()["data"][0]
    with httpx.Client(base_url=ksrv.url, headers={"authorization": f"Bearer {keys['member']}"}, timeout=60) as c:
        out = c.get(f"/v1/documents/{doc['id']}/chunks").json()
        assert out["document"]["id"] == doc["id"] and len(out["data"]) == doc["chunk_count"] > 1
        assert [k["ordinal"] for k in out["data"]] == list(range(doc["chunk_count"]))
        assert "Refund rule 0" in out["data"][0]["text"]
        page = c.get(f"/v1/documents/{doc['id']}/chunks", params={"after": 0, "limit": 1}).json()["data"]
        assert [k["ordinal"] for k in page] == [1]
        for bad in ({"after": "x"}, {"limit": 0}, {"limit": 10_000}, {"after": -5}):
            assert c.get(f"/v1/documents/{doc['id']}/chunks", params=bad).status_code == 422, bad
    for who in ("blue", "nobody"):
        with httpx.Client(base_url=ksrv.url, headers={"authorization": f"Bearer {keys[who]}"}, timeout=60) as c:
            r = c.get(f"/v1/documents/{doc['id']}/chunks")
            assert r.status_code == 404 and "Refund rule" not in r.text, who
    with httpx.Client(base_url=ksrv.url, timeout=60) as red, httpx.Client(base_url=ksrv.url, timeout=60) as blue:
        assert sign_in(red, key=keys["member"]).status_code == 303
        assert sign_in(blue, key=keys["blue"]).status_code == 303
        listing = red.get("/console/knowledge/refunds").text
        assert f"/knowledge/refunds/documents/{doc['id']}" in listing
        shown = red.get(f"/console/knowledge/refunds/documents/{doc['id']}")
        assert shown.status_code == 200 and "Refund rule 0" in shown.text and "rules.md" in shown.text
        assert red.get(f"/console/knowledge/refunds/documents/{doc['id']}?after=x").status_code == 400
        assert red.get(f"/console/knowledge/other/documents/{doc['id']}").status_code == 404
        hidden = blue.get(f"/console/knowledge/refunds/documents/{doc['id']}")
        assert hidden.status_code == 404 and "Refund rule" not in hidden.text


def test_ingest_jobs_and_their_failures_for_writers_and_creators(ksrv) -> None:
    """`GET /v1/collections/{ref}/jobs` and the collection page list the latest uploads with their failed files;
    a reader who is not a writer sees only its own jobs, another team the collection not at all."""
    make_team(ksrv, "red"), make_team(ksrv, "blue")
    builder, member, blue = (make_key(ksrv, "builder", "red"), make_key(ksrv, "member", "red"),
                             make_key(ksrv, "builder", "blue"))
    with httpx.Client(base_url=ksrv.url, headers={"authorization": f"Bearer {builder}"}, timeout=60) as c:
        assert c.post("/v1/collections", json={"name": "jobs-demo", "classification": "internal"}).status_code == 201
        job = upload(c, "jobs-demo", {"good.md": TEXT, "empty.md": b""}).json()
        listed = c.get("/v1/collections/jobs-demo/jobs").json()["data"]
    assert [j["id"] for j in listed] == [job["id"]]
    assert listed[0]["counts"]["failed"] == 1 and listed[0]["counts"]["new"] == 1
    assert [f["source"] for f in listed[0]["failed_items"]] == ["empty.md"] and listed[0]["failed_items"][0]["error"]["code"]
    with httpx.Client(base_url=ksrv.url, headers={"authorization": f"Bearer {member}"}, timeout=60) as c:
        assert c.get("/v1/collections/jobs-demo/jobs").json()["data"] == []  # a reader: its own jobs only
        assert c.get("/v1/collections/jobs-demo/jobs", params={"limit": 0}).status_code == 422
    with httpx.Client(base_url=ksrv.url, headers={"authorization": f"Bearer {blue}"}, timeout=60) as c:
        r = c.get("/v1/collections/jobs-demo/jobs")
        assert r.status_code == 404 and "empty.md" not in r.text
    with httpx.Client(base_url=ksrv.url, timeout=60) as b:
        assert sign_in(b, key=builder).status_code == 303
        page = b.get("/console/knowledge/jobs-demo").text
        assert "Ingest jobs" in page and "empty.md: " + listed[0]["failed_items"][0]["error"]["code"] in page
