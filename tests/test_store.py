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


OPEN_AT = """
import sys, time
from keel.core.db import Store
start = float(sys.argv[2])
while time.time() < start:  # every process has imported Keel by then: all open the store at the same moment
    pass
store = Store.open(sys.argv[1])
with store.engine.connect():
    pass
"""


def test_processes_opening_a_fresh_sqlite_store_at_once_all_open_it(tmp_path):
    """Guards the first connections to a new SQLite file: switching it to WAL takes a lock SQLite's busy handler
    does not wait for, so a second process doing the same at that moment failed with "database is locked" (seen
    as a `keel db upgrade` job failing beside another)."""
    import time

    for i in range(4):
        url = f"sqlite:///{tmp_path / f'race{i}.db'}"
        start = str(time.time() + 4.0)
        procs = [subprocess.Popen([sys.executable, "-c", OPEN_AT, url, start], stderr=subprocess.PIPE, text=True)
                 for _ in range(6)]
        errors = [p.communicate(timeout=120)[1] for p in procs]
        assert all(p.returncode == 0 for p in procs), [e[-600:] for e in errors if e]
