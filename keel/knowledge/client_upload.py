"""Build a multipart/form-data body with the standard library (the CLI's client has no extra deps)."""

from __future__ import annotations

import uuid


def _quote(name: str) -> str:
    return name.replace("\\", "_").replace('"', "_").replace("\r", "_").replace("\n", "_")


def multipart(files: list[tuple[str, bytes]], fields: dict[str, str]) -> tuple[bytes, str]:
    """(body, content type) with one `files` part per (name, bytes) and one part per field."""
    boundary = f"keel-{uuid.uuid4().hex}"
    out: list[bytes] = []
    for name, value in fields.items():
        out += [f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n".encode(),
                value.encode(), b"\r\n"]
    for name, data in files:
        safe = _quote(name.rsplit("/", 1)[-1]).encode("ascii", "replace").decode()
        out += [f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{safe}\"\r\n"
                "Content-Type: application/octet-stream\r\n\r\n".encode(), data, b"\r\n"]
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out), f"multipart/form-data; boundary={boundary}"
