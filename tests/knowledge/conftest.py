"""Knowledge test harness: the real server on a loopback port, the real `keel` CLI, teams and keys
for permission tests, upload helpers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import EMBEDDED, KeelServer, eventually, fake_upstream


def run_cli(srv: KeelServer, *args: str, key: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**srv.env, "KEEL_URL": srv.url, "KEEL_API_KEY": key or srv.admin_key, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "keel", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def kserver_factory(module_server_factory):
    """`module_server_factory` with the embedded models on (local-embed, local-chat)."""
    return lambda **settings: module_server_factory(**{**EMBEDDED, **settings})


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
    """The job once it left queued/running (fails after `timeout` seconds)."""
    def done() -> dict[str, Any] | None:
        v = c.get(f"/v1/jobs/{job_id}").json()
        return v if v["status"] not in ("queued", "running") else None
    return eventually(done, timeout=timeout, interval=0.2)


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
