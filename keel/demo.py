"""Demo data for `keel up`, loaded on first start through the HTTP API like any client: a `demo`
team and a small `handbook` collection (examples/handbook) to search and ask questions over."""

from __future__ import annotations

import logging
from pathlib import Path

from keel.core.client import Client, RemoteError
from keel.core.errors import KeelError
from keel.knowledge.client_upload import multipart

log = logging.getLogger("keel.demo")
HANDBOOK = Path(__file__).resolve().parent.parent / "examples" / "handbook"


def _ignore_conflict(fn, *args):  # noqa: ANN001, ANN202
    try:
        return fn(*args)
    except RemoteError as exc:
        if exc.status != 409:
            raise
        return None


def load(url: str, admin_key: str) -> None:
    """Create the demo team and the handbook collection, and ingest the handbook."""
    client = Client(url=url, key=admin_key)
    try:
        _ignore_conflict(client.post, "/admin/teams", {"name": "demo"})
        coll = _ignore_conflict(client.post, "/v1/collections",
                                {"name": "handbook", "classification": "internal",
                                 "description": "Company handbook (demo data)"})
        if coll is None or not HANDBOOK.is_dir():
            return
        files = [(p.name, p.read_bytes()) for p in sorted(HANDBOOK.glob("*.md"))]
        body, ctype = multipart(files, {})
        job = client.request("POST", f"/v1/collections/{coll['id']}/documents", raw=body, content_type=ctype)
        log.info("demo data loading", extra={"collection": coll["id"], "job": (job or {}).get("id")})
    except KeelError as exc:  # demo data is a convenience: report it, never stop the server for it
        log.warning("demo data not loaded", extra={"error": exc.detail})
