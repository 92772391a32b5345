"""Settings: defaults < keel.yaml < KEEL_* env; bad values fail before the port is bound."""

import socket
import subprocess
import sys

import pytest

from keel.core.errors import ConfigError
from keel.core.settings import load_settings


def test_env_wins_over_file_and_sources_are_recorded(tmp_path):
    cfg = tmp_path / "keel.yaml"
    cfg.write_text("port: 9001\nlog_level: debug\n")
    settings, sources = load_settings(cfg, environ={"KEEL_PORT": "9002"})
    assert settings.port == 9002 and settings.log_level == "debug"
    assert sources == {"port": "env", "log_level": "file"}


def test_config_path_from_env(tmp_path):
    cfg = tmp_path / "k.yaml"
    cfg.write_text("max_body_bytes: 1234\n")
    settings, _ = load_settings(None, environ={"KEEL_CONFIG": str(cfg)})
    assert settings.max_body_bytes == 1234


@pytest.mark.parametrize("environ,field", [
    ({"KEEL_PORT": "eighty"}, "port"),
    ({"KEEL_LOG_LEVEL": "loud"}, "log_level"),
    ({"KEEL_DATABASE_URL": "mysql://x"}, "database_url"),
])
def test_bad_value_names_field(environ, field):
    with pytest.raises(ConfigError) as exc:
        load_settings(None, environ=environ)
    assert field in exc.value.detail


def test_unknown_setting_in_file_lists_allowed(tmp_path):
    cfg = tmp_path / "keel.yaml"
    cfg.write_text("prot: 1\n")
    with pytest.raises(ConfigError) as exc:
        load_settings(cfg, environ={})
    assert "prot" in exc.value.detail and "port" in exc.value.detail


def test_bad_setting_exits_nonzero_before_binding(tmp_path):
    """Regression guard: a bad value must stop `keel serve` before it listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"KEEL_LOG_LEVEL": "loud", "KEEL_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "keel", "serve", "--port", str(port)], env=env,
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode != 0
    assert "log_level" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "keel.db").exists()
