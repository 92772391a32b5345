"""Daily usage rollups: the ledger's figures added up per (UTC day, team, key, user, use case, model,
deployment, provider, status), so reports over whole days read one row per group and day instead of one per call.

Kept in the same transaction as the ledger rows they count (`add`, called by the ledger's flush thread: one
upsert per (day, group) per batch, nothing on the request path); a batch that is rolled back (a repeated
request id) is rolled back with its rollup delta, so a row is counted exactly when it is in the ledger, however
many flushes run at once (the upsert adds to the stored figures atomically, in key order so concurrent
flushers on PostgreSQL cannot deadlock). `rebuild` recomputes every rollup from the ledger (the obs_0005
migration's backfill; also for a ledger written straight into the table).

Latency is kept as a histogram with log-spaced buckets (three per doubling, from 1 ms to about 27 minutes, one
column each), so percentiles of any set of groups come from summed columns: the reported value is the geometric
middle of the bucket holding the nearest-rank call, within 12% of the exact one (`BUCKET_RATIO`).

A text key column holds "" for a NULL dimension (a unique key treats NULLs as distinct on both stores), so an
empty text is reported as none (the gateway records none for an empty use case).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from keel.core.db import metadata

HIST = 64  # latency buckets: 0 = under 1 ms; b = [2^((b-1)/3), 2^(b/3)) ms; the last, 2^(62/3) ms (~27 min) and over
BUCKET_RATIO = 2 ** (1 / 3)
H_COLS = [f"h{i:02d}" for i in range(HIST)]
KEY = ["bucket", "team_id", "key_id", "user_id", "use_case", "alias", "deployment", "provider", "status"]
COUNTS = ["requests", "errors", "cancelled", "cache_hits", "tokens_in", "tokens_out"]
SUMS = ["cost", "saved_cost"]
VALUES = COUNTS + SUMS + H_COLS


def _key_columns() -> list[sa.Column]:
    lengths = {"bucket": 10, "team_id": 40, "key_id": 40, "user_id": 40, "use_case": 200, "alias": 200,
               "deployment": 300, "provider": 50, "status": 20}
    return [sa.Column(n, sa.String(lengths[n]), primary_key=True) for n in KEY]


def columns() -> list[sa.Column]:
    """The rollup table's columns (also what the migration creates)."""
    return [*_key_columns(),
            *(sa.Column(n, sa.BigInteger, nullable=False, server_default="0") for n in COUNTS),
            *(sa.Column(n, sa.Float, nullable=False, server_default="0") for n in SUMS),
            *(sa.Column(n, sa.Integer, nullable=False, server_default="0") for n in H_COLS)]


usage_rollup = sa.Table("usage_rollup", metadata, *columns(),
                        sa.Index("ix_usage_rollup_team_bucket", "team_id", "bucket"),
                        sa.Index("ix_usage_rollup_key_bucket", "key_id", "bucket"),
                        sa.Index("ix_usage_rollup_user_bucket", "user_id", "bucket"))


def bucket_of(latency_ms: float | None) -> int:
    """The histogram bucket of a latency."""
    ms = float(latency_ms or 0.0)
    if ms < 1.0:
        return 0
    return min(HIST - 1, int(math.floor(3 * math.log2(ms))) + 1)


def bucket_value(b: int) -> float:
    """The value reported for a percentile that falls in bucket `b`: its geometric middle (0.5 ms for bucket 0; the
    last bucket's lower edge, a lower bound)."""
    if b == 0:
        return 0.5
    return round(2 ** ((b - 1) / 3 if b == HIST - 1 else (b - 0.5) / 3), 3)


def hist_percentile(hist: list[int], p: float) -> float | None:
    """Nearest rank over a histogram: the bucket holding the smallest call with p% of the calls at or below it."""
    n = sum(hist)
    if n == 0:
        return None
    rank, seen = max(math.ceil(p / 100 * n), 1), 0
    for b, count in enumerate(hist):
        seen += count
        if seen >= rank:
            return bucket_value(b)
    return bucket_value(HIST - 1)  # pragma: no cover - the counts add up to n


def day_of(ts: Any) -> str:
    """A ledger timestamp's UTC day, `YYYY-MM-DD` (a datetime, or the ISO text SQLite hands back)."""
    if isinstance(ts, str):
        ts = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC).strftime("%Y-%m-%d")


def _text(v: Any) -> str:
    return "" if v is None else str(v)


def aggregate(rows: Iterable[Mapping[str, Any]], into: dict[tuple[str, ...], list[Any]] | None = None
              ) -> dict[tuple[str, ...], list[Any]]:
    """Ledger rows added up per rollup key: key → the figures in `VALUES` order."""
    out = {} if into is None else into
    for row in rows:
        key = (day_of(row["ts"]), _text(row.get("team_id")), _text(row.get("key_id")), _text(row.get("user_id")),
               _text(row.get("use_case")), _text(row.get("alias")), _text(row.get("deployment")),
               _text(row.get("provider")), _text(row.get("status")))
        v = out.get(key)
        if v is None:
            v = out[key] = [0] * len(COUNTS) + [0.0] * len(SUMS) + [0] * HIST
        status = row.get("status")
        v[0] += 1
        v[1] += status == "error"
        v[2] += status == "cancelled"
        v[3] += bool(row.get("cache_hit"))
        v[4] += int(row.get("tokens_in") or 0)
        v[5] += int(row.get("tokens_out") or 0)
        v[6] += float(row.get("cost") or 0.0)
        v[7] += float(row.get("saved_cost") or 0.0)
        v[8 + bucket_of(row.get("latency_ms"))] += 1
    return out


def _upsert(dialect: sa.Dialect) -> Any:
    ins = (postgresql.insert if dialect.name == "postgresql" else sqlite.insert)(usage_rollup)
    return ins.on_conflict_do_update(index_elements=KEY,
                                     set_={n: usage_rollup.c[n] + ins.excluded[n] for n in VALUES})


def write(conn: sa.Connection, sums: dict[tuple[str, ...], list[Any]]) -> None:
    """Add `sums` to the stored rollups, one upsert per key, in key order (on `conn`'s transaction)."""
    if not sums:
        return
    params = [{**dict(zip(KEY, k)), **dict(zip(VALUES, sums[k]))} for k in sorted(sums)]
    conn.execute(_upsert(conn.dialect), params)


def add(conn: sa.Connection, rows: Iterable[Mapping[str, Any]]) -> None:
    """Count ledger rows being written on `conn`'s transaction into the rollups."""
    write(conn, aggregate(rows))


LEDGER_COLUMNS = ("ts", "team_id", "key_id", "user_id", "use_case", "alias", "deployment", "provider", "status",
                  "cache_hit", "tokens_in", "tokens_out", "cost", "saved_cost", "latency_ms")


def rebuild(conn: sa.Connection) -> int:
    """Recompute every rollup from the ledger on `conn`'s transaction; returns the ledger rows counted."""
    ledger = sa.table("usage_ledger", *(sa.column(n) for n in LEDGER_COLUMNS))
    conn.execute(usage_rollup.delete())
    sums: dict[tuple[str, ...], list[Any]] = {}
    n = 0
    result = conn.execution_options(yield_per=20_000).execute(sa.select(*ledger.c))
    for part in result.mappings().partitions():
        aggregate(part, sums)
        n += len(part)
    keys = sorted(sums)
    for i in range(0, len(keys), 5000):
        write(conn, {k: sums[k] for k in keys[i:i + 5000]})
    return n
