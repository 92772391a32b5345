"""`GET /v1/responses/{id}` (and a continuation's `previous_response_id`) for a response that exists but belongs
to another team answers exactly as for one that does not exist: the same 404 bytes, and the same store work —
the row is looked up with the caller's visibility in the query, so another team's row is never read, decoded
or waited for differently (a foreign id used to answer at once, an unknown one after two flush intervals: a
timing oracle for which ids exist)."""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa

from keel.core.db import Store
from keel.core.errors import NotFound
from keel.gateway.ingress.response_store import ResponseStore
from keel.identity.principal import Principal
from tests.fakes.openai_upstream import FakeOpenAI

pytestmark = pytest.mark.store
RED = Principal(key_id="key_red", role="member", team_id="team_red")
BLUE = Principal(key_id="key_blue", role="member", team_id="team_blue")
LONER = Principal(key_id="key_loner", role="member")


def _response(rid: str, text: str) -> dict:
    return {"id": rid, "object": "response", "model": "fake", "created_at": 1e9 + 1, "output": [{"text": text}]}


def test_a_foreign_and_an_unknown_id_read_the_store_alike(db_url):
    """Guards: the foreign row found and refused at once (one read, no wait), the unknown id waited for (two
    reads and two flush intervals) — and a not-yet-written foreign row refused from memory without a read."""
    store = Store.open(db_url)
    store.upgrade()
    reads: list[str] = []

    @sa.event.listens_for(store.engine, "before_cursor_execute")
    def _count(conn, cursor, statement, params, context, executemany):  # noqa: ANN001
        if "responses" in statement and statement.lstrip().upper().startswith("SELECT"):
            reads.append(statement)

    async def run() -> None:
        rs = ResponseStore(store, interval=0.01, retention_days=0)
        rs.record(RED, _response("resp_red1", "red's secret " * 2000), [{"role": "user", "content": "x"}])
        rs.record(LONER, _response("resp_lone", "mine"), [])
        await rs.flush()
        rs.record(RED, _response("resp_red2", "not yet written"), [])  # held in memory until the next flush
        problems, counts = [], []
        for who, rid in ((BLUE, "resp_red1"), (BLUE, "resp_nope"), (BLUE, "resp_red2"), (RED, "resp_lone")):
            reads.clear()
            with pytest.raises(NotFound) as err:
                await rs.get(who, rid)
            problems.append(err.value.to_problem("req_x"))
            counts.append(len(reads))
        assert counts[0] == counts[1] == counts[2] == counts[3] >= 1, counts
        assert {p["detail"].replace(p["response_id"], "ID") for p in problems} == {"response 'ID' not found"}
        assert len({str(sorted((k, v) for k, v in p.items() if k not in ("detail", "response_id", "error")))
                    for p in problems}) == 1
        assert (await rs.get(RED, "resp_red1"))["response"]["output"][0]["text"].startswith("red's secret")
        assert (await rs.get(RED, "resp_red2"))["response"]["id"] == "resp_red2"
        assert (await rs.get(LONER, "resp_lone"))["key_id"] == "key_loner"
        await rs.flush()

    asyncio.run(run())
    store.dispose()


@pytest.fixture(scope="module")
def srv(module_server_factory, tmp_path_factory):
    with FakeOpenAI() as fake:
        base = tmp_path_factory.mktemp("responses-oracle")
        (base / "keel.yaml").write_text(
            f"models:\n  - {{alias: fake, provider: openai_compatible, model: m, base_url: {fake.url}}}\n")
        s = module_server_factory(config=base / "keel.yaml")
        with s.admin() as a:
            for team in ("red", "blue"):
                assert a.post("/admin/teams", json={"name": team}).status_code in (201, 409)
            keys = {t: a.post("/admin/keys", json={"role": "member", "team": t}).json()["key"]
                    for t in ("red", "blue")}
        yield s, keys


def test_the_two_404s_are_the_same_bytes(srv):
    s, keys = srv
    with s.client(keys["red"]) as red, s.client(keys["blue"]) as blue:
        made = red.post("/v1/responses", json={"model": "fake", "input": "red's plans"})
        assert made.status_code == 200, made.text
        rid = made.json()["id"]
        unknown = rid[:-4] + ("aaaa" if not rid.endswith("aaaa") else "bbbb")
        a, b = blue.get(f"/v1/responses/{rid}"), blue.get(f"/v1/responses/{unknown}")
        assert a.status_code == b.status_code == 404
        strip = [(r.content.replace(r.headers["x-request-id"].encode(), b"REQ").replace(i.encode(), b"ID"))
                 for r, i in ((a, rid), (b, unknown))]
        assert strip[0] == strip[1]
        assert {k: v for k, v in a.headers.items() if k not in ("x-request-id", "date", "content-length")} == \
               {k: v for k, v in b.headers.items() if k not in ("x-request-id", "date", "content-length")}
        for body in ({"model": "fake", "input": "go on", "previous_response_id": rid},
                     {"model": "fake", "input": "go on", "previous_response_id": unknown}):
            assert blue.post("/v1/responses", json=body).status_code == 404
        assert red.get(f"/v1/responses/{rid}").status_code == 200
