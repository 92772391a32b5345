"""PDF via pypdf: one section per page (page numbers from 1), titled by the outline when it has one."""

from __future__ import annotations

import io
import logging

from keel.knowledge.errors import CorruptFile, EmptyFile
from keel.knowledge.parsers.base import Builder, Parsed

logging.getLogger("pypdf").setLevel(logging.ERROR)


def _outline_pages(reader) -> dict[int, list[tuple[int, str]]]:  # noqa: ANN001
    """page index → [(level, title)] of outline entries that start on it."""
    out: dict[int, list[tuple[int, str]]] = {}

    def walk(items, level: int) -> None:  # noqa: ANN001
        for it in items:
            if isinstance(it, list):
                walk(it, level + 1)
                continue
            try:
                out.setdefault(reader.get_destination_page_number(it), []).append((level, str(it.title)))
            except Exception:  # noqa: BLE001 - a broken outline entry only loses its heading
                continue

    try:
        walk(reader.outline, 1)
    except Exception:  # noqa: BLE001 - outlines are optional; a broken one is ignored
        return {}
    return out


def parse_pdf(name: str, data: bytes) -> Parsed:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError, PdfStreamError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise CorruptFile(f"{name}: the PDF is encrypted", fix="remove the password and upload it again",
                              source=name)
        pages = list(reader.pages)
        outline = _outline_pages(reader)
        b = Builder()
        for i, page in enumerate(pages):
            b.new_page(i + 1)
            for level, title in outline.get(i, []):
                b.heading(level, title)
                b.page = i + 1
            b.block(page.extract_text() or "")
        meta_title = ""
        try:
            meta_title = str((reader.metadata or {}).get("/Title") or "")
        except Exception:  # noqa: BLE001 - metadata is optional
            meta_title = ""
    except CorruptFile:
        raise
    except (PdfReadError, PdfStreamError, ValueError, KeyError, TypeError, AttributeError, IndexError,
            OSError, RecursionError) as exc:
        raise CorruptFile(f"{name}: the PDF is damaged and cannot be read ({type(exc).__name__}: {exc})"[:400],
                          fix="re-export or repair the PDF", source=name) from None
    if not pages:
        raise EmptyFile(f"{name}: the PDF has no pages", fix="check the file", source=name)
    return b.build("pdf", meta_title, pages=len(pages))
