"""Parsers and chunking on real files of every format, and a clear error for each kind of broken file."""

import pytest

from keel.knowledge.chunking import chunk
from keel.knowledge.errors import ArchiveBomb, CorruptFile, EmptyFile, UnsupportedFormat, WrongFormat
from keel.knowledge.parsers import parse

from .files import CSV, HTML, JSON, MD, RST, make_docx, make_pdf, make_zip_bomb


def test_markdown_sections_follow_headings_not_code_fences():
    p = parse("handbook.md", MD)
    assert p.title == "Handbook"
    assert [s.path for s in p.sections] == [("Handbook",), ("Handbook", "Holidays"), ("Handbook", "Expenses")]
    assert "- Keep receipts" in p.text and "| meal | 40 EUR |" in p.text


def test_rst_levels_follow_adornment_order_and_rst_txt_suffix():
    p = parse("ops/index.rst.txt", RST)
    assert p.format == "rst" and p.title == "Operations"
    assert [s.path for s in p.sections][-1] == ("Operations", "On-call", "Escalation")


def test_html_keeps_structure_and_drops_scripts_and_nav():
    p = parse("onboarding.html", HTML)
    assert p.title == "Onboarding"
    assert "- Meet your buddy" in p.text and "Monday | Security training" in p.text
    assert "do not index" not in p.text and "Home | About" not in p.text
    assert "make up\nmake test" in p.text
    assert ("Onboarding", "First week") in [s.path for s in p.sections]


def test_pdf_pages_are_recorded_on_chunks():
    data = make_pdf(["Page one talks about invoices.", "Page two talks about refunds."], title="Billing")
    p = parse("billing.pdf", data)
    assert p.pages == 2 and p.title == "Billing"
    chunks = chunk(p)
    assert {c.page for c in chunks} == {1, 2}
    assert any("refunds" in c.text and c.page == 2 for c in chunks)


def test_docx_headings_lists_and_tables():
    p = parse("travel.docx", make_docx())
    assert p.title == "Travel policy"
    assert "- Trips abroad need approval from a director." in p.text
    assert "Zurich | 120 CHF" in p.text
    assert ("Travel policy", "Approvals") in [s.path for s in p.sections]


def test_csv_rows_and_json_leaves_become_readable_lines():
    c = parse("people.csv", CSV)
    assert "name: Grace Hopper; team: compilers; office: Arlington" in c.text
    j = parse("catalog.json", JSON)
    assert j.title == "Service catalog" and "services[1].owner: knowledge" in j.text


def test_chunks_are_exact_spans_with_budget_and_overlap():
    words = " ".join(f"word{i}." for i in range(900))
    p = parse("long.md", f"# Long\n\n{words}\n".encode())
    chunks = chunk(p, budget=120, overlap=20)
    assert len(chunks) > 5
    for c in chunks:
        assert p.text[c.start:c.end] == c.text and c.tokens <= 120 and c.section == "Long"
    assert all(b.start < a.end for a, b in zip(chunks, chunks[1:])), "consecutive windows overlap"
    assert [c.ordinal for c in chunks] == list(range(len(chunks)))


@pytest.mark.parametrize("name,data,error,words", [
    ("broken.pdf", make_pdf(["x"])[:60] + b"garbage" * 20, CorruptFile, "damaged"),
    ("report.docx", make_pdf(["x"]), WrongFormat, "is a PDF"),
    ("notes.txt", make_docx(), WrongFormat, "zip archive"),
    ("photo.png", b"\x89PNG\r\n\x1a\n....", UnsupportedFormat, ".png is not supported"),
    ("empty.md", b"", EmptyFile, "empty"),
    ("blank.txt", b"  \n\n ", EmptyFile, "whitespace"),
    ("bomb.docx", make_zip_bomb(), ArchiveBomb, "zip bomb"),
    ("bad.json", b"{not json", CorruptFile, "not valid JSON"),
])
def test_broken_files_get_a_clear_error_naming_the_file(name, data, error, words):
    with pytest.raises(error) as info:
        parse(name, data)
    assert name in info.value.detail and words in info.value.detail and info.value.fix
