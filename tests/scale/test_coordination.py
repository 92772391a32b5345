"""Replicas that share one store: they start at once and migrate it once, and all hold one master key."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from conftest import MASTER_KEY, eventually, keel_env, start_server

pytestmark = pytest.mark.store
MIGRATED = '"msg":"database migrated"'


def test_replicas_starting_at_once_migrate_a_fresh_store_once(tmp_path: Path, db_url: str) -> None:
    """Guards migrations under a database lock: three replicas started together on one empty database
    all come up, and exactly one of them applied the migrations (the others waited, then found it current)."""
    servers = [start_server(tmp_path / f"r{i}", db_url, wait=False) for i in range(3)]
    try:
        for srv in servers:
            eventually(srv.healthy, timeout=120, interval=0.1)
        migrated = [srv for srv in servers if MIGRATED in srv.logs()]
        assert len(migrated) == 1, [srv.logs()[-2000:] for srv in servers]
    finally:
        for srv in servers:
            srv.stop()


def test_db_upgrade_as_a_job_then_replicas_start(tmp_path: Path, db_url: str) -> None:
    """Guards `keel db upgrade` run as a job (e.g. a Kubernetes Job) while replicas wait: both upgrade
    at once, the store ends current, and a second run finds nothing to do."""
    env = keel_env(tmp_path, db_url)
    jobs = [subprocess.Popen([sys.executable, "-m", "keel", "db", "upgrade"], env=env, cwd=str(tmp_path),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [j.communicate(timeout=120)[0] for j in jobs]
    assert [j.returncode for j in jobs] == [0, 0], outs
    assert sum("applied" in out for out in outs) == 1, outs
    again = subprocess.run([sys.executable, "-m", "keel", "db", "upgrade"], env=env, cwd=str(tmp_path),
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "applied" not in again.stdout, again.stdout + again.stderr


def test_a_replica_with_another_master_key_refuses_to_start(tmp_path: Path, db_url: str) -> None:
    """Guards one master key for all replicas: the store remembers a keyed fingerprint of the first key (never
    the key, nor its plain hash); a replica started with another key exits non-zero with one error line before
    binding its port, and one with the same key starts."""
    first = start_server(tmp_path / "a", db_url)
    try:
        engine = sa.create_engine(db_url)
        with engine.connect() as conn:
            stored = conn.execute(sa.text("SELECT fingerprint FROM vault_master_key")).scalars().all()
        engine.dispose()
        assert len(stored) == 1 and MASTER_KEY not in stored[0]
        assert hashlib.sha256(MASTER_KEY.encode()).hexdigest() != stored[0]
        other = start_server(tmp_path / "b", db_url, wait=False, KEEL_MASTER_KEY="another-key-entirely")
        assert other.proc.wait(120) != 0
        logs = other.logs()
        assert "[master_key_mismatch]" in logs and "KEEL_MASTER_KEY" in logs, logs[-2000:]
        assert "Traceback" not in logs and "Keel is running" not in logs, logs[-2000:]
        same = start_server(tmp_path / "c", db_url, KEEL_MASTER_KEY=MASTER_KEY)
        same.stop()
    finally:
        first.stop(signal.SIGTERM)
