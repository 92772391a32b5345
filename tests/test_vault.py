"""Secrets vault: encrypted at rest; no response body or log line ever carries a secret's value."""

import os
import stat
import subprocess
import sys

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.store

SECRET_CHARS = st.characters(min_codepoint=33, max_codepoint=126)


@given(value=st.text(SECRET_CHARS, min_size=12, max_size=64), name=st.from_regex(r"[a-z][a-z0-9_-]{0,20}", fullmatch=True))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_secret_never_in_responses_or_logs(server, value, name):
    bodies = []
    with server.admin() as c:
        bodies.append(c.put(f"/admin/secrets/{name}", json={"value": value}).text)
        bodies.append(c.get("/admin/secrets").text)
        bodies.append(c.put(f"/admin/secrets/{name}", json={"value": value, "extra": value}).text)
        bodies.append(c.put("/admin/secrets/bad name!", json={"value": value}).text)
        bodies.append(c.get(f"/admin/secrets/{name}").text)
        bodies.append(c.post("/admin/teams", content=value.encode(), headers={"content-type": "application/json"}).text)
        bodies.append(c.get("/v1/me").text)
    for body in bodies:
        assert value not in body
    assert value not in server.logs()


def test_secret_encrypted_at_rest_and_survives_restart(server_factory, db_url):
    srv = server_factory()
    value = "sk-live-" + "Z" * 30
    with srv.admin() as c:
        assert c.put("/admin/secrets/openai", json={"value": value}).status_code == 200
        names = c.get("/admin/secrets").json()["data"]
        assert [n["name"] for n in names] == ["openai"]
    engine = sa.create_engine(db_url)
    with engine.connect() as conn:
        blob = conn.execute(sa.text("SELECT ciphertext FROM secrets")).scalar()
    engine.dispose()
    assert value.encode() not in bytes(blob)
    srv.stop()
    srv2 = server_factory()
    with srv2.admin() as c:
        assert c.delete("/admin/secrets/openai").status_code == 204
        assert c.delete("/admin/secrets/openai").status_code == 404


def test_master_key_file_created_0600(tmp_path, db_url):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEEL_")}
    env.update({"KEEL_DATA_DIR": str(tmp_path), "KEEL_DATABASE_URL": db_url})
    out = subprocess.run([sys.executable, "-m", "keel", "db", "upgrade"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    from keel.core.settings import Settings
    from keel.identity.vault import load_master_key

    key = load_master_key(None, tmp_path)
    mode = stat.S_IMODE((tmp_path / "master.key").stat().st_mode)
    assert mode == 0o600 and load_master_key(None, tmp_path) == key
    assert Settings().data_dir.name == ".keel"
