"""Evaluations: a JSONL dataset run against a real collection through the API and `keel eval run` (retrieval
recall@k, MRR, nDCG@10 computed from the hits Keel returns; answers through a registry prompt with exact match and
groundedness), stored, compared run to run, gated with --fail-under, and refused to other teams."""

from __future__ import annotations

import json

import pytest

from conftest import problem
from tests.fakes.openai_upstream import FakeOpenAI
from tests.knowledge.conftest import upload

pytestmark = pytest.mark.store

REPLY = "Paris is the capital of France."
DOCS = {
    "geo/france.md": b"# France\n\nParis is the capital of France. The Seine flows through Paris.\n",
    "geo/japan.md": b"# Japan\n\nTokyo is the capital of Japan. Mount Fuji is its highest peak.\n",
    "food/cheese.md": b"# Cheese\n\nBrie and Camembert are soft cheeses from France.\n",
}
ITEMS = [
    {"question": "What is the capital of France?", "expected_answer": REPLY, "relevant": ["geo/france.md"]},
    {"question": "Which mountain is the highest in Japan?", "relevant": [{"source": "geo/japan.md", "section": "Japan"}]},
    {"question": "Name a soft cheese", "expected_answer": "Brie", "relevant": ["food/cheese.md"]},
]


@pytest.fixture(scope="module")
def world(module_server_factory, tmp_path_factory):
    with FakeOpenAI(reply=REPLY) as fake:
        base = tmp_path_factory.mktemp("evals")
        (base / "keel.yaml").write_text(
            f"models:\n  - {{alias: fake, provider: openai_compatible, model: m, base_url: {fake.url}}}\n"
            f"  - {{alias: fake-embed, provider: openai_compatible, model: e, kind: embedding, base_url: {fake.url}}}\n")
        srv = module_server_factory(config=base / "keel.yaml")
        with srv.admin() as admin:
            for team in ("red", "blue"):
                assert admin.post("/admin/teams", json={"name": team}).status_code in (201, 409)
            keys = {n: admin.post("/admin/keys", json={"role": role, "team": team, "name": n}).json()["key"]
                    for n, role, team in (("builder", "builder", "red"), ("member", "member", "red"),
                                          ("blue", "builder", "blue"))}
        with srv.client(keys["builder"]) as b:
            r = b.post("/v1/collections", json={"name": "geo", "embedding_model": "fake-embed", "classification": "internal"})
            assert r.status_code == 201, r.text
            assert upload(b, "geo", DOCS).json()["status"] == "succeeded"
            r = b.post("/v1/prompts", json={"name": "qa", "labels": ["production"], "messages": [
                {"role": "system", "content": "Answer from these passages:\n{{ context }}"},
                {"role": "user", "content": "{{ question }}"}]})
            assert r.status_code == 201, r.text
        yield srv, keys, fake


def test_a_run_scores_retrieval_and_answers_and_is_stored(world):
    srv, keys, fake = world
    with srv.client(keys["builder"]) as b:
        r = b.post("/v1/evals/datasets", json={"name": "geo-qa", "items": "\n".join(json.dumps(i) for i in ITEMS)})
        assert r.status_code == 201 and r.json()["items"] == 3, r.text
        r = b.post("/v1/evals/runs", json={"dataset": "geo-qa", "collections": ["geo"], "mode": "bm25", "top_k": 3,
                                           "model": "fake", "prompt": "qa@production"})
        assert r.status_code == 201, r.text
        run = r.json()
        detail = b.get(f"/v1/evals/runs/{run['id']}").json()
    items = {i["id"]: i for i in detail["items"]}
    for item in items.values():  # each retrieval score, recomputed from the hits the run recorded
        assert item["hits"], item
    assert items["1"]["hits"][0] == "geo/france.md" and items["1"]["mrr"] == 1.0 and items["1"]["recall@k"] == 1.0
    assert items["1"]["exact_match"] == 1.0 and items["3"]["exact_match"] == 0.0
    assert items["1"]["groundedness"] == 1.0  # the reply's one sentence is in the France passage
    m = run["metrics"]
    assert m["exact_match"] == 0.5 and m["mrr"] == round(sum(i["mrr"] for i in items.values()) / 3, 4)
    assert 0 < m["ndcg@10"] <= 1 and "semantic_match" not in m
    prompted = [x["body"]["messages"] for x in fake.received if x["path"].endswith("/chat/completions")][-1]
    assert prompted[0]["content"].startswith("Answer from these passages:\n[1] ") and prompted[1]["role"] == "user"


