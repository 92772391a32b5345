"""Demo data for `keel up`, loaded on first start through the HTTP API like any client: a `demo`
team, a small `handbook` collection (examples/handbook) to search and ask questions over, and the
`lead_intake` workflow (examples/lead_intake) with the `companies` collection it enriches leads from, and the
`support` agent (examples/support_agent) of the demo team over its `support-handbook` collection."""

from __future__ import annotations

import logging
import secrets
from pathlib import Path

from keel.core.client import Client, RemoteError
from keel.core.errors import KeelError
from keel.knowledge.client_upload import multipart

log = logging.getLogger("keel.demo")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
HANDBOOK = EXAMPLES / "handbook"
LEAD_INTAKE = EXAMPLES / "lead_intake"
SUPPORT = EXAMPLES / "support_agent"


def _ignore_conflict(fn, *args):  # noqa: ANN001, ANN202
    try:
        return fn(*args)
    except RemoteError as exc:
        if exc.status != 409:
            raise
        return None


def _collection(client: Client, name: str, description: str, folder: Path) -> str | None:
    """Create a collection and ingest `folder/*.md` into it (once: an existing collection is left alone); returns
    the ingest job's id."""
    coll = _ignore_conflict(client.post, "/v1/collections",
                            {"name": name, "classification": "internal", "description": description})
    if coll is None or not folder.is_dir():
        return None
    files = [(p.name, p.read_bytes()) for p in sorted(folder.glob("*.md"))]
    body, ctype = multipart(files, {})
    job = client.request("POST", f"/v1/collections/{coll['id']}/documents", raw=body, content_type=ctype)
    log.info("demo data loading", extra={"collection": coll["id"], "job": (job or {}).get("id")})
    return (job or {}).get("id")


def support_agent(client: Client, source: str | None = None) -> str | None:
    """The support agent example: its handbook as the `support-handbook` collection, its mandate (`source`, or
    examples/support_agent/support.yaml) defined for the demo team. Returns the handbook's ingest job id."""
    job = _collection(client, "support-handbook", "What the support agent answers from (demo data)",
                      SUPPORT / "handbook")
    spec = SUPPORT / "support.yaml"
    if source is None and not spec.is_file():
        return job
    agent = client.post("/v1/agents", {"spec": source or spec.read_text(encoding="utf-8"), "team": "demo"})
    log.info("demo agent loaded", extra={"agent": agent["name"], "version": agent["version"]})
    return job


def load(url: str, admin_key: str) -> None:
    """Create the demo team, the handbook and companies collections, and the lead-intake workflow."""
    client = Client(url=url, key=admin_key)
    try:
        _ignore_conflict(client.post, "/admin/teams", {"name": "demo"})
        _collection(client, "handbook", "Company handbook (demo data)", HANDBOOK)
        _collection(client, "companies", "What sales knows about companies (demo data)", LEAD_INTAKE / "companies")
        spec = LEAD_INTAKE / "workflow.yaml"
        if spec.is_file():
            if not any(s["name"] == "lead-intake-webhook" for s in client.get("/admin/secrets")["data"]):
                # the web form's signing secret; replace it with PUT /admin/secrets/lead-intake-webhook
                client.request("PUT", "/admin/secrets/lead-intake-webhook",
                               {"value": secrets.token_urlsafe(32), "uses": ["webhook"]})
            wf = client.post("/v1/workflows", {"spec": spec.read_text(encoding="utf-8")})
            log.info("demo workflow loaded", extra={"workflow": wf["name"], "version": wf["version"]})
        support_agent(client)
    except KeelError as exc:  # demo data is a convenience: report it, never stop the server for it
        log.warning("demo data not loaded", extra={"error": exc.detail})
