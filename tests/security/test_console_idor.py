"""Console pages reached by URL with another team's names and ids (IDOR): another team's collection, its upload
form, its ingest job, its agent and the agent's kill switch behave as if they did not exist, and a teammate
without write or change rights is refused — exactly as the API answers."""

from __future__ import annotations

import re

import httpx
import pytest

from tests.fakes.openai_upstream import FakeOpenAI
from tests.knowledge.conftest import upload

pytestmark = pytest.mark.store
AGENT = "name: red-bot\nmodel: fake\ngoal: help\ntools:\n  notify: {allow_recipients: ['*@acme.example']}\n"


@pytest.fixture(scope="module")
def world(module_server_factory, tmp_path_factory):
    with FakeOpenAI(reply="ok") as fake:
        base = tmp_path_factory.mktemp("security-idor")
        (base / "keel.yaml").write_text(
            f"models:\n  - {{alias: fake, provider: openai_compatible, model: m, base_url: {fake.url}}}\n"
            f"  - {{alias: fake-embed, provider: openai_compatible, model: e, kind: embedding, base_url: {fake.url}}}\n")
        srv = module_server_factory(config=base / "keel.yaml")
        with srv.admin() as admin:
            for team in ("red", "blue"):
                assert admin.post("/admin/teams", json={"name": team}).status_code in (201, 409)
            keys = {n: admin.post("/admin/keys", json={"role": role, "team": team, "name": n}).json()["key"]
                    for n, role, team in (("red-builder", "builder", "red"), ("red-member", "member", "red"),
                                          ("blue-builder", "builder", "blue"), ("blue-member", "member", "blue"),
                                          ("no-team", "builder", None))}
        with srv.client(keys["red-builder"]) as b:
            assert b.post("/v1/collections", json={"name": "red-notes", "embedding_model": "fake-embed",
                                                   "classification": "internal"}).status_code == 201
            job = upload(b, "red-notes", {"plans/q1.md": b"# Q1\n\nThe red team's secret plan.\n"}).json()
            assert job["status"] == "succeeded", job
            r = b.post("/v1/agents", content=AGENT, headers={"content-type": "application/yaml"})
            assert r.status_code in (200, 201), r.text
        yield srv, keys, job["id"]


def _session(srv, key: str) -> tuple[httpx.Client, str]:
    c = httpx.Client(base_url=srv.url)
    csrf = re.search(r'name="csrf" value="([^"]+)"', c.get("/console/sign-in").text).group(1)
    assert c.post("/console/sign-in", data={"csrf": csrf, "key": key}).status_code == 303
    page = c.get("/console/overview")
    return c, re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)


@pytest.mark.parametrize("who", ["blue-builder", "blue-member", "no-team"])
def test_another_teams_things_are_not_found_by_url(world, who):
    srv, keys, job = world
    c, csrf = _session(srv, keys[who])
    try:
        for path in ("/console/knowledge/red-notes", f"/console/knowledge/jobs/{job}", "/console/agents/red-bot",
                     "/console/knowledge/red-notes?q=secret+plan"):
            r = c.get(path)
            assert r.status_code == 404 and "secret plan" not in r.text and "plans/q1.md" not in r.text, (path, r.status_code)
        r = c.post("/console/knowledge/red-notes/upload", data={"csrf": csrf},
                   files={"files": ("evil.md", b"# Evil\n\nplanted\n", "text/markdown")})
        assert r.status_code in (403, 404), r.status_code
        r = c.post("/console/agents/red-bot/switch", data={"csrf": csrf, "paused": "true", "reason": "x"})
        assert r.status_code in (403, 404), r.status_code
    finally:
        c.close()
    with srv.client(keys["red-builder"]) as b:
        assert [d["source"] for d in b.get("/v1/collections/red-notes/documents").json()["data"]] == ["plans/q1.md"]
        assert b.get("/v1/agents/red-bot").json().get("paused") is not True


def test_a_teammate_without_rights_changes_nothing(world):
    srv, keys, _job = world
    c, csrf = _session(srv, keys["red-member"])
    try:
        assert c.get("/console/knowledge/red-notes").status_code == 200  # may read
        r = c.post("/console/knowledge/red-notes/upload", data={"csrf": csrf},
                   files={"files": ("evil.md", b"# Evil\n\nplanted\n", "text/markdown")})
        assert r.status_code == 403, r.status_code
        r = c.post("/console/agents/red-bot/switch", data={"csrf": csrf, "paused": "true", "reason": "x"})
        assert r.status_code == 403, r.status_code
        r = c.post("/console/knowledge", data={"csrf": csrf, "name": "member-made", "classification": "internal",
                                               "embedding_model": "fake-embed"})
        assert r.status_code == 403, r.status_code
    finally:
        c.close()
    with srv.client(keys["red-builder"]) as b:
        assert len(b.get("/v1/collections/red-notes/documents").json()["data"]) == 1
        assert b.get("/v1/agents/red-bot").json().get("paused") is not True
