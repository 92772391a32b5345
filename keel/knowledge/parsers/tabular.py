"""CSV and JSON as readable lines: a CSV row becomes `column: value; column: value`, a JSON leaf
`path.to[2].key: value`; top-level JSON keys (or array items) become sections."""

from __future__ import annotations

import csv
import io
import json
from pathlib import PurePosixPath
from typing import Any

from keel.knowledge.errors import CorruptFile
from keel.knowledge.parsers.base import Builder, Parsed
from keel.knowledge.parsers.text import decode


def parse_csv(name: str, data: bytes) -> Parsed:
    text = decode(data)
    try:
        dialect = csv.Sniffer().sniff(text[:4096], delimiters=",;\t|")
    except csv.Error:
        dialect = csv.excel
    try:
        rows = list(csv.reader(io.StringIO(text), dialect))
    except csv.Error as exc:
        raise CorruptFile(f"{name}: not valid CSV: {exc}", fix="check quoting and delimiters", source=name) from None
    rows = [r for r in rows if any(c.strip() for c in r)]
    b = Builder()
    title = PurePosixPath(name).stem
    if not rows:
        return b.build("csv", title)
    header = [h.strip() or f"column {i + 1}" for i, h in enumerate(rows[0])]
    b.heading(1, title)
    b.block("columns: " + " | ".join(header))
    lines = []
    for row in rows[1:]:
        cells = [f"{header[i] if i < len(header) else f'column {i + 1}'}: {c.strip()}"
                 for i, c in enumerate(row) if c.strip()]
        lines.append("; ".join(cells))
    # rows are grouped in blocks of 20 so the chunker can cut between them
    for i in range(0, len(lines), 20):
        b.block("\n".join(lines[i:i + 20]))
    parsed = b.build("csv", title)
    parsed.meta["rows"] = len(rows) - 1
    return parsed


def _leaves(value: Any, path: str, out: list[str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _leaves(v, f"{path}.{k}" if path else str(k), out)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _leaves(v, f"{path}[{i}]", out)
    else:
        out.append(f"{path}: {'null' if value is None else value}")


def parse_json(name: str, data: bytes) -> Parsed:
    try:
        doc = json.loads(decode(data))
    except (json.JSONDecodeError, RecursionError) as exc:
        raise CorruptFile(f"{name}: not valid JSON: {exc}", fix="validate the file with a JSON linter",
                          source=name) from None
    b = Builder()
    title = PurePosixPath(name).stem
    if isinstance(doc, dict):
        items = [(str(k), v) for k, v in doc.items()]
        title = str(doc.get("title") or doc.get("name") or title) if not isinstance(
            doc.get("title") or doc.get("name"), (dict, list)) else title
    elif isinstance(doc, list):
        items = [(f"[{i}]", v) for i, v in enumerate(doc)]
    else:
        items = [("value", doc)]
    for key, value in items:
        b.heading(1, key)
        lines: list[str] = []
        _leaves(value, key, lines)
        for i in range(0, len(lines), 20):
            b.block("\n".join(lines[i:i + 20]))
    return b.build("json", title)
