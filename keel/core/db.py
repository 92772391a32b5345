"""The store: one SQLAlchemy engine, per-dialect hooks, Alembic migrations from every capability.

Each capability declares its tables on the shared `metadata` and keeps its migrations in its own
`migrations/` folder (an Alembic branch), so capabilities never edit each other's history.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from keel.core.errors import ConfigError, StoreUnavailable, Unavailable

log = logging.getLogger("keel.db")

metadata = sa.MetaData(naming_convention={
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
})

KEEL_ROOT = Path(__file__).resolve().parent.parent
MIGRATION_LOCK_KEY = 0x6B65656C_6D696772  # PostgreSQL advisory lock id: "keelmigr"
FIRST_START_LOCK_KEY = 0x6B65656C_66697273  # "keelfirs"
MIGRATION_WAIT_S = 600  # how long a process waits for another's migrations on SQLite
BUSY_TIMEOUT_MS = 30000  # how long a SQLite writer waits for the write lock otherwise
PG_CONNECT_TIMEOUT_S = 3  # a PostgreSQL that does not answer a connect is unavailable: fail fast, never hang
PG_STATEMENT_TIMEOUT_S = 30.0  # one that hangs mid-query is too: the statement is cancelled (0: no limit)


def migration_dirs() -> list[str]:
    """Every `keel/<capability>/migrations/versions` folder, core first."""
    dirs = sorted(KEEL_ROOT.glob("*/migrations/versions"), key=lambda p: (p.parent.parent.name != "core", str(p)))
    return [str(p) for p in dirs]


class Store:
    """The engine plus dialect specifics. `Store.open(url)` picks the subclass by URL."""

    dialect = "base"

    def __init__(self, url: str, engine: Engine) -> None:
        self.url = url
        self.engine = engine
        self.applied: list[str] = []  # the heads the last `upgrade()` moved to, none when it was current

    @staticmethod
    def open(url: str, **kw: Any) -> "Store":
        if url.startswith("sqlite"):
            return SQLiteStore.create(url, **kw)
        if url.startswith("postgresql"):
            return PostgresStore.create(url, **kw)
        raise ConfigError(f"unsupported database URL scheme in {url.split(':', 1)[0]!r}",
                          fix="use sqlite:///PATH or postgresql+psycopg://USER@HOST/DB")

    # -- migrations -------------------------------------------------------------------
    def _alembic_config(self):  # noqa: ANN202
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(KEEL_ROOT / "core" / "migrations"))
        cfg.set_main_option("version_locations", " ".join(migration_dirs()))
        cfg.set_main_option("path_separator", "space")
        return cfg

    def upgrade(self) -> list[str]:
        """Apply every pending migration of every capability under the database's migration lock, so replicas
        starting together wait while one migrates; returns the heads now applied."""
        from alembic import command
        from alembic.runtime.migration import MigrationContext

        cfg = self._alembic_config()
        with self.engine.connect() as conn, self.migration_lock(conn), conn.begin():
            before = set(MigrationContext.configure(conn).get_current_heads())
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "heads")
            after = set(MigrationContext.configure(conn).get_current_heads())
        self.applied = sorted(after - before)
        if self.applied:
            log.info("database migrated", extra={"dialect": self.dialect, "heads": sorted(after)})
        return sorted(after)

    def migration_lock(self, conn: sa.Connection) -> contextlib.AbstractContextManager[None]:
        """Held around the upgrade's transaction on `conn`: one process migrates, the others wait (a dialect hook)."""
        raise NotImplementedError

    @contextlib.contextmanager
    def first_start_lock(self) -> Iterator[None]:
        """Held while a starting process makes what only the first start makes (the bootstrap admin key), so
        replicas starting together on a fresh store make it once. Nothing is held on SQLite: one process
        serves a SQLite store (the index's lock file sees to it)."""
        yield

    def expected_heads(self) -> set[str]:
        from alembic.script import ScriptDirectory

        return set(ScriptDirectory.from_config(self._alembic_config()).get_heads())

    def current_heads(self) -> list[str]:
        from alembic.runtime.migration import MigrationContext

        with self.engine.connect() as conn:
            return sorted(MigrationContext.configure(conn).get_current_heads())

    def is_current(self) -> bool:
        return set(self.current_heads()) == self.expected_heads()

    @contextlib.contextmanager
    def read(self) -> Iterator[sa.Connection]:
        """A read-only connection. On SQLite it begins a plain (deferred) transaction, so readers never
        queue behind writers for the write lock the way `engine.begin()` (BEGIN IMMEDIATE) does."""
        with self.engine.connect() as conn:
            conn.info["write"] = False
            try:
                yield conn
            finally:
                conn.info["write"] = True

    def ping(self) -> None:
        try:
            with self.engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        except sa.exc.SQLAlchemyError as exc:
            raise Unavailable(f"database unreachable: {type(exc).__name__}",
                              fix="check KEEL_DATABASE_URL and that the database is running") from None

    def dispose(self) -> None:
        self.engine.dispose()


