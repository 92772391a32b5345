"""Store: migrations apply automatically and by `keel db upgrade`; readiness reflects them."""

import os
import subprocess
import sys

import pytest

from keel.core.db import Store

pytestmark = pytest.mark.store


def test_db_upgrade_with_server_down_then_current(tmp_path, db_url):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEEL_")}
    env.update({"KEEL_DATA_DIR": str(tmp_path), "KEEL_DATABASE_URL": db_url})
    store = Store.open(db_url)
    assert not store.is_current()
    out = subprocess.run([sys.executable, "-m", "keel", "db", "upgrade"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "is current" in out.stdout
    assert store.is_current()
    store.upgrade()  # idempotent
    assert store.is_current()
    store.dispose()


def test_sqlite_uses_wal(tmp_path):
    store = Store.open(f"sqlite:///{tmp_path / 'k.db'}")
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    store.dispose()
