"""`keel ingest` on a real folder: progress with files/s and chunks/s, a clear line per broken file
while the rest ingests (incl. a 200 MB file over the limit), unchanged files skipped on re-run,
`--sync` deleting documents whose files are gone, `--glob` filters; and `keel ask`."""

from __future__ import annotations

import os

import pytest

from .conftest import run_cli
from .files import make_pdf, make_zip_bomb

pytestmark = pytest.mark.store


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("handbook")
    (root / "sub").mkdir()
    (root / ".git").mkdir()
    (root / "guide.md").write_bytes(b"# Guide\n\nThe VPN client must be updated every quarter by IT staff.\n")
    (root / "sub" / "ops.rst").write_bytes(b"Ops\n===\n\nBackups run nightly at two in the morning, UTC time.\n")
    (root / "page.html").write_bytes(b"<h1>Lunch</h1><p>The canteen serves lunch from noon until two.</p>")
    (root / "notes.txt").write_bytes(b"Printer paper is stocked in the cupboard next to room 12.\n")
    (root / ".git" / "HEAD").write_bytes(b"ref: refs/heads/main\n")
    (root / "broken.pdf").write_bytes(make_pdf(["x"])[:70] + b"\x00junk" * 40)
    (root / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 32)
    (root / "zero.txt").write_bytes(b"")
    (root / "bomb.docx").write_bytes(make_zip_bomb())
    with open(root / "huge.pdf", "wb") as fh:  # 200 MB, sparse: costs no disk, never read
        fh.truncate(200 * 1024 * 1024)
    return root


@pytest.fixture(scope="module")
def srv(ksrv):
    with ksrv.admin() as a:
        assert a.post("/v1/collections", json={"name": "handbook", "classification": "internal"}).status_code == 201
    return ksrv


def docs(srv) -> set[str]:
    with srv.admin() as a:
        return {d["source"] for d in a.get("/v1/collections/handbook/documents").json()["data"]}


def test_ingest_folder_reports_each_broken_file_and_ingests_the_rest(srv, folder):
    r = run_cli(srv, "ingest", str(folder), "--collection", "handbook")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "files/s" in r.stdout and "chunks/s" in r.stdout
    assert "4 new" in r.stdout and "5 failed" in r.stdout, r.stdout
    for name, code in (("broken.pdf", "corrupt_file"), ("image.png", "unsupported_format"),
                       ("zero.txt", "empty_file"), ("bomb.docx", "zip_bomb"), ("huge.pdf", "file_too_large")):
        assert f"error [{code}]: {name}" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert docs(srv) == {"guide.md", "sub/ops.rst", "page.html", "notes.txt"}


def test_rerun_skips_unchanged_and_sync_deletes_removed_files(srv, folder):
    os.remove(folder / "zero.txt")
    r = run_cli(srv, "ingest", str(folder), "--collection", "handbook", "--glob", "*.md", "--glob", "*.rst",
                "--glob", "*.html", "--glob", "*.txt")
    assert "0 new" in r.stdout and "4 unchanged" in r.stdout and r.returncode == 0, r.stdout + r.stderr
    (folder / "notes.txt").write_bytes(b"Printer paper is now stocked in room 14.\n")
    os.remove(folder / "page.html")
    r = run_cli(srv, "ingest", str(folder), "--collection", "handbook", "--sync", "--glob", "*.md", "--glob",
                "*.rst", "--glob", "*.txt", "--glob", "*.html")
    assert "1 changed" in r.stdout and "deleted 1" in r.stdout, r.stdout + r.stderr
    assert docs(srv) == {"guide.md", "sub/ops.rst", "notes.txt"}


def test_glob_limits_what_is_ingested(srv, tmp_path):
    (tmp_path / "a.md").write_bytes(b"# A\n\nAlpha document about onboarding laptops for new staff.\n")
    (tmp_path / "b.txt").write_bytes(b"Beta document that the glob leaves out of the collection.\n")
    r = run_cli(srv, "ingest", str(tmp_path), "--collection", "handbook", "--glob", "*.md")
    assert r.returncode == 0 and "1 new" in r.stdout, r.stdout + r.stderr
    assert "a.md" in docs(srv) and "b.txt" not in docs(srv)


def test_ask_prints_that_nothing_was_found_without_inventing(srv):
    r = run_cli(srv, "ask", "What is the boiling point of liquid nitrogen?", "--collection", "handbook",
                "--no-stream")
    assert r.returncode == 0 and "could not find anything relevant" in r.stdout, r.stdout + r.stderr
    r = run_cli(srv, "ask", "anything", "--collection", "nope")
    assert r.returncode == 1 and "error [not_found]" in r.stderr


def test_search_command_lists_hits(srv):
    r = run_cli(srv, "search", "when do backups run?", "--collection", "handbook")
    assert r.returncode == 0 and "sub/ops.rst" in r.stdout, r.stdout + r.stderr