def store_unavailable(exc: BaseException) -> StoreUnavailable | None:
    """The `StoreUnavailable` a request answers with when `exc` says the database is down, restarting or out of
    connections (not a bug of the query: a wrong statement stays an internal error); None otherwise."""
    down = isinstance(exc, sa.exc.TimeoutError) or (  # the pool had no connection to give in time
        isinstance(exc, sa.exc.DBAPIError) and (exc.connection_invalidated or (
            isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError))
            and type(exc.orig).__module__.split(".")[0] == "psycopg")))
    if not down:
        return None
    return StoreUnavailable(f"the database is unavailable ({type(exc).__name__}); the request was not carried out",
                            fix="retry after the Retry-After interval; if it persists, check that the database is "
                                "running and reachable at KEEL_DATABASE_URL")


def _wal(cur: Any, wait_s: float = 30.0) -> None:
    """Put the file in WAL mode. Converting a new file takes a lock SQLite's busy handler does not wait for, so
    processes opening a fresh store at once (replicas, `keel db upgrade` jobs) got "database is locked": retry,
    backing off, for as long as a writer would wait."""
    deadline, pause = time.monotonic() + wait_s, 0.005
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 0.2)


class SQLiteStore(Store):
    """Embedded default: a file in WAL mode, foreign keys on, writers wait instead of failing."""

    dialect = "sqlite"

    @classmethod
    def create(cls, url: str, **kw: Any) -> "SQLiteStore":
        path = url.split("///", 1)[1] if "///" in url else ""
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30},
                                  pool_size=kw.get("pool_size", 8), max_overflow=16, pool_pre_ping=False)

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):  # noqa: ANN001
            # Take transaction control from pysqlite so BEGIN IMMEDIATE can serialise writers.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            _wal(cur)
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            cur.close()

        @sa.event.listens_for(engine, "begin")
        def _begin(conn):  # noqa: ANN001
            conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.info.get("write", True) else "BEGIN")

        return cls(url, engine)

    @contextlib.contextmanager
    def migration_lock(self, conn: sa.Connection) -> Iterator[None]:
        """SQLite's one write lock: the upgrade's transaction begins with BEGIN IMMEDIATE, so another process's
        upgrade waits at its BEGIN, then finds the store current; it waits as long as a migration may take."""
        raw = conn.connection.dbapi_connection
        raw.execute(f"PRAGMA busy_timeout={MIGRATION_WAIT_S * 1000}")
        try:
            yield
        finally:
            raw.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")


class PostgresStore(Store):
    """Scale-out: PostgreSQL via psycopg 3; pgvector is enabled by the knowledge migrations."""

    dialect = "postgresql"

    @classmethod
    def create(cls, url: str, **kw: Any) -> "PostgresStore":
        connect_args = {} if "connect_timeout" in url else {"connect_timeout": PG_CONNECT_TIMEOUT_S}
        engine = sa.create_engine(url, pool_size=kw.get("pool_size", 10), max_overflow=20, pool_pre_ping=True,
                                  connect_args=connect_args)
        timeout_s = kw.get("statement_timeout_s", PG_STATEMENT_TIMEOUT_S)
        timeout_ms = max(1, round(1000 * timeout_s)) if timeout_s > 0 else 0  # 0: none (never rounded into it)

        @sa.event.listens_for(engine, "connect")
        def _statement_timeout(dbapi_conn, _record):  # noqa: ANN001
            with dbapi_conn.cursor() as cur:
                cur.execute(f"SET statement_timeout = {timeout_ms}")
            dbapi_conn.commit()

        return cls(url, engine, statement_timeout_ms=timeout_ms)

    def __init__(self, url: str, engine: Engine, *, statement_timeout_ms: int = 0) -> None:
        super().__init__(url, engine)
        self.statement_timeout_ms = statement_timeout_ms  # what each connection is set to, restored after a migration

    @contextlib.contextmanager
    def migration_lock(self, conn: sa.Connection, key: int = MIGRATION_LOCK_KEY) -> Iterator[None]:
        """A session advisory lock: replicas (and `keel db upgrade` jobs) queue on it, one migrates, the rest
        then read the version table it committed and have nothing left to do. No statement timeout while held:
        waiting for another's migrations, or one building an index, may take long."""
        conn.execute(sa.text("SET statement_timeout = 0"))
        conn.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": key})
        conn.commit()
        try:
            yield
        finally:
            conn.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
            conn.execute(sa.text(f"SET statement_timeout = {self.statement_timeout_ms}"))
            conn.commit()

    @contextlib.contextmanager
    def first_start_lock(self) -> Iterator[None]:
        with self.engine.connect() as conn, self.migration_lock(conn, key=FIRST_START_LOCK_KEY):
            yield
