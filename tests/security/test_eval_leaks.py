"""Attacks on evaluation runs: a run stores what its starter's search found (sources, answers drawn from the
passages), so a teammate who may not read those collections must not read them through the run."""

from __future__ import annotations

import json

import pytest

from tests.fakes.openai_upstream import FakeOpenAI
from tests.knowledge.conftest import upload

pytestmark = pytest.mark.store
REPLY = "The merger code name is BLUEBIRD."


@pytest.fixture(scope="module")
def world(module_server_factory, tmp_path_factory):
    with FakeOpenAI(reply=REPLY) as fake:
        base = tmp_path_factory.mktemp("security-evals")
        (base / "keel.yaml").write_text(
            f"models:\n  - {{alias: fake, provider: openai_compatible, model: m, base_url: {fake.url}}}\n"
            f"  - {{alias: fake-embed, provider: openai_compatible, model: e, kind: embedding, base_url: {fake.url}}}\n")
        srv = module_server_factory(config=base / "keel.yaml")
        with srv.admin() as admin:
            for team in ("red", "legal"):
                assert admin.post("/admin/teams", json={"name": team}).status_code in (201, 409)
            keys = {n: admin.post("/admin/keys", json={"role": role, "team": "red", "name": n}).json()["key"]
                    for n, role in (("builder", "builder"), ("member", "member"))}
            # legal's deal room: readable by builders of any team, not by members
            r = admin.post("/v1/collections", json={"name": "deals", "classification": "internal", "owner_team": "legal",
                                                    "embedding_model": "fake-embed",
                                                    "acl": {"read": {"roles": ["builder"]}}})
            assert r.status_code == 201, r.text
            assert upload(admin, "deals", {"deals/bluebird-merger.md": b"# Bluebird\n\nThe merger code name is "
                                                                        b"BLUEBIRD, closing in March.\n"}
                          ).json()["status"] == "succeeded"
        yield srv, keys


def test_a_teammate_who_cannot_read_the_collection_never_reads_it_through_a_run(world):
    srv, keys = world
    with srv.client(keys["member"]) as m:
        r = m.post("/v1/search", json={"query": "merger code name", "collections": ["deals"]})
        assert r.status_code == 404 or r.json()["data"] == [], r.text  # the member may not read `deals`
    with srv.client(keys["builder"]) as b:
        items = [{"question": "What is the merger code name?", "relevant": ["deals/bluebird-merger.md"]}]
        assert b.post("/v1/evals/datasets", json={"name": "deal-qa", "items": "\n".join(map(json.dumps, items))}
                      ).status_code == 201
        r = b.post("/v1/evals/runs", json={"dataset": "deal-qa", "collections": ["deals"], "mode": "bm25",
                                           "model": "fake"})
        assert r.status_code == 201, r.text
        run = r.json()["id"]
        mine = b.get(f"/v1/evals/runs/{run}").json()
        assert mine["items"][0]["hits"] == ["deals/bluebird-merger.md"]  # the starter sees its run
    with srv.client(keys["member"]) as m:
        seen = m.get(f"/v1/evals/runs/{run}")
        listed = m.get("/v1/evals/runs").text
        compared = m.get(f"/v1/evals/compare?a={run}&b={run}")
    for text in (seen.text, listed, compared.text):
        assert "bluebird-merger" not in text and "BLUEBIRD" not in text, text[:400]
