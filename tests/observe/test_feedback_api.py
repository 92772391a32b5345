"""`POST /v1/feedback`: stored against the call it judges (by request id, chat completion id or run id), only
by someone who may see that call (others get the 404 an unknown id gets), counted in usage reports, and
every malformed body a 400 that says what to send."""

from __future__ import annotations

import httpx
import pytest
import sqlalchemy as sa

from conftest import fake_upstream, problem

pytestmark = pytest.mark.store


class World:
    def __init__(self, srv) -> None:
        self.srv = srv
        admin = srv.admin()
        for team in ("red", "blue"):
            assert admin.post("/admin/teams", json={"name": team}).status_code in (201, 409)
        self.keys = {name: admin.post("/admin/keys", json={"role": role, "team": team, "name": name}).json()
                     for name, role, team in (("red_a", "member", "red"), ("red_b", "member", "red"),
                                              ("red_builder", "builder", "red"), ("blue", "member", "blue"),
                                              ("auditor", "auditor", None))}
        self.calls = {}
        for name, meta in (("red_a", {"use_case": "support"}), ("red_b", {}),
                           ("red_a_run", {"use_case": "workflow:lead_intake", "task_id": "run_fb1"})):
            key = self.keys[name.removesuffix("_run")]["key"]
            r = httpx.post(srv.url + "/v1/chat/completions", timeout=30, headers={"Authorization": f"Bearer {key}"},
                           json={"model": "fake", "messages": [{"role": "user", "content": "hi"}], "metadata": meta})
            assert r.status_code == 200, r.text
            self.calls[name] = r

    def client(self, name: str) -> httpx.Client:
        return self.srv.client(self.keys[name]["key"])


@pytest.fixture(scope="module")
def world(module_server_factory, tmp_path_factory):
    with fake_upstream() as upstream:
        cfg = tmp_path_factory.mktemp("fb") / "keel.yaml"
        cfg.write_text(f"models:\n  - {{alias: fake, provider: openai_compatible, model: m, base_url: {upstream}/v1}}\n"
                       "ledger_flush_interval_s: 5\n")  # slow on purpose: feedback must find unflushed calls too
        yield World(module_server_factory(config=cfg))


def stored(srv, where: str) -> list:
    engine = sa.create_engine(srv.extra["db_url"])
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text(f"SELECT * FROM feedback WHERE {where}")).all()
    finally:
        engine.dispose()


def test_feedback_is_stored_on_the_call_and_shows_in_reports(world):
    rid = world.calls["red_a"].headers["x-request-id"]
    r = world.client("red_a").post("/v1/feedback", json={"request_id": rid, "score": 1, "label": "helpful",
                                                         "comment": "spot on", "correction": "Hello!"})
    assert r.status_code == 201, r.text
    got = r.json()
    assert got["request_id"] == rid and got["subject"] == {"kind": "request", "id": rid} and got["score"] == 1.0
    chatcmpl = world.calls["red_a"].json()["id"]  # the id the OpenAI SDK shows its user
    r = world.client("red_builder").post("/v1/feedback", json={"request_id": chatcmpl, "score": -1})
    assert r.status_code == 201 and r.json()["request_id"] == rid, r.text
    row, = stored(world.srv, f"request_id = '{rid}' AND label = 'helpful'")
    assert (row.comment, row.correction, row.key_id) == ("spot on", "Hello!", world.keys["red_a"]["id"])

    rep = world.client("red_a").get("/v1/usage", params={"group_by": "use_case"}).json()
    support, = [g for g in rep["data"] if g["use_case"] == "support"]
    assert support["feedback_count"] == 2 and support["feedback_avg_score"] == 0.0


def test_feedback_on_a_run_is_anchored_to_its_first_call(world):
    r = world.client("red_a").post("/v1/feedback", json={"run_id": "run_fb1", "label": "wrong_company"})
    assert r.status_code == 201, r.text
    assert r.json()["request_id"] == world.calls["red_a_run"].headers["x-request-id"]
    assert r.json()["subject"] == {"kind": "run", "id": "run_fb1"}
    problem(world.client("red_a").post("/v1/feedback", json={"run_id": "run_nope", "score": 1}), 404, "run_nope")


