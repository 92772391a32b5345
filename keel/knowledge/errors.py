"""Per-file ingestion errors: each names the file, what is wrong with it and how to fix it."""

from __future__ import annotations

from keel.core.errors import BadRequest


class FileRejected(BadRequest):
    """A file could not be ingested; the rest of its batch goes on."""

    code, title = "file_rejected", "File rejected"


class UnsupportedFormat(FileRejected):
    """The file's extension is not one Keel parses."""

    code, status, title = "unsupported_format", 415, "Unsupported format"


class WrongFormat(FileRejected):
    """The content does not match the extension (e.g. a PDF named `.docx`)."""

    code, title = "wrong_format", "Content does not match extension"


class EmptyFile(FileRejected):
    """A 0-byte file, or one with no extractable text."""

    code, status, title = "empty_file", 422, "Empty file"


class CorruptFile(FileRejected):
    """The parser could not read the file (truncated or damaged)."""

    code, status, title = "corrupt_file", 422, "Corrupt file"


class FileTooLarge(FileRejected):
    """The file is over the per-file size limit."""

    code, status, title = "file_too_large", 413, "File too large"


class ArchiveBomb(FileRejected):
    """A zip container (docx) that would expand far beyond any real document."""

    code, status, title = "zip_bomb", 422, "Archive expands too far"
