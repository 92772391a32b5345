"""Daily usage rollups: the ledger's figures added up per (UTC day, team, key, user, use case, model,
deployment, provider, status), so reports over whole days read one row per group and day instead of one per call.
Each call is counted at several grains (`GRAINS`): `key` keeps every dimension above; the others keep a few and
sum over the rest ("" in the dropped columns), so a report reads the smallest grain that keeps what it groups,
filters or is scoped by (an admin's daily series reads one row per team and day, a member's its keys' rows).

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
KEY = ["grain", "bucket", "team_id", "key_id", "user_id", "use_case", "alias", "deployment", "provider", "status"]
COUNTS = ["requests", "errors", "cancelled", "cache_hits", "tokens_in", "tokens_out"]
SUMS = ["cost", "saved_cost"]
VALUES = COUNTS + SUMS + H_COLS


def _key_columns() -> list[sa.Column]:
    lengths = {"grain": 12, "bucket": 10, "team_id": 40, "key_id": 40, "user_id": 40, "use_case": 200, "alias": 200,
               "deployment": 300, "provider": 50, "status": 20}
    return [sa.Column(n, sa.String(lengths[n]), primary_key=True) for n in KEY]


def columns() -> list[sa.Column]:
    """The rollup table's columns (also what the migration creates)."""
    return [*_key_columns(),
            *(sa.Column(n, sa.BigInteger, nullable=False, server_default="0") for n in COUNTS),
            *(sa.Column(n, sa.Float, nullable=False, server_default="0") for n in SUMS),
            *(sa.Column(n, sa.Integer, nullable=False, server_default="0") for n in H_COLS)]


# the primary key leads with (grain, bucket): a report reads one grain's range of days; a member's, by its key
usage_rollup = sa.Table("usage_rollup", metadata, *columns(),
                        sa.Index("ix_usage_rollup_key_bucket", "key_id", "bucket"))


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
        if len(ts) >= 10 and ts[10:11] in ("", " ", "T") and "+" not in ts[10:] and "Z" not in ts:
            return ts[:10]  # SQLite's UTC text
        ts = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    elif ts.tzinfo is not UTC:
        ts = ts.astimezone(UTC)
    return ts.date().isoformat()  # a fifth of strftime's time: this runs per ledger row in the flush thread


def _text(v: Any) -> str:
    return "" if v is None else str(v)


DETAIL = KEY[2:]  # the dimensions of a call, after grain and bucket
# grain → the dimensions it keeps (the others are ""), smallest first: a report reads the first grain that keeps
# every dimension it groups, filters or is scoped by (rollup_report.grain_for)
GRAINS: dict[str, tuple[str, ...]] = {
    "team": ("team_id",),
    "who": ("team_id", "key_id", "user_id"),
    "model": ("team_id", "alias"),
    "use_case": ("team_id", "use_case"),
    "status": ("team_id", "status"),
    "deployment": ("team_id", "deployment", "provider"),
    "all": ("team_id", "use_case", "alias", "deployment", "provider", "status"),
    "key": tuple(DETAIL),
}
_KEEP = {g: tuple(DETAIL.index(c) for c in kept) for g, kept in GRAINS.items()}


# Figures while adding up: the eight sums in `COUNTS + SUMS` order, then the latency histogram as {bucket: calls}
# (sparse: a group's calls fall in a few buckets); dense columns only when written.
Figures = list[Any]
# how each grain is computed: from the per-call sums ("key"), or from a finer grain already computed
_FROM = {"key": None, "who": "key", "all": "key", "team": "all", "model": "all", "use_case": "all", "status": "all",
         "deployment": "all"}


def _add(out: dict[tuple[str, ...], Figures], key: tuple[str, ...], status: Any, cache_hit: Any, n_in: Any,
         n_out: Any, cost: Any, saved: Any, latency: Any) -> None:
    v = out.get(key)
    if v is None:
        v = out[key] = [0, 0, 0, 0, 0, 0, 0.0, 0.0, {}]
    v[0] += 1
    v[1] += status == "error"
    v[2] += status == "cancelled"
    v[3] += bool(cache_hit)
    v[4] += int(n_in or 0)
    v[5] += int(n_out or 0)
    v[6] += float(cost or 0.0)
    v[7] += float(saved or 0.0)
    b = bucket_of(latency)
    v[8][b] = v[8].get(b, 0) + 1


