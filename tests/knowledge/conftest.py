"""Knowledge test harness: the real server on a loopback port, the real `keel` CLI, teams and keys
for permission tests, upload helpers."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import KeelServer, fake_upstream, free_port, keel_env, new_db_url



def start_kserver(data_dir: Path, db_url: str, *, wait: bool = True, **env: str) -> KeelServer:
    """Like conftest.start_server, with the embedded models on (local-embed, local-chat)."""
    port = free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / f"server-{port}.log"
    full_env = keel_env(data_dir, db_url, KEEL_EMBEDDED_MODELS="true", KEEL_LOCAL_THREADS="1", **env)
    args = [sys.executable, "-m", "keel", "serve", "--port", str(port)]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=str(data_dir))
    srv = KeelServer(url=f"http://127.0.0.1:{port}", proc=proc, log_path=log_path, data_dir=data_dir, env=full_env)
    srv.extra["db_url"] = db_url
    deadline = time.monotonic() + 120
    while wait and time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"keel exited with {proc.returncode}:\n{srv.logs()[-4000:]}")
        try:
            if httpx.get(srv.url + "/healthz", timeout=1).status_code == 200:
                return srv
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    if wait:
        srv.stop(signal.SIGKILL)
        raise RuntimeError(f"keel did not start in time:\n{srv.logs()[-4000:]}")
    return srv


def run_cli(srv: KeelServer, *args: str, key: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**srv.env, "KEEL_URL": srv.url, "KEEL_API_KEY": key or srv.admin_key, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "keel", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def kserver_factory(tmp_path_factory, pg_server: Any):
    started: list[KeelServer] = []

    def make(**env: Any) -> KeelServer:
        base = tmp_path_factory.mktemp("kn")
        db = env.pop("db_url", None) or new_db_url(base, pg_server)
        srv = start_kserver(env.pop("data_dir", base / "data"), db, **env)
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()


@pytest.fixture(scope="module")
def ksrv(kserver_factory) -> KeelServer:
    return kserver_factory()


def make_key(srv: KeelServer, role: str, team: str | None = None, **scopes: Any) -> str:
    with srv.admin() as a:
        r = a.post("/admin/keys", json={"role": role, "team": team, "name": f"{role}-{team}",
                                       "scopes": scopes or {}})
        assert r.status_code == 201, r.text
        return r.json()["key"]


def make_team(srv: KeelServer, name: str) -> str:
    with srv.admin() as a:
        r = a.post("/admin/teams", json={"name": name})
        if r.status_code == 409:
            return a.get(f"/admin/teams/{name}").json()["id"]
        assert r.status_code == 201, r.text
        return r.json()["id"]


def upload(c: httpx.Client, collection: str, files: dict[str, bytes], *, wait: float = 120,
           **fields: Any) -> httpx.Response:
    """Upload `files` ({source: bytes}) and wait for the job; returns the final job response."""
    data = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in fields.items()}
    data["sources"] = json.dumps(list(files))
    parts = [("files", (name.rsplit("/", 1)[-1], body, "application/octet-stream")) for name, body in files.items()]
    return c.post(f"/v1/collections/{collection}/documents", params={"wait": wait}, files=parts, data=data,
                  timeout=wait + 30)


def wait_job(c: httpx.Client, job_id: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        v = c.get(f"/v1/jobs/{job_id}").json()
        if v["status"] not in ("queued", "running") or time.monotonic() > deadline:
            return v
        time.sleep(0.2)


@pytest.fixture(scope="module")
def upstream():
    """The loopback fake OpenAI-compatible upstream (tests/fakes): the only fake, at the network edge."""
    with fake_upstream() as root:
        yield root + "/v1"


def fake_chat_config(tmp: Path, base_url: str) -> Path:
    cfg = tmp / "keel.yaml"
    cfg.write_text(f"models:\n  - alias: fake-chat\n    provider: openai_compatible\n    model: gpt-fake\n"
                   f"    base_url: {base_url}\n")
    return cfg
