"""Parsers turn file bytes into text plus its structure: sections with heading paths and pages.

One module per family; `parse(name, data)` picks by extension after checking the content
really is what the name says. A parser keeps structure as text: headings as lines, list items
as `- item`, table rows as `a | b | c`. Every failure is a `FileRejected` naming the file.

Example:
    >>> p = parse("notes.md", b"# Title\\n\\nHello.\\n\\n## Part\\n\\nMore.\\n")
    >>> [s.path for s in p.sections]
    [('Title',), ('Title', 'Part')]
"""

from __future__ import annotations

from pathlib import PurePosixPath

from keel.knowledge.errors import EmptyFile, UnsupportedFormat, WrongFormat
from keel.knowledge.parsers.base import Builder, Parsed, Section
from keel.knowledge.parsers.docx import parse_docx
from keel.knowledge.parsers.html import parse_html
from keel.knowledge.parsers.pdf import parse_pdf
from keel.knowledge.parsers.tabular import parse_csv, parse_json
from keel.knowledge.parsers.text import parse_text

__all__ = ["FORMATS", "Builder", "Parsed", "Section", "format_of", "parse"]

FORMATS = {
    ".md": "md", ".markdown": "md", ".txt": "txt", ".text": "txt", ".rst": "rst", ".rst.txt": "rst",
    ".html": "html", ".htm": "html", ".pdf": "pdf", ".docx": "docx", ".csv": "csv", ".json": "json",
}


def format_of(name: str) -> str:
    """The format for a file name, or `UnsupportedFormat` listing what is supported."""
    lower = PurePosixPath(name).name.lower()
    for ext in sorted(FORMATS, key=len, reverse=True):
        if lower.endswith(ext):
            return FORMATS[ext]
    suffix = PurePosixPath(lower).suffix or "(none)"
    raise UnsupportedFormat(f"{name}: extension {suffix} is not supported",
                            fix=f"convert it to one of: {', '.join(sorted(set(FORMATS)))}", source=name)


def _sniff(data: bytes) -> str | None:
    head = data[:1024].lstrip()
    if head.startswith(b"%PDF-"):
        return "pdf"
    if data.startswith(b"PK\x03\x04") or data.startswith(b"PK\x05\x06"):
        return "zip"
    if b"\x00" in data[:8192] and not data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "binary"
    return None


def parse(name: str, data: bytes, *, max_unzipped_bytes: int = 256 * 1024 * 1024) -> Parsed:
    """Parse `data` (the bytes of file `name`) into text and sections, or raise a `FileRejected`."""
    fmt = format_of(name)
    if not data.strip():
        raise EmptyFile(f"{name}: the file is empty" if not data else f"{name}: the file holds only whitespace",
                        fix="remove it from the batch, or add content", source=name)
    sniffed = _sniff(data)
    if fmt == "pdf" and sniffed != "pdf":
        raise WrongFormat(f"{name}: named .pdf but its content is not a PDF (no %PDF- header)",
                          fix="give the file its real extension, or export a real PDF", source=name)
    if fmt == "docx" and sniffed != "zip":
        what = "a PDF" if sniffed == "pdf" else "not a zip container"
        raise WrongFormat(f"{name}: named .docx but its content is {what}",
                          fix="give the file its real extension, or save it as .docx from Word", source=name)
    if fmt not in ("pdf", "docx") and sniffed is not None:
        what = {"pdf": "a PDF", "zip": "a zip archive (docx, xlsx, …)", "binary": "binary data"}[sniffed]
        raise WrongFormat(f"{name}: named as {fmt} text but its content is {what}",
                          fix="give the file its real extension", source=name)
    if fmt == "pdf":
        parsed = parse_pdf(name, data)
    elif fmt == "docx":
        parsed = parse_docx(name, data, max_unzipped_bytes)
    elif fmt == "html":
        parsed = parse_html(name, data)
    elif fmt in ("csv", "json"):
        parsed = (parse_csv if fmt == "csv" else parse_json)(name, data)
    else:
        parsed = parse_text(name, data, fmt)
    if not parsed.text.strip() or not parsed.sections:
        raise EmptyFile(f"{name}: no text could be extracted" + (" (a scanned PDF needs OCR first)"
                                                                  if fmt == "pdf" else ""),
                        fix="check the file has text content", source=name)
    if not parsed.title:
        parsed.title = PurePosixPath(name).name
    return parsed