def test_the_cli_runs_compares_and_gates(world, tmp_path):
    from typer.testing import CliRunner

    from keel.cli import app

    srv, keys, _ = world
    env = {"KEEL_URL": srv.url, "KEEL_API_KEY": keys["builder"]}
    data = tmp_path / "geo-cli.jsonl"
    data.write_text("\n".join(json.dumps(i) for i in ITEMS))
    first = CliRunner().invoke(app, ["eval", "run", str(data), "-c", "geo", "--mode", "bm25", "--json"], env=env)
    assert first.exit_code == 0, first.output
    a = json.loads(first.output)
    gated = CliRunner().invoke(app, ["eval", "run", "geo-cli", "-c", "geo", "--mode", "vector", "--json",
                                     "--fail-under", "mrr=1.01"], env=env)
    assert gated.exit_code == 1 and "below --fail-under: mrr" in gated.output
    b = json.loads(gated.output[:gated.output.rindex("}") + 1])
    with srv.client(keys["builder"]) as c:
        cmp = c.get("/v1/evals/compare", params={"a": a["id"], "b": b["id"]}).json()
    assert cmp["metrics"]["mrr"]["delta"] == round(b["metrics"]["mrr"] - a["metrics"]["mrr"], 4)
    shown = CliRunner().invoke(app, ["eval", "compare", a["id"], b["id"]], env=env)
    assert shown.exit_code == 0 and "ndcg@10" in shown.output and "items changed" in shown.output
    bad = CliRunner().invoke(app, ["eval", "run", "geo-cli", "--fail-under", "speed=3"], env=env)
    assert bad.exit_code == 1 and "METRIC=VALUE" in bad.output
    with srv.admin() as admin:  # every search fed the drift signals: its query vector and whether it found anything
        drift = {s["signal"]: s for s in admin.get("/v1/drift").json()["signals"]}
    assert drift["no_answer_rate"]["observations"] >= 6 and drift["query_embedding"]["observations"] >= 3


def test_other_teams_and_members_are_refused(world):
    srv, keys, _ = world
    with srv.client(keys["builder"]) as b:
        run = b.post("/v1/evals/runs", json={"dataset": "geo-qa", "collections": ["geo"], "mode": "bm25"}).json()
    with srv.client(keys["blue"]) as other:
        assert problem(other.get(f"/v1/evals/runs/{run['id']}"), 404)["code"] == "not_found"
        assert problem(other.post("/v1/evals/runs", json={"dataset": "geo-qa", "collections": ["geo"]}), 404)
        assert other.get("/v1/evals/runs").json()["data"] == []
        assert problem(other.post("/v1/evals/datasets", json={"name": "geo-qa", "items": ITEMS}), 409)
    with srv.admin() as a:  # a team-less admin's run shows what an admin's search found: not for a team
        hidden = a.post("/v1/evals/runs", json={"dataset": "geo-qa", "collections": ["geo"], "mode": "bm25"}).json()
    with srv.client(keys["member"]) as m:  # members read their team's runs, never start one
        assert m.get(f"/v1/evals/runs/{run['id']}").status_code == 200
        assert problem(m.get(f"/v1/evals/runs/{hidden['id']}"), 404)
        assert problem(m.post("/v1/evals/runs", json={"dataset": "geo-qa", "collections": ["geo"]}), 403)


@pytest.mark.parametrize("body, words", [
    ({"name": "x", "items": [{"question": "q"}]}, "expected_answer and/or relevant"),
    ({"name": "x", "items": "{not json"}, "line 1"),
    ({"name": "x", "items": [{"question": "q", "relevant": [5]}]}, "relevant entry"),
    ({"name": "x", "items": []}, "1 to 5000"),
    ({"name": "bad name", "items": ITEMS}, "not valid"),
])
def test_malformed_datasets_are_400s(world, body, words):
    srv, keys, _ = world
    with srv.client(keys["builder"]) as b:
        problem(b.post("/v1/evals/datasets", json=body), 400, words)


@pytest.mark.parametrize("body, words", [
    ({"dataset": "geo-qa"}, "collections"),
    ({"dataset": "geo-qa", "collections": ["geo"], "top_k": 0}, "top_k"),
    ({"dataset": "geo-qa", "collections": ["geo"], "prompt": "qa"}, "needs `model`"),
    ({"dataset": "geo-qa", "collections": ["geo"], "speed": 1}, "speed"),
])
def test_malformed_runs_are_400s(world, body, words):
    srv, keys, _ = world
    with srv.client(keys["builder"]) as b:
        problem(b.post("/v1/evals/runs", json=body), 400, words)


def test_the_eval_scores_a_ranking_as_bench_retrieval_does():
    """The dataset `bench/retrieval.py --export-faq-dev` writes (sections with their chunk counts) makes the eval's
    nDCG@10 and recall the bench's own `score` for the same ranked hits, so `keel eval run` reproduces the bench."""
    import random
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from retrieval import score  # noqa: E402

    from keel.observe.evals import parse_items, score_retrieval

    rng = random.Random(7)
    sections = [(f"faq/{f}.rst.txt", f"Question {i}") for f in ("general", "library") for i in range(1, 8)]
    n_chunks = {k: rng.randint(1, 4) for k in sections}
    for _ in range(200):
        relevant = set(rng.sample(sections, rng.randint(1, 2)))
        ranked = [rng.choice(sections) for _ in range(10)]
        item = parse_items([{"question": "q", "relevant": [
            {"source": s, "section": label, "chunks": n_chunks[(s, label)]} for s, label in sorted(relevant)]}])[0]
        hits = [{"source": s, "document_id": "doc_" + s, "section": f"FAQ > Part > {label}"} for s, label in ranked]
        ours = score_retrieval(hits, item["relevant"], 10)
        ndcg, recall = score(ranked, relevant, n_chunks)
        assert abs(ours["ndcg@10"] - ndcg) < 1e-12 and abs(ours["recall@k"] - recall) < 1e-12
