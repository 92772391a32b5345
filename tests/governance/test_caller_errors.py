"""Caller mistakes on the governance and admin endpoints answer a typed 4xx that names the field and
the fix — never a 5xx: out-of-range numbers in queries and paths, nested JSON where a name belongs,
an unknown provider for a deployment."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from conftest import KeelServer, problem

pytestmark = pytest.mark.store

HUGE = 2**70


@pytest.fixture(scope="module")
def srv(module_server_factory) -> KeelServer:
    return module_server_factory()


@pytest.fixture(scope="module")
def admin(srv: KeelServer) -> httpx.Client:
    with srv.admin() as c:
        yield c


def test_audit_paging_past_any_sequence_number_is_a_422_naming_the_parameter(admin):
    for param in ("before", "after"):
        problem(admin.get("/v1/audit", params={param: HUGE}), 422, param)
        problem(admin.get("/v1/audit", params={param: -1}), 422, param)
    problem(admin.get("/v1/audit", params={"limit": HUGE}), 422, "limit")
    assert admin.get("/v1/audit", params={"before": 2**63 - 1, "limit": 5}).status_code == 200


def test_numbers_in_other_governance_queries_and_paths_are_bounded(admin):
    problem(admin.get(f"/admin/policy/versions/{HUGE}"), 422, "version")
    problem(admin.get(f"/admin/policy/versions/{2**31}"), 422, "version")  # a 32-bit column in PostgreSQL
    problem(admin.get("/v1/reviews", params={"limit": HUGE}), 422, "limit")
    problem(admin.get("/v1/guard-events", params={"limit": -5}), 422, "limit")
    assert admin.get("/admin/policy/versions/1").status_code in (200, 404)


@pytest.mark.parametrize("body, field", [
    ({"model": "m", "collections": [{"id": "hr", "classification": ["restricted", ["public"]]}]},
     "collections.0.classification"),
    ({"model": "m", "collections": [[{"id": "hr"}]]}, "collections.0"),
    ({"model": "m", "collections": [{"id": ["hr"], "classification": "public"}]}, "collections.0.id"),
    ({"model": "m", "collections": [{"id": "hr", "classification": "public", "extra": 1}]}, "collections.0.extra"),
    ({"model": "m", "use_case": ["a", ["b"]]}, "use_case"),
    ({"model": "m", "classification": [["restricted"]]}, "classification"),
])
def test_policy_test_with_nested_lists_is_a_422_naming_the_field(admin, body, field):
    problem(admin.post("/v1/policy/test", json=body), 422, field)


def test_policy_test_with_an_unknown_classification_is_a_400_naming_it(admin):
    body = {"model": "m", "collections": [{"id": "hr", "classification": "top-secret"}]}
    problem(admin.post("/v1/policy/test", json=body), 400, "top-secret")
    ok = admin.post("/v1/policy/test", json={"model": "m", "collections": [{"id": "hr", "classification": "public"}]})
    assert ok.status_code == 200, ok.text


def test_an_unknown_provider_for_a_deployment_is_a_422_naming_the_provider(admin):
    body = {"alias": "x", "provider": "no-such-provider", "model": "m"}
    err = problem(admin.post("/admin/deployments", json=body), 422, "provider", "no-such-provider")
    assert "openai_compatible" in err["fix"]
    ok = admin.post("/admin/deployments", json={"alias": "x", "provider": "openai_compatible", "model": "m",
                                                "id": "x/ok", "base_url": "http://127.0.0.1:9/v1"})
    assert ok.status_code == 201, ok.text
    problem(admin.put("/admin/deployments/x/ok", json={"provider": "no-such-provider"}), 422, "no-such-provider")
    problem(admin.put("/admin/deployments/x/ok", json={"provider": ["openai_compatible"]}), 422, "provider")
    assert admin.delete("/admin/deployments/x/ok").status_code == 204


def test_deployment_options_nested_past_any_use_are_a_422_and_never_stored(admin):
    """Options so deep that no answer could carry them once broke every later listing of deployments."""
    deep: dict[str, Any] = {}
    for _ in range(300):
        deep = {"a": deep}
    body = {"alias": "deep", "provider": "openai_compatible", "id": "deep/x", "options": deep}
    problem(admin.post("/admin/deployments", json=body), 422, "options")
    listed = admin.get("/admin/deployments")
    assert listed.status_code == 200 and "deep/x" not in {d["id"] for d in listed.json()["data"]}


@pytest.mark.parametrize("field, value", [("id", "x/" + "y" * 400), ("alias", "a" * 300)])
def test_deployment_names_longer_than_the_store_holds_are_a_422(admin, field, value):
    """SQLite stores any length; PostgreSQL refuses, which was a 500 there."""
    body = {"alias": "long", "provider": "openai_compatible", "id": "long/x", field: value}
    problem(admin.post("/admin/deployments", json=body), 422, field)