def aggregate(rows: Iterable[Mapping[str, Any]], into: dict[tuple[str, ...], Figures] | None = None
              ) -> dict[tuple[str, ...], Figures]:
    """Ledger rows added up per (day, *DETAIL): that key → its figures."""
    out = {} if into is None else into
    for row in rows:
        g = row.get
        _add(out, (day_of(row["ts"]), *(_text(g(c)) for c in DETAIL)), g("status"), g("cache_hit"),
             g("tokens_in"), g("tokens_out"), g("cost"), g("saved_cost"), g("latency_ms"))
    return out


def _project(source: dict[tuple[str, ...], Figures], keep: tuple[int, ...]) -> dict[tuple[str, ...], Figures]:
    out: dict[tuple[str, ...], Figures] = {}
    blank = [""] * len(DETAIL)
    for (day, *dims), f in source.items():
        projected = list(blank)
        for i in keep:
            projected[i] = dims[i]
        key = (day, *projected)
        v = out.get(key)
        if v is None:
            out[key] = [*f[:8], dict(f[8])]
            continue
        for i in range(8):
            v[i] += f[i]
        h = v[8]
        for b, n in f[8].items():
            h[b] = h.get(b, 0) + n
    return out


def by_grain(detail: dict[tuple[str, ...], Figures]) -> dict[tuple[str, ...], Figures]:
    """Per-call sums (from `aggregate`) at every grain: (grain, day, *DETAIL with "" for what it drops) → figures.
    A coarse grain is added up from a finer one already computed (fewer groups to merge)."""
    per: dict[str, dict[tuple[str, ...], Figures]] = {}
    for grain, source in _FROM.items():
        per[grain] = detail if source is None else _project(per[source], _KEEP[grain])
    return {(grain, *k): f for grain, sums in per.items() for k, f in sums.items()}


_compiled: dict[str, tuple[sa.Dialect, str, bool]] = {}


def write(conn: sa.Connection, sums: dict[tuple[str, ...], Figures]) -> None:
    """Add `sums` to the stored rollups, one upsert per key, in key order (on `conn`'s transaction). The upsert is
    compiled once per dialect and run with plain driver parameters (no per-row statement bookkeeping: a rebuild
    writes a row per group and grain)."""
    if not sums:
        return
    dialect = conn.dialect
    cached = _compiled.get(dialect.name)
    if cached is None or cached[0] is not dialect:
        ins = (postgresql.insert if dialect.name == "postgresql" else sqlite.insert)(usage_rollup)
        stmt = ins.on_conflict_do_update(index_elements=KEY,
                                         set_={n: usage_rollup.c[n] + ins.excluded[n] for n in VALUES})
        compiled = stmt.compile(dialect=dialect)
        if dialect.positional:
            assert list(compiled.positiontup or ()) == KEY + VALUES, compiled.positiontup
        cached = _compiled[dialect.name] = (dialect, compiled.string, dialect.positional)
    rows = []
    for k in sorted(sums):
        f = sums[k]
        dense = [0] * HIST
        for b, n in f[8].items():
            dense[b] = n
        rows.append((*k, *f[:8], *dense))
    names = KEY + VALUES
    conn.exec_driver_sql(cached[1], rows if cached[2] else [dict(zip(names, r)) for r in rows])


def add(conn: sa.Connection, rows: Iterable[Mapping[str, Any]]) -> None:
    """Count ledger rows being written on `conn`'s transaction into the rollups."""
    write(conn, by_grain(aggregate(rows)))


LEDGER_COLUMNS = ("ts", "team_id", "key_id", "user_id", "use_case", "alias", "deployment", "provider", "status",
                  "cache_hit", "tokens_in", "tokens_out", "cost", "saved_cost", "latency_ms")


def rebuild(conn: sa.Connection) -> int:
    """Recompute every rollup from the ledger on `conn`'s transaction; returns the ledger rows counted."""
    ledger = sa.table("usage_ledger", *(sa.column(n) for n in LEDGER_COLUMNS))
    conn.execute(usage_rollup.delete())
    sums: dict[tuple[str, ...], Figures] = {}
    n = 0
    result = conn.execute(sa.select(*ledger.c).execution_options(yield_per=20_000))  # this statement only
    for part in result.partitions():
        for (ts, team, key, user, use_case, alias, deployment, provider, status, cache_hit, n_in, n_out, cost, saved,
             latency) in part:
            _add(sums, (day_of(ts), _text(team), _text(key), _text(user), _text(use_case), _text(alias),
                        _text(deployment), _text(provider), _text(status)),
                 status, cache_hit, n_in, n_out, cost, saved, latency)
        n += len(part)
    grains = by_grain(sums)
    keys = sorted(grains)
    for i in range(0, len(keys), 5000):
        write(conn, {k: grains[k] for k in keys[i:i + 5000]})
    return n
