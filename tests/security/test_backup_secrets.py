"""Attacks on `keel backup` / `keel restore` on PostgreSQL: the database password must never be on pg_dump's or
pg_restore's command line, where every local user reads it (ps, /proc/*/cmdline); libpq gets it from its
environment instead. (On SQLite there is no password and no client tool: skipped.)"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, TEST_DB, keel_env, new_db_url, start_server
from keel.core.backup import pg_tool

pytestmark = [pytest.mark.store,
              pytest.mark.skipif(TEST_DB != "postgres", reason="pg_dump/pg_restore run on PostgreSQL only")]
PASSWORD = "hunter2-never-in-argv"


def _recording_tools(folder: Path, log: Path) -> None:
    """pg_dump and pg_restore wrappers that record their argv and whether PGPASSWORD reached them, then run the
    real tools."""
    folder.mkdir()
    for name in ("pg_dump", "pg_restore"):
        real = pg_tool(name)
        script = folder / name
        script.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                          f"open({str(log)!r}, 'a').write(json.dumps({{'argv': sys.argv, "
                          f"'pgpassword': os.environ.get('PGPASSWORD')}}) + '\\n')\n"
                          f"os.execv({real!r}, [{real!r}, *sys.argv[1:]])\n")
        script.chmod(script.stat().st_mode | stat.S_IXUSR)


def test_the_database_password_is_never_on_a_command_line(tmp_path: Path, pg_server) -> None:
    url = new_db_url(tmp_path, pg_server).replace("postgres@", f"postgres:{PASSWORD}@")  # trust auth ignores it
    srv = start_server(tmp_path / "data", url)
    try:
        with srv.admin() as c:
            assert c.post("/admin/teams", json={"name": "kept"}).status_code == 201
    finally:
        srv.stop()
    log = tmp_path / "calls.jsonl"
    _recording_tools(tmp_path / "bin", log)
    env = {**keel_env(tmp_path / "data", url), "KEEL_PG_BIN": str(tmp_path / "bin"), "COLUMNS": "400"}
    out = subprocess.run([sys.executable, "-m", "keel", "backup", str(tmp_path / "bk")], env=env,
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    target = new_db_url(tmp_path / "r", pg_server).replace("postgres@", f"postgres:{PASSWORD}@")
    env = {**keel_env(tmp_path / "restored", target), "KEEL_PG_BIN": str(tmp_path / "bin"), "COLUMNS": "400"}
    out = subprocess.run([sys.executable, "-m", "keel", "restore", str(tmp_path / "bk")], env=env,
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [Path(c["argv"][0]).name for c in calls] == ["pg_dump", "pg_restore"]
    for c in calls:
        assert not any(PASSWORD in a for a in c["argv"]), c["argv"]
        assert c["pgpassword"] == PASSWORD  # libpq still gets it, from the environment
    assert PASSWORD not in out.stdout + out.stderr
    assert os.path.isdir(tmp_path / "bk")
