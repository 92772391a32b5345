"""A PostgreSQL that accepts connections but hangs mid-query (a lock never released, a runaway plan) no longer
holds a request handler forever: Keel's connections carry a statement timeout (`database_statement_timeout_s`,
30 s by default), past which the query is cancelled and the request answers 503 `store_unavailable` with a
Retry-After. Migrations wait for each other without it (the migration lock's wait may be long); `keel backup`
runs pg_dump on its own connections."""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

from conftest import TEST_DB, problem
from keel.core.db import Store, store_unavailable

pytestmark = [pytest.mark.store, pytest.mark.skipif(TEST_DB != "postgres", reason="PostgreSQL's statement_timeout")]


def test_a_hung_query_raises_a_typed_error_and_migrations_are_exempt(db_url):
    store = Store.open(db_url, statement_timeout_s=0.5)
    try:
        start = time.monotonic()
        with pytest.raises(sa.exc.OperationalError) as err, store.engine.connect() as conn:
            conn.execute(sa.text("SELECT pg_sleep(30)"))
        assert time.monotonic() - start < 10
        assert store_unavailable(err.value) is not None
        with store.engine.connect() as conn:
            with store.migration_lock(conn):
                assert conn.execute(sa.text("SHOW statement_timeout")).scalar() == "0"
                conn.execute(sa.text("SELECT pg_sleep(0.8)"))  # longer than the timeout: not cancelled
            assert conn.execute(sa.text("SHOW statement_timeout")).scalar() == "500ms"
        assert store.upgrade()
    finally:
        store.dispose()
    default = Store.open(db_url)
    try:
        with default.engine.connect() as conn:
            assert conn.execute(sa.text("SHOW statement_timeout")).scalar() == "30s"
    finally:
        default.dispose()


def test_a_request_on_a_hung_store_answers_503_not_a_hang(server_factory, db_url):
    """Guards: a request handler blocked forever on a table lock nobody releases."""
    srv = server_factory(KEEL_DATABASE_STATEMENT_TIMEOUT_S="1")
    with srv.admin() as admin:
        assert admin.post("/admin/teams", json={"name": "red"}).status_code in (201, 409)
        engine = sa.create_engine(db_url)
        try:
            with engine.connect() as holder:
                holder.execute(sa.text("LOCK TABLE teams IN ACCESS EXCLUSIVE MODE"))  # held until rollback
                start = time.monotonic()
                r = admin.get("/admin/teams", timeout=30)
                assert time.monotonic() - start < 10
                assert problem(r, 503)["code"] == "store_unavailable"
                assert int(r.headers["retry-after"]) > 0
                holder.rollback()
            assert admin.get("/admin/teams").status_code == 200
        finally:
            engine.dispose()
