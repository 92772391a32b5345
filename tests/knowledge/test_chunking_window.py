"""Chunks are sized in the embedder's own word pieces, prefix counted, so the embedder never truncates
one; a re-ingest after the chunker changed re-chunks each document once. Guards issue 24's finding
that 45% of chunks overflowed MiniLM's 256-piece window and their tails were never embedded."""

from __future__ import annotations

import bisect
import itertools
from pathlib import Path

import pytest
import sqlalchemy as sa

from conftest import EMBEDDED
from keel.gateway.providers.local_embed import locate_model_files
from keel.knowledge.chunking import Measure, chunk
from keel.knowledge.parsers import parse

from .conftest import upload

PYDOCS = Path("/usr/share/doc/python3.11/html/_sources")
WINDOW = 256  # the bundled MiniLM deployment's max_length, [CLS] and [SEP] included


@pytest.fixture(scope="module")
def minilm() -> Measure:
    return Measure.wordpieces(locate_model_files(None)[1], WINDOW)


def _check(measure: Measure, source: str, data: bytes) -> int:
    """Asserts every embedding input of the document fits the window and the chunks leave no word out."""
    doc = parse(source, data)
    chunks = chunk(doc, measure)
    inputs = [measure.prefix(doc.title, c.section) + c.text for c in chunks]
    for c, enc in zip(chunks, measure.tokenizer.encode_batch(inputs)):
        assert len(enc.ids) <= WINDOW, f"{source} chunk {c.ordinal}: {len(enc.ids)} word pieces"
    covered = sorted((c.start, c.end) for c in chunks)
    starts = [x for x, _ in covered]
    reach = list(itertools.accumulate((y for _, y in covered), max))  # furthest end of any chunk starting at or before
    for s in doc.sections:
        for a, b, _ in measure.units(doc.text, s.start, s.end):
            i = bisect.bisect_right(starts, a) - 1
            assert i >= 0 and reach[i] >= b, f"{source}: {doc.text[a:b]!r} is in no chunk"
    return len(chunks)


@pytest.mark.skipif(not (PYDOCS / "faq/general.rst.txt").is_file(),
                    reason="python3.11-doc is not installed (`make test` installs it: apt-get install python3.11-doc)")
def test_no_chunk_plus_prefix_exceeds_the_window_over_the_python_docs(minilm):
    files = sorted(PYDOCS.rglob("*.txt"))
    assert len(files) > 400
    total = sum(_check(minilm, p.relative_to(PYDOCS).as_posix(), p.read_bytes()) for p in files)
    assert total > 10_000


def test_a_long_title_and_section_path_are_capped_and_still_counted(minilm):
    title = "Quarterly " + " ".join(f"reconciliation{i}" for i in range(300))
    body = "\n\n".join(f"## Part {i} " + "deeply nested heading words " * 30 + "\n\n" + "Sentence about ledgers. " * 200
                       for i in range(3))
    _check(minilm, "long.md", f"# {title}\n\n{body}".encode())
    assert minilm.count(minilm.prefix(title, "A > B")) <= WINDOW // 4 + 1


def test_words_measure_keeps_the_old_budget():
    doc = parse("a.md", ("# T\n\n" + "word " * 1000).encode())
    assert [c.tokens for c in chunk(doc)][:2] == [200, 200]
    assert Measure.words().version == "2/words-200"


def test_reingest_rechunks_a_document_cut_by_an_older_chunker_once(server_factory, db_url):
    """A document whose recorded chunker differs (NULL: cut before versions existed) is re-chunked by
    the next upload of the same bytes, and only that one; the hashes endpoint asks for it again."""
    srv = server_factory(**EMBEDDED)
    text = ("# Handbook\n\n## Expenses\n\n" + "Receipts for travel are filed within thirty days of the trip. " * 120
            + "\n\n## Leave\n\nAnnual leave is requested in the HR portal.\n").encode()
    files = {"handbook.md": text, "notes.md": b"# Notes\n\nThe coffee machine is descaled on Fridays.\n"}
    engine = sa.create_engine(db_url)
    try:
        with srv.admin() as a:
            assert a.post("/v1/collections", json={"name": "hb", "classification": "internal"}).status_code == 201
            first = upload(a, "hb", files).json()
            assert {i["status"] for i in first["items"]} == {"new"}, first
            with engine.connect() as conn:
                versions = conn.execute(sa.text("SELECT DISTINCT chunker FROM knowledge_documents")).scalars().all()
                assert versions == [Measure.wordpieces(locate_model_files(None)[1], WINDOW).version]
                assert conn.execute(sa.text("SELECT chunker FROM knowledge_collections")).scalar() == versions[0]
                assert conn.execute(sa.text("SELECT max(tokens) FROM knowledge_chunks")).scalar() <= WINDOW - 2
            with engine.begin() as conn:  # what kn_0002 leaves on documents ingested before it
                conn.execute(sa.text("UPDATE knowledge_documents SET chunker = NULL WHERE source = 'handbook.md'"))
            hashes = a.post("/v1/collections/hb/hashes", json={"sources": list(files)}).json()["hashes"]
            assert set(hashes) == {"notes.md"}
            again = upload(a, "hb", files).json()
            assert {i["source"]: i["status"] for i in again["items"]} == {"handbook.md": "changed",
                                                                         "notes.md": "unchanged"}
            third = upload(a, "hb", files).json()
            assert {i["status"] for i in third["items"]} == {"unchanged"}
            with engine.connect() as conn:
                assert conn.execute(sa.text("SELECT count(*) FROM knowledge_documents WHERE chunker IS NULL")
                                    ).scalar() == 0
            hits = a.post("/v1/search", json={"query": "filing travel receipts", "collections": ["hb"]}).json()
            assert hits["data"][0]["source"] == "handbook.md"
    finally:
        engine.dispose()
