"""What every parser builds and returns: `Section`s (a heading path, a page, a span) inside one `Parsed`
document, assembled with a `Builder`. A leaf module, so parsers and the package import it alike."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Section:
    """A stretch `[start, end)` of the parsed text under one heading path (and on one page)."""

    start: int
    end: int
    path: tuple[str, ...] = ()
    page: int | None = None


@dataclass
class Parsed:
    text: str
    sections: list[Section]
    title: str
    format: str
    pages: int | None = None
    meta: dict = field(default_factory=dict)


class Builder:
    """Accumulates blocks of text; a heading or a new page opens a new section."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.length = 0
        self.path: list[tuple[int, str]] = []
        self.page: int | None = None
        self.sections: list[Section] = []
        self.first_heading = ""

    def _open(self) -> None:
        if self.sections and self.sections[-1].start == self.length:
            self.sections[-1] = Section(self.length, self.length, tuple(t for _, t in self.path), self.page)
        else:
            self.sections.append(Section(self.length, self.length, tuple(t for _, t in self.path), self.page))

    def _add(self, text: str) -> None:
        if not self.sections:
            self._open()
        if self.length:
            self.parts.append("\n\n")
            self.length += 2
        self.parts.append(text)
        self.length += len(text)

    def heading(self, level: int, title: str) -> None:
        title = " ".join(title.split())
        if not title:
            return
        self.first_heading = self.first_heading or title
        while self.path and self.path[-1][0] >= level:
            self.path.pop()
        self.path.append((level, title))
        if self.length:
            self.parts.append("\n\n")
            self.length += 2
        self._open()
        self.parts.append(title)
        self.length += len(title)

    def new_page(self, page: int) -> None:
        self.page = page
        if self.length:
            self.parts.append("\n\n")
            self.length += 2
        self._open()

    def block(self, text: str) -> None:
        text = text.strip()
        if text:
            self._add(text)

    def build(self, fmt: str, title: str, pages: int | None = None) -> Parsed:
        text = "".join(self.parts)
        for i, s in enumerate(self.sections):
            s.end = self.sections[i + 1].start if i + 1 < len(self.sections) else len(text)
        sections = [s for s in self.sections if text[s.start:s.end].strip()]
        return Parsed(text=text, sections=sections, title=title or self.first_heading, format=fmt, pages=pages)
