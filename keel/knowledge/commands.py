"""CLI: `keel collections …`, `keel ingest PATH --collection NAME`, `keel search`, `keel ask`, `keel jobs show`.

`keel ingest` hashes files locally, uploads only new or changed ones (in batches that fit the
server's body limit), follows the jobs with a progress bar (files/s, chunks/s), prints one line
per rejected file, and with `--sync` deletes documents whose files are gone from the folder.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import sys
import time
import urllib.parse
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from keel.core.cliutil import KeyOpt, UrlOpt, client, console, err_console, handle_errors, print_rows
from keel.core.client import Client
from keel.core.errors import BadRequest, Unavailable
from keel.knowledge.client_upload import multipart

collections_app = typer.Typer(help="Knowledge collections: create, list, show, delete.", no_args_is_help=True)
jobs_app = typer.Typer(help="Ingestion jobs.", no_args_is_help=True)
UPLOAD_FILES = 200


def _csv(value: Optional[str]) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


@collections_app.command("create")
@handle_errors
def create(name: str, classification: str = typer.Option("internal", help="public|internal|confidential|restricted"),
           description: str = typer.Option(""), team: Optional[str] = typer.Option(None, help="owner team (admins)"),
           read_teams: Optional[str] = typer.Option(None, help="a,b"), read_roles: Optional[str] = typer.Option(None),
           write_teams: Optional[str] = typer.Option(None), write_roles: Optional[str] = typer.Option(None),
           embedding_model: str = typer.Option("local-embed"),
           url: Optional[str] = UrlOpt, key: Optional[str] = KeyOpt) -> None:
    """Create a collection owned by your team (or --team, for admins)."""
    body = {"name": name, "classification": classification, "description": description, "owner_team": team,
            "embedding_model": embedding_model,
            "acl": {"read": {"teams": _csv(read_teams), "roles": _csv(read_roles)},
                    "write": {"teams": _csv(write_teams), "roles": _csv(write_roles)}}}
    c = client(url, key).post("/v1/collections", body)
    console.print(f"{c['id']}\t{c['name']}")


@collections_app.command("list")
@handle_errors
def list_(url: Optional[str] = UrlOpt, key: Optional[str] = KeyOpt) -> None:
    """List the collections you can read."""
    print_rows(["id", "name", "classification", "documents", "chunks", "writable"],
               [[c["id"], c["name"], c["classification"], c["document_count"], c["chunk_count"], c["writable"]]
                for c in client(url, key).get("/v1/collections")["data"]])


@collections_app.command("docs")
@handle_errors
def docs(name: str, url: Optional[str] = UrlOpt, key: Optional[str] = KeyOpt) -> None:
    """List a collection's documents (those you can read)."""
    cl, after, rows = client(url, key), "", []
    while True:
        page = cl.get(f"/v1/collections/{name}/documents?limit=1000" + (f"&after={urllib.parse.quote(after)}"
                                                                        if after else ""))
        rows += [[d["id"], d["source"], d["format"], d["chunk_count"], d["updated_at"]] for d in page["data"]]
        if not page.get("next_after"):
            break
        after = page["next_after"]
    print_rows(["id", "source", "format", "chunks", "updated"], rows)


@collections_app.command("delete")
@handle_errors
def delete(name: str, url: Optional[str] = UrlOpt, key: Optional[str] = KeyOpt) -> None:
    """Delete a collection, its documents and their index entries."""
    client(url, key).request("DELETE", f"/v1/collections/{name}")
    console.print(f"deleted {name}")


@jobs_app.command("show")
@handle_errors
def job_show(job_id: str, url: Optional[str] = UrlOpt, key: Optional[str] = KeyOpt) -> None:
    """Show an ingestion job and its per-file results."""
    console.print_json(json.dumps(client(url, key).get(f"/v1/jobs/{job_id}")))


# -- ingest ---------------------------------------------------------------------------------
class _Rate(ProgressColumn):
    """files/s and chunks/s since the start."""

    def __init__(self, state: dict[str, float]) -> None:
        super().__init__()
        self.state = state

    def render(self, task: Any) -> Text:
        dt = max(time.monotonic() - self.state["t0"], 1e-6)
        return Text(f"{self.state['files'] / dt:6.1f} files/s  {self.state['chunks'] / dt:7.1f} chunks/s")


def _walk(root: Path, globs: list[str]) -> list[tuple[str, Path]]:
    if root.is_file():
        return [(root.name, root)]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in sorted(filenames):
            if fn.startswith("."):
                continue
            path = Path(dirpath) / fn
            rel = path.relative_to(root).as_posix()
            if globs and not any(fnmatch.fnmatch(rel, g) or fnmatch.fnmatch(fn, g) for g in globs):
                continue
            out.append((rel, path))
    return out


