"""Store-write counter for bench/capacity.py, loaded into each Keel process it starts (`PYTHONPATH` puts this
directory first, so Python imports it at start-up). Counts, with SQLAlchemy's public event API on every engine
of the process (Keel's store and DBOS' system database): statements, write statements (INSERT, UPDATE, DELETE,
UPSERT), commits, and commits of a transaction that wrote. A thread writes the totals to
`$KEEL_CAPACITY_PROBE` (JSON) every 0.1 s. Inert unless that variable is set; changes nothing Keel does.
"""

from __future__ import annotations

import json
import os
import threading
import time

_OUT = os.environ.get("KEEL_CAPACITY_PROBE")
WRITES = ("insert", "update", "delete", "upsert", "merge", "replace")

if _OUT:
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    counts = {"statements": 0, "writes": 0, "commits": 0, "write_commits": 0, "rollbacks": 0}
    lock = threading.Lock()

    def _add(key: str) -> None:
        with lock:
            counts[key] += 1

    @event.listens_for(Engine, "before_cursor_execute")
    def _statement(conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001, ARG001
        _add("statements")
        head = statement.lstrip().split(None, 1)[0].lower() if statement.strip() else ""
        if head == "with":  # WITH … INSERT/UPDATE
            head = next((w for w in WRITES if w in statement.lower()), head)
        if head in WRITES:
            _add("writes")
            conn.info["_probe_wrote"] = True

    @event.listens_for(Engine, "commit")
    def _commit(conn):  # noqa: ANN001
        _add("commits")
        if conn.info.pop("_probe_wrote", False):
            _add("write_commits")

    @event.listens_for(Engine, "rollback")
    def _rollback(conn):  # noqa: ANN001
        _add("rollbacks")
        conn.info.pop("_probe_wrote", None)

    def _dump() -> None:
        tmp = _OUT + ".tmp"
        while True:
            with lock:
                snap = dict(counts, t=time.time())
            with open(tmp, "w") as f:
                json.dump(snap, f)
            os.replace(tmp, _OUT)
            time.sleep(0.1)

    threading.Thread(target=_dump, name="capacity-probe", daemon=True).start()
