"""Policy on the answer path: a `restricted` collection's chunks never reach a non-local deployment,
through `/v1/answer` (streamed or not) and through fallbacks; `internal` data may."""

import httpx
import pytest

from tests.fakes.openai_upstream import FakeOpenAI
from tests.knowledge.conftest import upload

pytestmark = pytest.mark.store

DOC = b"# Payroll\n\nThe payroll run happens on the 25th of every month. Salaries are paid by bank transfer.\n"


@pytest.fixture(scope="module")
def cloud():
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture(scope="module")
def srv(kserver_factory, cloud, tmp_path_factory):
    cfg = tmp_path_factory.mktemp("cfg") / "keel.yaml"
    cfg.write_text(f"""
models:
  - {{alias: cloud, provider: openai_compatible, model: gpt-cloud, id: cloud/remote, base_url: {cloud.url}}}
aliases:
  local-first-cloud: {{fallbacks: [cloud]}}
""")
    srv = kserver_factory(KEEL_CONFIG=str(cfg))
    with srv.admin() as c:
        for name, level in (("payroll", "restricted"), ("handbook", "internal")):
            assert c.post("/v1/collections", json={"name": name, "classification": level}).status_code == 201
            assert upload(c, name, {"payroll.md": DOC}).json()["status"] == "succeeded"
    return srv


def test_restricted_chunks_never_reach_a_cloud_deployment(srv, cloud):
    before = cloud.stats()["requests"]
    with srv.admin() as c:
        for stream in (False, True):
            r = c.post("/v1/answer", json={"question": "When is the payroll run?", "collections": ["payroll"],
                                           "model": "cloud", "stream": stream})
            if stream and r.status_code == 200:  # the stream had begun (citations): the denial is its error event
                assert '"code":"policy_denied"' in r.text and '"type":"delta"' not in r.text
            else:
                assert r.status_code == 403, r.text
                assert r.json()["code"] == "policy_denied" and "restricted" in r.text
        assert cloud.stats()["requests"] == before, "restricted data was sent to the cloud deployment"
        ok = c.post("/v1/answer", json={"question": "When is the payroll run?", "collections": ["handbook"],
                                        "model": "cloud"})
        assert ok.status_code == 200, ok.text
        assert ok.json()["found"] and cloud.stats()["requests"] == before + 1


def test_restricted_answer_on_the_local_model_is_allowed(srv):
    with srv.admin() as c:
        r = c.post("/v1/answer", json={"question": "When is the payroll run?", "collections": ["payroll"],
                                       "max_tokens": 24}, timeout=httpx.Timeout(120))
    assert r.status_code == 200, r.text
    assert r.json()["citations"] and r.json()["citations"][0]["classification"] == "restricted"
