"""Where mandate files come from at start: the `agents_dir` setting (not the directory the server was started
in), and a broken mandate file there stops the start, naming file, line and field, before the port is bound."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import start_server

pytestmark = pytest.mark.store

MANDATE = """\
name: {name}
model: agent-model
goal: help
tools:
  notify: {{allow_recipients: ["*@acme.example"]}}
"""


def test_a_server_started_elsewhere_loads_the_mandates_of_its_agents_dir(tmp_path, db_url):
    folder = tmp_path / "config" / "mandates"
    folder.mkdir(parents=True)
    (folder / "helper.yaml").write_text(MANDATE.format(name="dir_helper"))
    decoy = tmp_path / "data" / "agents"  # the server's cwd is its data dir: a ./agents there is not read
    decoy.mkdir(parents=True)
    (decoy / "decoy.yaml").write_text(MANDATE.format(name="cwd_decoy"))
    srv = start_server(tmp_path / "data", db_url, KEEL_AGENTS_DIR=str(folder))
    try:
        with srv.admin() as c:
            names = [a["name"] for a in c.get("/v1/agents").json()["data"]]
        assert names == ["dir_helper"]
    finally:
        srv.stop()


def test_a_broken_mandate_file_stops_the_start_naming_file_line_and_field(tmp_path, db_url):
    folder = tmp_path / "mandates"
    folder.mkdir()
    (folder / "a_good.yaml").write_text(MANDATE.format(name="good_one"))
    (folder / "b_broken.yaml").write_text(MANDATE.format(name="broken_one") + "budgets: {steps: -1}\n")
    srv = start_server(tmp_path / "data", db_url, wait=False, KEEL_AGENTS_DIR=str(folder))
    try:
        rc = srv.proc.wait(timeout=120)
    finally:
        srv.stop()
    logs = srv.logs().replace("\n", "")  # the error line is wrapped at the terminal width
    assert rc == 1, logs
    assert str(folder / "b_broken.yaml") in logs, logs
    assert "line 6" in logs and "budgets.steps" in logs, logs
    assert "Keel is running" not in logs and '"msg":"starting"' not in logs, logs  # stopped before serving


def test_an_agents_dir_that_is_not_a_folder_stops_the_start(tmp_path, db_url):
    missing = tmp_path / "no-such-folder"
    srv = start_server(tmp_path / "data", db_url, wait=False, KEEL_AGENTS_DIR=str(missing))
    try:
        rc = srv.proc.wait(timeout=120)
    finally:
        srv.stop()
    logs = srv.logs().replace("\n", "")
    assert rc == 1 and "agents_dir" in logs and str(missing) in logs, logs


def test_agents_dir_is_unset_by_default_and_must_name_a_folder_when_set(tmp_path):
    from keel.core.errors import ConfigError
    from keel.core.settings import load_settings

    assert load_settings(environ={})[0].agents_dir is None  # then ./agents is read if there is one
    with pytest.raises(ConfigError, match="agents_dir"):
        load_settings(environ={"KEEL_AGENTS_DIR": str(tmp_path / "absent")})
    assert load_settings(environ={"KEEL_AGENTS_DIR": str(tmp_path)})[0].agents_dir == Path(tmp_path)


def test_a_mandate_refused_when_defined_stops_the_start_naming_the_file(tmp_path, db_url):
    folder = tmp_path / "mandates"
    folder.mkdir()
    (folder / "crm.yaml").write_text("name: crm_agent\nmodel: agent-model\ngoal: g\ntools:\n  crm:\n"
                                     "    endpoint: https://crm.example/x\n    parameters: {type: object}\n"
                                     "    headers: {Authorization: {secret: no-such-secret}}\n")
    srv = start_server(tmp_path / "data", db_url, wait=False, KEEL_AGENTS_DIR=str(folder))
    try:
        rc = srv.proc.wait(timeout=120)
    finally:
        srv.stop()
    logs = srv.logs().replace("\n", "")
    assert rc == 1 and str(folder / "crm.yaml") in logs and "no-such-secret" in logs, logs
    assert '"msg":"starting"' not in logs and "Traceback" not in logs, logs  # one error line, before serving
