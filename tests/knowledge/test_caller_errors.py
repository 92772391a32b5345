"""Caller mistakes on the knowledge API answer a typed 4xx naming the field and the fix, never a 5xx:
objects or lists where team and role names belong in a collection's or a document's ACL, unknown ACL
keys, and filters or weights of the wrong shape."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from conftest import KeelServer, problem

pytestmark = pytest.mark.store


@pytest.fixture(scope="module")
def srv(module_server_factory) -> KeelServer:
    return module_server_factory()


@pytest.fixture(scope="module")
def admin(srv: KeelServer) -> httpx.Client:
    with srv.admin() as c:
        assert c.post("/admin/teams", json={"name": "red"}).status_code in (201, 409)
        assert c.post("/v1/collections", json={"name": "acl-target", "classification": "internal",
                                               "owner_team": "red"}).status_code == 201
        yield c


BAD_COLLECTION_ACLS = [
    ({"read": {"teams": [{"name": "red"}]}}, "acl.read.teams.0"),
    ({"write": {"roles": [["member"]]}}, "acl.write.roles.0"),
    ({"read": {"teams": "red"}}, "acl.read.teams"),
    ({"read": ["red"]}, "acl.read"),
    ({"readers": {"teams": ["red"]}}, "acl.readers"),
]


@pytest.mark.parametrize("acl, field", BAD_COLLECTION_ACLS)
def test_a_collection_acl_with_objects_where_names_belong_is_a_422_naming_the_field(admin, acl, field):
    problem(admin.post("/v1/collections", json={"name": "acl-bad", "classification": "internal", "acl": acl}),
            422, field)
    problem(admin.patch("/v1/collections/acl-target", json={"acl": acl}), 422, field)


BAD_DOCUMENT_ACLS = [
    ({"teams": [{"name": "red"}]}, "acl.teams.0"),
    ({"roles": [["member"]]}, "acl.roles.0"),
    ({"teams": "red"}, "acl.teams"),
    ({"teams": [None]}, "acl.teams.0"),
    ({"team": ["red"]}, "acl.team"),
]


@pytest.mark.parametrize("acl, field", BAD_DOCUMENT_ACLS)
def test_a_document_acl_with_objects_where_names_belong_is_a_4xx_naming_the_field(admin, acl, field):
    r = admin.post("/v1/collections/acl-target/documents", files=[("files", ("a.md", b"# A\n\nhello\n"))],
                   data={"acl": json.dumps(acl)})
    problem(r, 422, field)


def test_a_document_acl_of_names_is_still_accepted(admin):
    r = admin.post("/v1/collections/acl-target/documents", files=[("files", ("a.md", b"# A\n\nhello\n"))],
                   data={"acl": json.dumps({"teams": ["red"], "roles": ["member"]})})
    assert r.status_code == 202, r.text


def nested(depth: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for _ in range(depth):
        out = {"a": out}
    return out


def test_metadata_nested_past_any_use_is_a_422_and_never_stored(admin):
    """Metadata so deep that no answer could carry it once broke every later listing of collections."""
    problem(admin.post("/v1/collections", json={"name": "deep-meta", "classification": "internal",
                                                "metadata": nested(300)}), 422, "metadata")
    r = admin.post("/v1/collections/acl-target/documents", files=[("files", ("d.md", b"# D\n\nhello\n"))],
                   data={"metadata": json.dumps(nested(300))})
    problem(r, 422, "metadata")
    assert admin.get("/v1/collections").status_code == 200
    assert admin.get("/v1/collections/deep-meta").status_code == 404
    ok = admin.post("/v1/collections", json={"name": "meta-ok", "classification": "internal",
                                             "metadata": {"owner": "ops", "tags": ["a", 1, True], "more": nested(5)}})
    assert ok.status_code == 201, ok.text


def test_an_embedding_model_name_longer_than_the_store_holds_is_a_422(admin):
    """SQLite stores any length; PostgreSQL refuses, which was a 500 there."""
    problem(admin.post("/v1/collections", json={"name": "long-model", "classification": "internal",
                                                "embedding_model": "m" * 300}), 422, "embedding_model")
