"""`keel up`: embedded defaults, prints the URL and — on first start only — the admin key."""

import os
import re
import signal
import subprocess
import sys
import time

import httpx

from conftest import free_port


def _up(tmp_path, port):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEEL_")}
    env.update({"KEEL_DATA_DIR": str(tmp_path / ".keel"), "PYTHONUNBUFFERED": "1"})
    return subprocess.Popen([sys.executable, "-m", "keel", "up", "--port", str(port)], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def _wait_ready(url, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return False


def _stop(proc):
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    return proc.returncode, out


def test_up_prints_url_and_key_once_then_serves_models_and_demo_data(tmp_path):
    port = free_port()
    proc = _up(tmp_path, port)
    url = f"http://127.0.0.1:{port}"
    assert _wait_ready(url), "keel up did not become ready within 60 s"
    assert (tmp_path / ".keel" / "keel.db").exists()
    lines = []
    while not any("sk-keel-" in line for line in lines):
        lines.append(proc.stdout.readline())
    key = re.search(r"sk-keel-\S+", "".join(lines)).group(0)
    assert any(url in line for line in lines)
    headers = {"Authorization": f"Bearer {key}"}
    deadline = time.monotonic() + 90
    docs = []
    while time.monotonic() < deadline and len(docs) < 3:  # demo data: the handbook, ingested in the background
        colls = httpx.get(url + "/v1/collections", headers=headers).json()["data"]
        if colls:
            docs = httpx.get(url + f"/v1/collections/{colls[0]['id']}/documents", headers=headers).json()["data"]
        time.sleep(0.5)
    assert [c["name"] for c in colls] == ["handbook"] and len(docs) == 3
    rc, _ = _stop(proc)
    assert rc == 0
    port2 = free_port()
    proc = _up(tmp_path, port2)
    url2 = f"http://127.0.0.1:{port2}"
    assert _wait_ready(url2)
    models = httpx.get(url2 + "/v1/models", headers={"Authorization": f"Bearer {key}"}).json()
    assert {"local-chat", "local-embed"} <= {m["id"] for m in models["data"]}
    rc, out = _stop(proc)
    assert rc == 0 and "sk-keel-" not in out