def test_only_who_may_see_the_call_may_judge_it(world):
    """Another member of the team, another team and an unknown id all get the same 404; an auditor may read
    reports but not write feedback."""
    rid = world.calls["red_a"].headers["x-request-id"]
    for name in ("red_b", "blue"):
        body = problem(world.client(name).post("/v1/feedback", json={"request_id": rid, "score": 1}), 404, rid)
        unknown = problem(world.client(name).post("/v1/feedback", json={"request_id": "req_nope", "score": 1}), 404)
        assert body["code"] == unknown["code"] == "not_found" and body["fix"] == unknown["fix"]
    problem(world.client("auditor").post("/v1/feedback", json={"request_id": rid, "score": 1}), 403, "feedback.write")
    assert stored(world.srv, f"key_id IN ('{world.keys['red_b']['id']}', '{world.keys['blue']['id']}')") == []


@pytest.mark.parametrize("body, names", [
    ({"score": 1}, ["exactly one"]),
    ({"request_id": "a", "run_id": "b", "score": 1}, ["exactly one"]),
    ({"request_id": "x"}, ["score, label"]),
    ({"request_id": "x", "score": "great"}, ["score"]),
    ({"request_id": "x", "score": 1000}, ["score"]),
    ({"request_id": "x", "score": True}, ["score"]),
    ({"request_id": "x", "label": "l" * 101}, ["label"]),
    ({"request_id": "x", "label": 5}, ["label"]),
    ({"request_id": "", "score": 1}, ["request_id"]),
    ({"request_id": ["x"], "score": 1}, ["request_id"]),
    ({"request_id": "x", "score": 1, "rating": 5}, ["rating"]),
    ({"request_id": "x\u0000y", "score": 1}, ["request_id"]),
    ({"request_id": "x", "comment": "a\u0000b"}, ["NUL"]),
    (["request_id"], ["JSON object"]),
])
def test_malformed_feedback_is_a_400_with_a_fix(world, body, names):
    problem(world.client("red_a").post("/v1/feedback", json=body), 400, *names)


def test_not_json_and_oversized_bodies(world):
    c = world.client("red_a")
    assert problem(c.post("/v1/feedback", content=b"{nope"), 400)["code"] == "malformed_json"
    big = {"request_id": world.calls["red_a"].headers["x-request-id"], "correction": "x" * 300_000}
    problem(c.post("/v1/feedback", json=big), 400, "KiB")
    assert httpx.post(world.srv.url + "/v1/feedback", json={"request_id": "x", "score": 1}).status_code == 401


def test_feedback_on_an_answer_finds_its_model_call(world):
    """`/v1/answer` meters its model call as `<answer id>/answer`: the answer id the caller holds finds it."""
    engine = sa.create_engine(world.srv.extra["db_url"])
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(
                "INSERT INTO usage_ledger (request_id, ts, key_id, team_id, kind, alias, status, use_case, task_id) "
                "VALUES ('req_ans1/answer', CURRENT_TIMESTAMP, :key, :team, 'chat', 'fake', 'ok', 'knowledge.answer', "
                "'req_ans1')"), {"key": world.keys["red_a"]["id"], "team": world.keys["red_a"].get("team_id")})
    finally:
        engine.dispose()
    r = world.client("red_a").post("/v1/feedback", json={"answer_id": "req_ans1", "score": 0.5, "label": "cited"})
    assert r.status_code == 201, r.text
    assert r.json()["request_id"] == "req_ans1/answer" and r.json()["subject"] == {"kind": "answer", "id": "req_ans1"}
    problem(world.client("blue").post("/v1/feedback", json={"answer_id": "req_ans1", "score": 1}), 404)
