"""Hybrid search's final arrangement of the fused top 30 (issue 24): a chunk holding more of the question's
terms moves up (query-term coverage), and the chunks of one section follow that section's best chunk, so a
section that answers in several chunks is read together instead of being split by other documents."""

from __future__ import annotations

import pytest

from keel.knowledge import arrange
from keel.knowledge.acl import Collection
from keel.knowledge.hits import Hit

C = Collection("c1", "docs", "internal", None, "local-embed", 384)


def hit(cid: int, doc: str, section: str, text: str, score: float) -> Hit:
    return Hit(cid, doc, C, "T", f"{doc}.md", "md", section, None, 0, len(text), text, score)


def test_coverage_counts_the_questions_terms_stemmed_without_stop_words():
    terms = arrange.terms("How do I convert strings to numbers?")
    assert terms == ["convert", "str", "number"]
    assert arrange.coverage(terms, "Converting a string: int('3') gives a number.") == pytest.approx(1.0)
    assert arrange.coverage(terms, "A number.") == pytest.approx(1 / 3)
    assert arrange.coverage([], "anything") == 0.0


def test_a_chunk_with_the_questions_terms_overtakes_a_slightly_better_fused_one():
    hits = [hit(1, "a", "A", "Loops repeat a block of code.", 0.10),
            hit(2, "b", "B", "To convert a string to a number call int().", 0.09)]
    out = arrange.arrange(hits, "How do I convert a string to a number?")
    assert [h.chunk_id for h in out] == [2, 1]
    assert out[0].score == pytest.approx(0.09 + arrange.COVERAGE_WEIGHT)  # the score says why it ranks first
    assert out[1].score == pytest.approx(0.10)


def test_chunks_of_one_section_follow_its_best_chunk_and_nothing_is_added_or_lost():
    hits = [hit(1, "a", "FAQ > Q1", "first part", 0.5), hit(2, "b", "Tutorial", "other", 0.4),
            hit(3, "a", "FAQ > Q2", "another question", 0.3), hit(4, "a", "FAQ > Q1", "second part", 0.2)]
    out = arrange.arrange(hits, "zzz", weight=0.0)
    assert [h.chunk_id for h in out] == [1, 4, 2, 3]
    many = [hit(i, f"d{i % 7}", "S", "x", 1.0 - i / 100) for i in range(60)]
    got = arrange.arrange(many, "zzz", depth=30)
    assert sorted(h.chunk_id for h in got) == list(range(60))
    assert [h.chunk_id for h in got[30:]] == list(range(30, 60))  # below the depth the fused order stays


def _corpus() -> dict[str, bytes]:
    first = ("When a parent reads a child process's output through pipes, a large output fills the pipe buffer "
             "and both sides block until the other reads.")
    filler = ["Appendix: " + " ".join(f"item{i}{j}" for j in range(90)) for i in range(3)]  # no question words
    long_section = "\n\n".join([first, *filler])
    files = {"dev/handbook.md": f"# Handbook\n\n## Notes\n\n{long_section}\n".encode()}
    for i in range(12):
        files[f"misc/topic{i}.md"] = (f"# Topic {i}\n\n## Part one\n\nNotes on subject {i}: gardening, tea and "
                                      f"trains, number {i}.\n\n## Part two\n\nMore notes on subject {i}, "
                                      f"with pipes mentioned once.\n").encode()
    return files


@pytest.mark.store
def test_hybrid_search_returns_every_hit_asked_for_with_each_sections_chunks_together(ksrv):
    """Guards the arrangement end to end, and reading back more than ten hits (done in batches of ten)."""
    from .conftest import upload

    with ksrv.admin() as a:
        assert a.post("/v1/collections", json={"name": "arranged", "classification": "internal"}).status_code == 201
        assert upload(a, "arranged", _corpus()).status_code == 200
        total = sum(d["chunk_count"] for d in a.get("/v1/collections/arranged/documents").json()["data"])
        assert 27 <= total <= arrange.DEPTH  # all within the arranged depth
        r = a.post("/v1/search", json={"query": "Why does reading a child's output through pipes block?",
                                       "collections": ["arranged"], "top_k": 25, "mode": "hybrid"})
        assert r.status_code == 200, r.text
        hits = r.json()["data"]
    assert len(hits) == 25 and len({h["chunk_id"] for h in hits}) == 25
    keys = [(h["document_id"], h["section"]) for h in hits]
    pipes = [i for i, k in enumerate(keys) if k[1] == "Handbook > Notes"]
    assert len(pipes) >= 2 and pipes == list(range(pipes[0], pipes[0] + len(pipes))), keys  # read together
    for k in set(keys):
        at = [i for i, x in enumerate(keys) if x == k]
        assert at == list(range(at[0], at[0] + len(at))), keys