def _supported(name: str, formats: list[str]) -> bool:
    lower = name.lower()
    return any(lower.endswith(ext) for ext in formats)


@handle_errors
def ingest(path: Path = typer.Argument(..., help="a file or a folder (walked recursively)"),
           collection: str = typer.Option(..., "--collection", "-c", help="collection name or id"),
           glob: Optional[list[str]] = typer.Option(None, "--glob", "-g", help="only matching paths (repeatable)"),
           sync_: bool = typer.Option(False, "--sync", help="delete documents whose files are gone from the folder"),
           acl_teams: Optional[str] = typer.Option(None, help="restrict these documents to teams a,b"),
           acl_roles: Optional[str] = typer.Option(None, help="restrict these documents to roles a,b"),
           wait: bool = typer.Option(True, help="follow the jobs until they finish"),
           url: Optional[str] = UrlOpt, key: Optional[str] = KeyOpt) -> None:
    """Ingest a file or folder into a collection: new and changed files only, with a progress bar."""
    root = path.expanduser().resolve()
    if not root.exists():
        raise BadRequest(f"{path} does not exist", fix="pass an existing file or folder")
    cl = client(url, key)
    info = cl.get(f"/v1/collections/{collection}")
    limits = info["limits"]
    origin = f"dir:{root}" if root.is_dir() else f"file:{root}"
    found = _walk(root, glob or [])
    failures: list[tuple[str, str, str]] = []
    candidates: list[tuple[str, Path, int]] = []
    for rel, p in found:
        size = p.stat().st_size
        if not _supported(rel, limits["formats"]):
            failures.append((rel, "unsupported_format", f"{rel}: extension is not supported "
                             f"(supported: {', '.join(limits['formats'])})"))
        elif size > limits["max_file_bytes"]:
            failures.append((rel, "file_too_large", f"{rel}: {size} bytes is over the server's "
                             f"{limits['max_file_bytes']}-byte limit per file"))
        else:
            candidates.append((rel, p, size))
    hashes: dict[str, str] = {}
    for i in range(0, len(candidates), 1000):
        part = [rel for rel, _p, _s in candidates[i:i + 1000]]
        hashes.update(cl.post(f"/v1/collections/{collection}/hashes", {"sources": part})["hashes"])
    todo, unchanged = [], 0
    for rel, p, size in candidates:
        try:
            digest = hashlib.sha256(p.read_bytes()).hexdigest()
        except OSError as exc:
            failures.append((rel, "unreadable", f"{rel}: cannot read: {exc.strerror or exc}"))
            continue
        if hashes.get(rel) == digest:
            unchanged += 1
        else:
            todo.append((rel, p, size))
    acl = {"teams": _csv(acl_teams), "roles": _csv(acl_roles)} if (acl_teams or acl_roles) else None
    budget = limits["max_file_bytes"]
    batches: list[list[tuple[str, Path, int]]] = []
    for item in todo:
        if not batches or len(batches[-1]) >= UPLOAD_FILES or sum(s for _r, _p, s in batches[-1]) + item[2] > budget:
            batches.append([])
        batches[-1].append(item)
    state = {"t0": time.monotonic(), "files": 0.0, "chunks": 0.0}
    job_ids: list[str] = []
    counts = {"new": 0, "changed": 0, "unchanged": unchanged, "failed": 0}
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), _Rate(state),
                  TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("ingesting", total=len(todo))
        for batch in batches:
            files = [(rel, p.read_bytes()) for rel, p, _s in batch]
            body, ctype = multipart(files, {"origin": origin, "sources": json.dumps([r for r, _ in files]),
                                            **({"acl": json.dumps(acl)} if acl else {})})
            job_ids.append(cl.request("POST", f"/v1/collections/{collection}/documents", raw=body,
                                      content_type=ctype)["id"])
        pending = list(job_ids)
        finished: dict[str, dict[str, Any]] = {}
        while wait and pending:
            views = {j: cl.get(f"/v1/jobs/{j}?items=none") for j in pending}
            views.update(finished)
            done_files = sum(sum(v["counts"][s] for s in ("new", "changed", "unchanged", "failed"))
                             for v in views.values())
            state["files"], state["chunks"] = done_files, sum(v["chunks"] for v in views.values())
            bar.update(task, completed=done_files)
            for j in list(pending):
                if views[j]["status"] not in ("queued", "running"):
                    finished[j] = views[j]
                    pending.remove(j)
            if pending:
                time.sleep(0.3)
    if wait:
        for j in job_ids:
            v = cl.get(f"/v1/jobs/{j}?items=failed")
            for s in ("new", "changed", "unchanged", "failed"):
                counts[s] += v["counts"][s]
            failures += [(it["source"], it["error"]["code"], it["error"]["detail"]) for it in v["items"]]
    counts["failed"] = len(failures)
    deleted: list[str] = []
    if sync_:
        keep = [rel for rel, _p in found]
        deleted = cl.post(f"/v1/collections/{collection}/sync", {"origin": origin, "keep": keep})["deleted"]
    for _rel, code, detail in failures:
        err_console.print(f"error [{code}]: {detail}", style="red", markup=False, highlight=False)
    elapsed = time.monotonic() - state["t0"]
    if wait:
        console.print(f"{len(found)} files: {counts['new']} new, {counts['changed']} changed, {counts['unchanged']} "
                      f"unchanged, {counts['failed']} failed; {int(state['chunks'])} chunks in {elapsed:.1f} s"
                      + (f"; deleted {len(deleted)}" if sync_ else ""), highlight=False)
    else:
        console.print(f"queued {len(todo)} files in jobs: {' '.join(job_ids)}", highlight=False)
    if failures:
        sys.exit(1)


