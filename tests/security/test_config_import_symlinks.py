"""Attacks on `keel config import DIR`: a folder from an untrusted branch whose files or section folders are
symbolic links would make the import read (and send to the server, or echo in an error) whatever the link points
at — a key file, another checkout. Import refuses any symlink inside DIR before reading it, naming the path and
never its target's content. Files are checked before the server is contacted, so no server is needed here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

WORKFLOW = "name: flow\nsteps:\n  - id: draft\n    type: transform\n    output: \"hi\"\n"
OUTSIDE = "name: stolen\nsteps:\n  - id: s\n    type: transform\n    output: \"TOP-SECRET-9f2c\"\n"


def _export(folder: Path) -> Path:
    (folder / "workflows").mkdir(parents=True)
    (folder / "workflows" / "flow.yaml").write_text(WORKFLOW)
    index = {"format": "keel-config", "version": 1, "files": {"workflows/flow.yaml": {"name": "flow"}}}
    (folder / "keel-config.json").write_text(json.dumps(index))
    return folder


def _import(src: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEEL_")}
    env.update({"KEEL_URL": "http://127.0.0.1:9", "KEEL_API_KEY": "sk-keel-unused", "COLUMNS": "400"})
    return subprocess.run([sys.executable, "-m", "keel", "config", "import", str(src)], env=env,
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def _link_file(src: Path, outside: Path) -> None:
    (outside / "flow.yaml").write_text(OUTSIDE)
    (src / "workflows" / "flow.yaml").unlink()
    (src / "workflows" / "flow.yaml").symlink_to(outside / "flow.yaml")


def _link_dir(src: Path, outside: Path) -> None:
    (outside / "workflows").mkdir()
    (outside / "workflows" / "flow.yaml").write_text(OUTSIDE)
    (src / "workflows" / "flow.yaml").unlink()
    (src / "workflows").rmdir()
    (src / "workflows").symlink_to(outside / "workflows", target_is_directory=True)


def _link_index(src: Path, outside: Path) -> None:
    (src / "keel-config.json").rename(outside / "index.json")
    (src / "keel-config.json").symlink_to(outside / "index.json")


@pytest.mark.parametrize("attack", [_link_file, _link_dir, _link_index], ids=["file", "section-dir", "index"])
def test_a_symlink_inside_the_folder_is_refused(tmp_path: Path, attack) -> None:
    """Guards: `keel config import` following a symlink out of the export folder."""
    src, outside = _export(tmp_path / "cfg"), tmp_path / "outside"
    outside.mkdir()
    attack(src, outside)
    out = _import(src)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "symlink" in out.stderr and "nothing imported" in out.stderr, out.stderr
    assert "TOP-SECRET" not in out.stdout + out.stderr and str(outside) not in out.stderr


def test_a_plain_folder_passes_the_file_checks(tmp_path: Path) -> None:
    """The same folder without links gets past the file checks (and only then fails to reach the server)."""
    out = _import(_export(tmp_path / "cfg"))
    assert out.returncode == 1 and "symlink" not in out.stderr and "nothing imported" not in out.stderr, out.stderr


def test_an_absolute_path_in_the_index_is_not_read(tmp_path: Path) -> None:
    """Guards: an index naming `/abs/path` (joined onto DIR, it is that path) reading a file outside the folder."""
    src, outside = _export(tmp_path / "cfg"), tmp_path / "outside"
    outside.mkdir()
    (outside / "flow.yaml").write_text(OUTSIDE)
    index = {"format": "keel-config", "version": 1, "files": {str(outside / "flow.yaml"): {"name": "flow"}}}
    (src / "keel-config.json").write_text(json.dumps(index))
    out = _import(src)
    assert out.returncode == 1 and "not a file of this export" in out.stderr, out.stderr
