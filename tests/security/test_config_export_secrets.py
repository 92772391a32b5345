"""Attacks on `keel config export`: a deployment whose base_url carries a secret (userinfo, or a key in its query
string, as some gateways take it) must not land in files meant for git; export refuses it, naming the deployment
and the fix (keep the secret in the vault as its credential), and writes nothing."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.store
SECRET = "tok-" + "c0ffee" * 6


@pytest.fixture(scope="module")
def srv(module_server_factory):
    return module_server_factory()


def _export(srv, dest) -> subprocess.CompletedProcess:
    env = {**srv.env, "KEEL_URL": srv.url, "KEEL_API_KEY": srv.admin_key, "COLUMNS": "400"}
    return subprocess.run([sys.executable, "-m", "keel", "config", "export", str(dest)], env=env,
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


@pytest.mark.parametrize("alias, base_url", [
    ("userinfo", f"http://svc:{SECRET}@127.0.0.1:9/v1"),
    ("query-key", f"http://127.0.0.1:9/v1?api-key={SECRET}"),
])
def test_a_secret_in_a_base_url_is_never_exported(srv, tmp_path, alias, base_url):
    with srv.admin() as c:
        r = c.post("/admin/deployments", json={"id": alias, "alias": alias, "provider": "openai_compatible",
                                               "model": "m", "base_url": base_url})
        assert r.status_code == 201, r.text
    try:
        out = _export(srv, tmp_path / "cfg")
        written = "".join(p.read_text() for p in (tmp_path / "cfg").rglob("*") if p.is_file()) \
            if (tmp_path / "cfg").exists() else ""
        assert SECRET not in written
        assert out.returncode != 0 and alias in out.stdout + out.stderr, out.stdout + out.stderr
        assert SECRET not in out.stdout + out.stderr
    finally:
        with srv.admin() as c:
            assert c.delete(f"/admin/deployments/{alias}").status_code == 204