# -- search and ask -------------------------------------------------------------------------
@handle_errors
def search_cmd(query: str, collection: Optional[list[str]] = typer.Option(None, "--collection", "-c"),
               top_k: int = typer.Option(5), mode: str = typer.Option("hybrid", help="hybrid|bm25|vector"),
               url: Optional[str] = UrlOpt, key: Optional[str] = KeyOpt) -> None:
    """Search the collections you can read."""
    res = client(url, key).post("/v1/search", {"query": query, "collections": collection or None, "top_k": top_k,
                                               "mode": mode})
    print_rows(["score", "document", "source", "section", "page", "span"],
               [[h["score"], h["document_id"], h["source"], h["section"], h["page"],
                 f"{h['span']['start']}-{h['span']['end']}"] for h in res["data"]])


def _stream(cl: Client, path: str, body: dict[str, Any]):  # noqa: ANN202
    req = urllib.request.Request(cl.url + path, data=json.dumps(body).encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    if cl.key:
        req.add_header("Authorization", f"Bearer {cl.key}")
    try:
        resp = urllib.request.urlopen(req, timeout=cl.timeout)
    except urllib.error.HTTPError as exc:
        from keel.core.client import RemoteError
        try:
            problem = json.loads(exc.read())
        except ValueError:
            problem = {}
        raise RemoteError(exc.code, problem if isinstance(problem, dict) else {}) from None
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        raise Unavailable(f"cannot reach Keel at {cl.url}: {getattr(exc, 'reason', exc)}",
                          fix="start it with `keel up`, or pass --url / KEEL_URL") from None
    with resp:
        for raw in resp:
            line = raw.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                yield json.loads(line[6:])


def _print_citations(cites: list[dict[str, Any]], cited: set[int] | None = None) -> None:
    if not cites:
        return
    console.print("\nSources:", style="bold")
    for c in cites:
        mark = "*" if cited is None or c["n"] in cited else " "
        page = f", page {c['page']}" if c.get("page") else ""
        console.print(f"{mark}[{c['n']}] {c['title']} — {c['section'] or c['source']}{page} ({c['source']} "
                      f"{c['span']['start']}-{c['span']['end']}, score {c['score']:.4f})", markup=False,
                      highlight=False)


@handle_errors
def ask(question: str, collection: Optional[list[str]] = typer.Option(None, "--collection", "-c"),
        model: Optional[str] = typer.Option(None), top_k: int = typer.Option(5),
        stream: bool = typer.Option(True, help="print the answer as it is generated"),
        max_tokens: int = typer.Option(256), url: Optional[str] = UrlOpt, key: Optional[str] = KeyOpt) -> None:
    """Ask a question over your collections; prints the answer and its sources."""
    cl = client(url, key)
    body = {"question": question, "collections": collection or None, "top_k": top_k, "model": model,
            "max_tokens": max_tokens, "stream": stream}
    if not stream:
        res = cl.post("/v1/answer", body)
        console.print(res["answer"], markup=False, highlight=False)
        _print_citations(res["citations"], {c["n"] for c in res["citations"] if c["cited"]})
        return
    cites: list[dict[str, Any]] = []
    for ev in _stream(cl, "/v1/answer", body):
        if ev["type"] == "citations":
            cites = ev["citations"]
        elif ev["type"] == "delta":
            console.print(ev["content"], end="", markup=False, highlight=False, soft_wrap=True)
        elif ev["type"] == "error":
            from keel.core.client import RemoteError
            raise RemoteError(ev.get("status", 500), ev)
        elif ev["type"] == "done":
            console.print()
            _print_citations(cites, set(ev.get("cited") or []) or None)


def mount(app: typer.Typer) -> None:
    app.add_typer(collections_app, name="collections")
    app.add_typer(jobs_app, name="jobs")
    app.command("ingest")(ingest)
    app.command("search")(search_cmd)
    app.command("ask")(ask)


