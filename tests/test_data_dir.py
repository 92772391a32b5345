"""The data directory holds documents, the audit trail and the vector index: Keel makes it private (0700)."""

from __future__ import annotations

import logging
import stat

from keel.core.datadir import prepare_data_dir

from conftest import start_server


def test_a_new_data_directory_is_made_private_even_under_a_lax_umask(tmp_path):
    import os

    old = os.umask(0o002)
    try:
        target = tmp_path / "a" / "keel"
        prepare_data_dir(target)
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == 0o700


def test_an_existing_directory_others_can_read_is_kept_with_a_warning_that_says_the_fix(tmp_path, caplog):
    tmp_path.chmod(0o755)
    with caplog.at_level(logging.WARNING, logger="keel.server"):
        prepare_data_dir(tmp_path)
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o755
    assert any(getattr(r, "fix", "") == f"chmod 700 {tmp_path}" for r in caplog.records)


def test_the_server_makes_its_data_directory_private(tmp_path, db_url):
    fresh = tmp_path / "fresh" / "keel"
    srv = start_server(tmp_path, db_url, KEEL_DATA_DIR=str(fresh))
    try:
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
    finally:
        srv.stop()
