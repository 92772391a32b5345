"""Word .docx via python-docx, after checking the zip container cannot expand into a bomb.

Headings (`Heading N`, `Title` styles) open sections; list paragraphs become `- item`; tables
become rows of `a | b | c`; body order is kept.
"""

from __future__ import annotations

import io
import zipfile

from keel.knowledge.errors import ArchiveBomb, CorruptFile
from keel.knowledge.parsers.base import Builder, Parsed

MAX_RATIO = 200  # uncompressed/compressed for any member over 1 MiB


def check_zip(name: str, data: bytes, max_unzipped: int) -> None:
    """Reject archives whose declared sizes (which zipfile enforces on read) are bomb-like."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError) as exc:
        raise CorruptFile(f"{name}: not a readable .docx (zip container): {exc}",
                          fix="re-save the document from Word", source=name) from None
    total = sum(i.file_size for i in infos)
    worst = max(infos, key=lambda i: i.file_size / max(i.compress_size, 1), default=None)
    if total > max_unzipped or (worst is not None and worst.file_size > 1 << 20
                                and worst.file_size / max(worst.compress_size, 1) > MAX_RATIO):
        raise ArchiveBomb(f"{name}: the archive would expand to {total} bytes from {len(data)} "
                          f"(over the {max_unzipped}-byte or {MAX_RATIO}:1 limits) — refusing a possible zip bomb",
                          fix="upload a real Word document", source=name)
    if "word/document.xml" not in {i.filename for i in infos}:
        raise CorruptFile(f"{name}: a zip archive but not a Word document (no word/document.xml)",
                          fix="upload a real .docx, or give the file its real extension", source=name)


def parse_docx(name: str, data: bytes, max_unzipped: int) -> Parsed:
    check_zip(name, data, max_unzipped)
    import docx
    from docx.opc.exceptions import PackageNotFoundError
    from docx.table import Table
    from docx.text.paragraph import Paragraph

    try:
        document = docx.Document(io.BytesIO(data))
        b = Builder()
        for child in document.element.body.iterchildren():
            tag = child.tag.rsplit("}", 1)[-1]
            if tag == "p":
                para = Paragraph(child, document)
                style = (para.style.name if para.style is not None else "") or ""
                text = para.text
                if style == "Title":
                    b.heading(1, text)
                elif style.startswith("Heading"):
                    level = style.split()[-1]
                    b.heading(int(level) + 1 if level.isdigit() else 2, text)
                elif style.startswith("List"):
                    b.block("- " + text if text.strip() else "")
                else:
                    b.block(text)
            elif tag == "tbl":
                rows = [" | ".join(" ".join(c.text.split()) for c in row.cells) for row in Table(child, document).rows]
                b.block("\n".join(r for r in rows if r.strip(" |")))
        title = document.core_properties.title or ""
    except (PackageNotFoundError, KeyError, ValueError, zipfile.BadZipFile, AttributeError, TypeError) as exc:
        raise CorruptFile(f"{name}: the .docx is damaged ({type(exc).__name__}: {exc})"[:400],
                          fix="re-save the document from Word", source=name) from None
    except Exception as exc:  # lxml's XMLSyntaxError and friends: translated at the boundary
        if type(exc).__module__.startswith("lxml"):
            raise CorruptFile(f"{name}: the .docx holds malformed XML ({exc})"[:400],
                              fix="re-save the document from Word", source=name) from None
        raise
    return b.build("docx", title)
