"""The permission matrix: two teams (plus hr), a restricted and a shared collection, document-level
ACLs, role and key-scope limits. Every search / answer / list / count / get / job path returns
nothing the caller may not read, and an unreadable thing answers exactly like a missing one."""

from __future__ import annotations

import pytest

from .conftest import make_key, make_team, upload

pytestmark = pytest.mark.store

SECRET = b"# Merger\n\nThe zebracorn merger plan closes in March; the price is confidential.\n"
HANDBOOK = b"# Handbook\n\nThe holiday policy gives every employee 25 days of paid leave a year.\n"
SALARIES = b"# Salaries\n\nSalary bands for engineers range from level one to level five.\n"


@pytest.fixture(scope="module")
def world(ksrv):
    for t in ("alpha", "beta", "hr"):
        make_team(ksrv, t)
    keys = {
        "alpha_builder": make_key(ksrv, "builder", "alpha"), "alpha_member": make_key(ksrv, "member", "alpha"),
        "beta_member": make_key(ksrv, "member", "beta"), "beta_builder": make_key(ksrv, "builder", "beta"),
        "hr_member": make_key(ksrv, "member", "hr"), "auditor": make_key(ksrv, "auditor", "alpha"),
        "alpha_scoped": make_key(ksrv, "member", "alpha", collections=["shared"]),
    }
    with ksrv.client(keys["alpha_builder"]) as a:
        assert a.post("/v1/collections", json={"name": "alpha-restricted", "classification": "restricted"}
                      ).status_code == 201
        assert a.post("/v1/collections", json={"name": "shared", "classification": "internal",
                                               "acl": {"read": {"teams": ["beta"]}}}).status_code == 201
        secret = upload(a, "alpha-restricted", {"merger.md": SECRET}).json()
        upload(a, "shared", {"handbook.md": HANDBOOK})
        sal = upload(a, "shared", {"salaries.md": SALARIES}, acl={"teams": ["alpha", "hr"]}).json()
    return {"keys": keys, "secret_doc": secret["items"][0]["document_id"], "secret_job": secret["id"],
            "salaries_doc": sal["items"][0]["document_id"]}


def as_(ksrv, world, who):
    return ksrv.client(world["keys"][who])


def sources(resp) -> set[str]:
    assert resp.status_code == 200, resp.text
    return {h["source"] for h in resp.json()["data"]}


def same_404(a, b, ref_a, ref_b):
    assert a.status_code == b.status_code == 404
    ja, jb = a.json(), b.json()
    assert ja["code"] == jb["code"]
    assert ja["detail"].replace(ref_a, "X") == jb["detail"].replace(ref_b, "X") and ja["fix"] == jb["fix"]


def test_collection_listing_and_counts_show_only_what_is_readable(ksrv, world):
    with as_(ksrv, world, "alpha_member") as c:
        listed = {x["name"]: x for x in c.get("/v1/collections").json()["data"]}
        assert set(listed) >= {"alpha-restricted", "shared"} and listed["shared"]["document_count"] == 2
    with as_(ksrv, world, "beta_member") as c:
        listed = {x["name"]: x for x in c.get("/v1/collections").json()["data"]}
        assert "alpha-restricted" not in listed
        assert listed["shared"]["document_count"] == 1 and listed["shared"]["writable"] is False
        one = c.get("/v1/collections/shared").json()
        assert one["document_count"] == 1 and one["chunk_count"] == 1
        assert {d["source"] for d in c.get("/v1/collections/shared/documents").json()["data"]} == {"handbook.md"}
    for who in ("hr_member", "auditor"):
        with as_(ksrv, world, who) as c:
            assert "shared" not in {x["name"] for x in c.get("/v1/collections").json()["data"]}


def test_unreadable_collection_is_indistinguishable_from_a_missing_one(ksrv, world):
    with as_(ksrv, world, "beta_member") as c:
        for path in ("/v1/collections/{}", "/v1/collections/{}/documents"):
            same_404(c.get(path.format("alpha-restricted")), c.get(path.format("no-such-thing")),
                     "alpha-restricted", "no-such-thing")
        same_404(c.post("/v1/search", json={"query": "zebracorn", "collections": ["alpha-restricted"]}),
                 c.post("/v1/search", json={"query": "zebracorn", "collections": ["no-such-thing"]}),
                 "alpha-restricted", "no-such-thing")
        same_404(c.post("/v1/answer", json={"question": "zebracorn?", "collections": ["alpha-restricted"]}),
                 c.post("/v1/answer", json={"question": "zebracorn?", "collections": ["no-such-thing"]}),
                 "alpha-restricted", "no-such-thing")
        same_404(c.post("/v1/search", json={"query": "x", "collections": ["shared", "alpha-restricted"]}),
                 c.post("/v1/search", json={"query": "x", "collections": ["shared", "nope"]}),
                 "alpha-restricted", "nope")
        same_404(c.get(f"/v1/documents/{world['secret_doc']}"), c.get("/v1/documents/doc_doesnotexist00000000"),
                 world["secret_doc"], "doc_doesnotexist00000000")
        same_404(c.get(f"/v1/documents/{world['salaries_doc']}"), c.get("/v1/documents/doc_doesnotexist00000000"),
                 world["salaries_doc"], "doc_doesnotexist00000000")
        same_404(c.get(f"/v1/jobs/{world['secret_job']}"), c.get("/v1/jobs/job_doesnotexist00000000"),
                 world["secret_job"], "job_doesnotexist00000000")


