"""`keel backup` / `keel restore`: a backup taken while the server writes restores into an empty store that a
new server starts on, with every acknowledged write and an intact audit chain; mistakes are refused clearly.
Runs on SQLite and (KEEL_TEST_DATABASE=postgres) on PostgreSQL through pg_dump/pg_restore."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa

from conftest import ROOT, keel_env, new_db_url, start_server

pytestmark = pytest.mark.store


def keel(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "keel", *args], env={**env, "COLUMNS": "400"},
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_backup_while_writing_then_restore_elsewhere(tmp_path: Path, db_url: str, pg_server) -> None:
    """Guards: a backup made under concurrent writes is consistent, holds the index files, and restores with
    its audit chain verified; the restored store serves the teams acknowledged before the backup began."""
    srv = start_server(tmp_path / "data", db_url)
    try:
        with srv.admin() as c:
            before = [c.post("/admin/teams", json={"name": f"before-{i}"}).json()["id"] for i in range(3)]
        vectors = tmp_path / "data" / "knowledge" / "vectors"
        vectors.mkdir(parents=True, exist_ok=True)
        (vectors / "kc_planted.hnsw").write_bytes(b"index bytes")
        stop = threading.Event()

        def write() -> None:
            with srv.admin() as c:
                i = 0
                while not stop.is_set():
                    assert c.post("/admin/teams", json={"name": f"during-{i}"}).status_code == 201
                    i += 1

        writer = threading.Thread(target=write)
        writer.start()
        try:
            out = keel(srv.env, "backup", str(tmp_path / "bk"))
        finally:
            stop.set()
            writer.join()
        assert out.returncode == 0, out.stderr
        assert (tmp_path / "bk").stat().st_mode & 0o777 == 0o700, "a backup holds the whole store: owner only"
        manifest = json.loads((tmp_path / "bk" / "keel-backup.json").read_text())
        assert manifest["format"] == "keel-backup" and manifest["heads"]
        if pg_server is None:
            assert "knowledge/vectors/kc_planted.hnsw" in manifest["files"]

        again = keel(srv.env, "backup", str(tmp_path / "bk"))
        assert again.returncode == 1 and "already exists" in again.stderr, again.stderr
        into_live = keel(srv.env, "restore", str(tmp_path / "bk"))
        assert into_live.returncode == 1 and "already" in into_live.stderr, into_live.stderr
    finally:
        srv.stop()

    target_db = new_db_url(tmp_path / "restored", pg_server) if pg_server else \
        f"sqlite:///{tmp_path / 'restored' / 'keel.db'}"
    env = keel_env(tmp_path / "restored", target_db)
    out = keel(env, "restore", str(tmp_path / "bk"))
    assert out.returncode == 0, out.stderr
    assert "audit chain OK" in out.stdout
    if pg_server is None:  # on PostgreSQL the store is the database: no data dir is written
        assert (tmp_path / "restored").stat().st_mode & 0o777 == 0o700
    if pg_server is None:
        assert (tmp_path / "restored" / "knowledge" / "vectors" / "kc_planted.hnsw").read_bytes() == b"index bytes"
    back = start_server(tmp_path / "restored", target_db)
    try:
        with back.admin() as c:
            names = {t["id"] for t in c.get("/admin/teams").json()["data"]}
        assert set(before) <= names
    finally:
        back.stop()


def test_restore_refuses_what_is_not_a_backup(tmp_path: Path, db_url: str) -> None:
    """Guards: a folder without a manifest, or with a foreign one, is refused before anything is written."""
    env = keel_env(tmp_path / "data", db_url)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "keel-backup.json").write_text('{"format": "something-else"}')
    for src in ("junk", "absent"):
        out = keel(env, "restore", str(tmp_path / src))
        assert out.returncode == 1 and "is not a Keel backup" in out.stderr, out.stderr
    assert not (tmp_path / "data" / "keel.db").exists()
    out = keel(env, "backup", str(tmp_path / "bk"))
    assert out.returncode == 1 and "no Keel schema" in out.stderr, out.stderr


def test_restore_reports_a_tampered_audit_chain(tmp_path: Path, db_url: str, pg_server) -> None:
    """Guards: an audit row changed inside the backup is named after the restore, with a non-zero exit."""
    if pg_server is not None:
        pytest.skip("the backup file is edited with sqlite3; the check itself is dialect-free")
    srv = start_server(tmp_path / "data", db_url)
    try:
        with srv.admin() as c:
            c.post("/admin/teams", json={"name": "audited"})
        assert keel(srv.env, "backup", str(tmp_path / "bk")).returncode == 0
    finally:
        srv.stop()
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'bk' / 'keel.db'}")
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TRIGGER audit_events_no_update"))
        conn.execute(sa.text("UPDATE audit_events SET actor = 'mallory' WHERE seq = "
                             "(SELECT MIN(seq) FROM audit_events)"))
    engine.dispose()
    env = keel_env(tmp_path / "restored", f"sqlite:///{tmp_path / 'restored' / 'keel.db'}")
    out = keel(env, "restore", str(tmp_path / "bk"))
    assert out.returncode == 2 and "BROKEN at event" in out.stderr, out.stderr
