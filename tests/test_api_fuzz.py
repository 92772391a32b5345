"""Schemathesis over the running server's `/openapi.json`, once with a member key and once with an admin
key: whatever a caller sends, Keel never answers 5xx, and every answer fits the schema it declares.

Each role fuzzes its own server (the admin run may delete, revoke and reconfigure what it likes), backed by
the loopback fake upstream for the model aliases, so no local model generates. Bounded and repeatable:
a few derandomized examples per operation, valid and invalid, no shrinking.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings, strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.errors import FailureGroup
from schemathesis.specs.openapi.checks import response_schema_conformance

from conftest import KeelServer, fake_upstream

pytestmark = pytest.mark.store

EXAMPLES = 20  # per operation and role, valid and invalid data
TIME_BUDGET_S = 60  # per role; past it the remaining operations get one example each
CHECKS = [not_a_server_error, response_schema_conformance]

# Operations with a known failure in code this test's author does not own: still fuzzed, and still expected
# to pass; while they fail, they are reported as xfail with the finding (see the notes), not hidden.
KNOWN: dict[str, str] = {}


@pytest.fixture(scope="module")
def upstream():
    with fake_upstream() as root:
        yield root + "/v1"


def fuzz_config(tmp: Path, base_url: str) -> Path:
    """The default aliases (`local-chat`, `local-embed`) served by the fake upstream."""
    cfg = tmp / "keel.yaml"
    cfg.write_text(f"""
models:
  - {{alias: local-chat, provider: openai_compatible, model: gpt-fake, id: local-chat/fake, base_url: {base_url}}}
  - {{alias: local-embed, provider: openai_compatible, model: embed-fake, id: local-embed/fake, kind: embedding,
      base_url: {base_url}}}
""")
    return cfg


@pytest.fixture(scope="module")
def fuzz_server(module_server_factory, upstream, tmp_path_factory):
    """A fresh server per role: one run's deletions never disturb the other."""
    def make() -> KeelServer:
        return module_server_factory(config=fuzz_config(tmp_path_factory.mktemp("fuzzcfg"), upstream))
    return make


@dataclass
class Finding:
    operation: str
    request: str
    status: int
    body: str
    failures: list[str] = field(default_factory=list)

    def line(self) -> str:
        return f"{self.operation} → {self.status}: {'; '.join(self.failures)}\n  {self.request}\n  {self.body}"


def aimed(path: str):  # noqa: ANN201
    """Half the valid bodies that name a `model` name a served alias, so they travel the whole governed path
    to the fake upstream instead of stopping at "unknown model"."""
    alias = "local-embed" if path == "/v1/embeddings" else "local-chat"

    def choose(case):  # noqa: ANN001, ANN202
        if not isinstance(case.body, dict) or "model" not in case.body:
            return st.just(case)

        def aim(on: bool):  # noqa: ANN202
            if on:
                case.body["model"] = alias
            return case
        return st.booleans().map(aim)
    return choose


def fuzz(srv: KeelServer, key: str) -> tuple[list[Finding], int]:
    """Run every operation of the server's schema with `key`; the first failure per operation is a finding."""
    schema = schemathesis.openapi.from_url(srv.url + "/openapi.json", headers={"Authorization": f"Bearer {key}"})
    headers = {"Authorization": f"Bearer {key}"}
    findings: list[Finding] = []
    started, count = time.monotonic(), 0
    for path in schema:
        for method, operation in schema[path].items():
            label = f"{method.upper()} {path}"
            examples = EXAMPLES if time.monotonic() - started < TIME_BUDGET_S else 1
            strategy = st.one_of(operation.as_strategy(GenerationMode.POSITIVE).flatmap(aimed(path)),
                                 operation.as_strategy(GenerationMode.NEGATIVE))
            found: list[Finding] = []

            @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck),
                      print_blob=False)
            @given(case=strategy)
            def run(case) -> None:  # noqa: ANN001
                request = case.as_curl_command(headers={"Authorization": "Bearer …"})
                try:
                    response = case.call(base_url=srv.url, headers=headers, timeout=30)
                except Exception as exc:  # a dropped connection is a finding too
                    found.append(Finding(label, request, 0, "", [f"no response: {exc!r}"[:300]]))
                    raise
                try:
                    case.validate_response(response, checks=CHECKS, headers=headers)
                except FailureGroup as group:
                    found.append(Finding(label, request, response.status_code, response.text[:300],
                                         [f"{f.code} {f.title}" for f in group.exceptions]))
                    raise

            count += 1
            try:
                run()
            except (Exception, FailureGroup):  # what failed is in `found` (a FailureGroup is no Exception)
                if not found:
                    raise
                findings.append(found[0])
    return findings, count


def verdict(findings: list[Finding], role: str, count: int) -> None:
    unexpected = [f for f in findings if f.operation not in KNOWN]
    assert count > 50, f"only {count} operations in /openapi.json"
    assert not unexpected, f"{role}: {len(unexpected)} operations failed:\n" + "\n".join(f.line() for f in unexpected)
    if findings:
        pytest.xfail(f"{role}: known failures remain: " + "; ".join(f"{f.operation} ({KNOWN[f.operation]})"
                                                                   for f in findings))


def test_openapi_declares_the_bearer_key_and_problem_bodies(fuzz_server):
    srv = fuzz_server()
    spec = httpx.get(srv.url + "/openapi.json", headers={"Authorization": f"Bearer {srv.admin_key}"}).json()
    assert spec["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "description": spec["components"]["securitySchemes"]["bearerAuth"][
            "description"]}
    assert spec["security"] == [{"bearerAuth": []}]
    public = sorted(f"{m.upper()} {p}" for p, ops in spec["paths"].items() for m, op in ops.items()
                    if op.get("security") == [])
    assert public == ["GET /healthz", "GET /readyz", "POST /v1/workflows/{name}/webhook"]
    anonymous = httpx.get(srv.url + "/v1/collections")
    assert anonymous.status_code == 401 and anonymous.headers["content-type"].startswith("application/problem+json")
    assert "HTTPValidationError" not in spec["components"]["schemas"]


def test_fuzz_as_a_member_never_answers_5xx_or_outside_the_schema(fuzz_server):
    srv = fuzz_server()
    with srv.admin() as a:
        assert a.post("/admin/teams", json={"name": "fuzzers"}).status_code == 201
        r = a.post("/admin/keys", json={"role": "member", "team": "fuzzers", "name": "fuzz-member"})
        assert r.status_code == 201, r.text
    findings, count = fuzz(srv, r.json()["key"])
    verdict(findings, "member", count)


def test_fuzz_as_an_admin_never_answers_5xx_or_outside_the_schema(fuzz_server):
    srv = fuzz_server()
    findings, count = fuzz(srv, srv.admin_key)
    assert srv.admin().get("/v1/me").status_code == 200, "the admin run must not lock itself out"
    verdict(findings, "admin", count)