def test_search_and_answer_never_return_unreadable_chunks(ksrv, world):
    with as_(ksrv, world, "beta_member") as c:
        for query in ("zebracorn merger plan", "salary bands for engineers", "holiday policy"):
            for mode in ("hybrid", "bm25", "vector"):
                got = sources(c.post("/v1/search", json={"query": query, "mode": mode, "top_k": 20}))
                assert got <= {"handbook.md"}, (query, mode, got)
        ans = c.post("/v1/answer", json={"question": "When does the zebracorn merger close?"}).json()
        assert ans["found"] is False and ans["citations"] == [] and "zebracorn" not in str(ans).replace(
            "When does the zebracorn", "")
        filt = c.post("/v1/search", json={"query": "salary", "filters": {"source": "salaries.md"}, "mode": "bm25"})
        assert sources(filt) == set()
    with as_(ksrv, world, "alpha_member") as c:
        assert "merger.md" in sources(c.post("/v1/search", json={"query": "zebracorn merger plan"}))
        assert "salaries.md" in sources(c.post("/v1/search", json={"query": "salary bands", "collections": ["shared"]}))
    with as_(ksrv, world, "alpha_scoped") as c:
        assert "merger.md" not in sources(c.post("/v1/search", json={"query": "zebracorn merger plan"}))
        assert c.get("/v1/collections/alpha-restricted").status_code == 404


def test_hidden_data_does_not_change_what_others_see(ksrv, world):
    """Adding unreadable documents must not change a caller's hits, ranks or scores in any way."""
    body = {"query": "holiday policy leave days salary", "top_k": 10}
    with as_(ksrv, world, "beta_member") as c:
        before = c.post("/v1/search", json=body).json()["data"]
    with as_(ksrv, world, "alpha_builder") as a:
        upload(a, "alpha-restricted", {f"noise{i}.md": f"# Leave {i}\n\nholiday policy leave days salary "
                                                        f"holiday leave {i}\n".encode() for i in range(5)})
        upload(a, "shared", {"noise-private.md": b"# Leave\n\nholiday policy leave days salary holiday\n"},
               acl={"teams": ["alpha"]})
    with as_(ksrv, world, "beta_member") as c:
        after = c.post("/v1/search", json=body).json()["data"]
    strip = lambda hits: [(h["chunk_id"], h["ranks"], h["similarity"]) for h in hits]  # noqa: E731
    assert strip(after) == strip(before)


def test_writes_need_the_write_acl_and_role(ksrv, world):
    files = [("files", ("x.md", b"# X\n\nsome text here for the test"))]
    with as_(ksrv, world, "beta_member") as c:
        assert c.post("/v1/collections/shared/documents", files=files).status_code == 403
        assert c.post("/v1/collections/shared/hashes", json={"sources": ["salaries.md"]}).status_code == 403
        assert c.post("/v1/collections/alpha-restricted/documents", files=files).status_code == 404
        assert c.delete("/v1/collections/alpha-restricted").status_code == 404
        assert c.post("/v1/collections", json={"name": "mine", "classification": "internal"}).status_code == 403
    with as_(ksrv, world, "alpha_member") as c:
        assert c.post("/v1/collections/shared/documents", files=files).status_code == 403
    with as_(ksrv, world, "beta_builder") as c:
        assert c.post("/v1/collections/shared/documents", files=files).status_code == 403
        r = c.patch("/v1/collections/shared", json={"acl": {"read": {"teams": ["beta", "hr"]}}})
        assert r.status_code == 403
    with as_(ksrv, world, "alpha_builder") as c:
        assert c.post("/v1/collections/shared/documents", files=files).status_code == 202


def test_acl_change_takes_effect_at_once(ksrv, world):
    with as_(ksrv, world, "alpha_builder") as a:
        assert a.patch("/v1/collections/shared", json={"acl": {"read": {"teams": ["beta", "hr"]}}}).status_code == 200
    with as_(ksrv, world, "hr_member") as c:
        got = sources(c.post("/v1/search", json={"query": "salary bands holiday", "collections": ["shared"],
                                                 "top_k": 20}))
        assert "handbook.md" in got and "salaries.md" in got and "noise-private.md" not in got
    with as_(ksrv, world, "alpha_builder") as a:
        assert a.patch("/v1/collections/shared", json={"acl": {"read": {"teams": ["beta"]}}}).status_code == 200
    with as_(ksrv, world, "hr_member") as c:
        assert c.post("/v1/search", json={"query": "x", "collections": ["shared"]}).status_code == 404


def test_changed_upload_without_acl_keeps_the_documents_restriction(ksrv, world):
    with as_(ksrv, world, "alpha_builder") as a:
        job = upload(a, "shared", {"salaries.md": SALARIES + b"\nBands are reviewed every April.\n"}).json()
        assert job["items"][0]["status"] == "changed"
    with as_(ksrv, world, "beta_member") as c:
        assert "salaries.md" not in sources(c.post("/v1/search", json={"query": "salary bands reviewed April",
                                                                       "mode": "bm25"}))
    with as_(ksrv, world, "alpha_builder") as a:
        upload(a, "shared", {"salaries.md": SALARIES + b"\nBands are reviewed every April.\n"}, acl={})
    with as_(ksrv, world, "beta_member") as c:
        assert "salaries.md" in sources(c.post("/v1/search", json={"query": "salary bands reviewed April",
                                                                   "mode": "bm25"}))
