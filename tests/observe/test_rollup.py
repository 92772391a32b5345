"""Daily usage rollups: written by the ledger's own flush, they add up to exactly what the raw ledger does for random
rows (every grouping the console uses, every role's view, ranges with partial days at both ends), latency
percentiles within one histogram bucket of the exact nearest rank; concurrent flushes of overlapping batches
(a request id in both) count each row once; `rebuild` (the migration's backfill) gives the same table; a member's
report holds only its own calls. Real store: SQLite, or PostgreSQL with KEEL_TEST_DATABASE=postgres."""

from __future__ import annotations

import random
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from keel.core.db import Store
from keel.identity.principal import Principal
from keel.observe.ledger import Ledger
from keel.observe.rollup import BUCKET_RATIO, HIST, bucket_value, rebuild, usage_rollup
from keel.observe.rollup_report import rollup_report
from keel.observe.tables import usage_ledger
from keel.observe.usage import ReportQuery, report

pytestmark = pytest.mark.store

NOW = datetime(2026, 12, 6, 14, 30, 0, tzinfo=UTC)  # the injected clock: rows and ranges are placed around it
KEYS = [("key_a1", "team_a", "user_1"), ("key_a2", "team_a", None), ("key_b1", "team_b", "user_2"),
        ("key_b2", "team_b", "user_1"), ("key_n", None, None)]
EXACT = ("requests", "errors", "cancelled", "cache_hits", "tokens_in", "tokens_out", "total_tokens")


def random_rows(rnd: random.Random, n: int, prefix: str) -> list[dict[str, Any]]:
    rows = []
    for i in range(n):
        key, team, user = rnd.choice(KEYS)
        ts = NOW - timedelta(seconds=rnd.choice([rnd.uniform(0, 5 * 86400), 14.5 * 3600, 3600 * 38.5]))
        latency = rnd.choice([0.0, 0.4, rnd.lognormvariate(5, 1.2), rnd.uniform(1, 50), 2e6, 5e6])
        rows.append({"request_id": f"{prefix}{i:05d}", "ts": ts, "key_id": key, "team_id": team, "user_id": user,
                     "kind": "chat", "alias": rnd.choice(["m1", "m2", None]), "deployment": rnd.choice(["d/1", None]),
                     "provider": "openai_compatible", "tokens_in": rnd.randint(0, 900),
                     "tokens_out": rnd.randint(0, 300), "cost": rnd.uniform(0, 0.01), "latency_ms": latency,
                     "status": rnd.choice(["ok", "ok", "ok", "error", "cancelled"]), "http_status": 200,
                     "cache_hit": rnd.random() < 0.2, "stream": False, "saved_cost": rnd.choice([0.0, 0.001]),
                     "use_case": rnd.choice([None, "chat", "workflow:lead_intake", "agent:helper"])})
    return rows


@pytest.fixture
def store(db_url: str):
    s = Store.open(db_url)
    s.upgrade()
    yield s
    s.dispose()


def write(store: Store, rows: list[dict[str, Any]], batch: int) -> None:
    ledger = Ledger(store)
    for i in range(0, len(rows), batch):
        for row in rows[i:i + batch]:
            ledger.record(row)
        ledger.flush_sync()


def assert_same(rolled: dict[str, Any], raw: dict[str, Any]) -> None:
    dims = raw["group_by"]
    want = {tuple(g[d] for d in dims): g for g in raw["data"]}
    got = {tuple(g[d] for d in dims): g for g in rolled["data"]}
    assert got.keys() == want.keys()
    for k, w in [*want.items(), ("totals", raw["totals"])]:
        g = rolled["totals"] if k == "totals" else got[k]
        assert {m: g[m] for m in EXACT} == {m: w[m] for m in EXACT}, k
        assert g["cost"] == pytest.approx(w["cost"], abs=1e-9) and g["saved_cost"] == pytest.approx(w["saved_cost"])
        for m in ("latency_p50_ms", "latency_p95_ms"):
            exact, approx = w[m], g[m]
            if exact is None or exact < 1:
                assert approx is None or approx <= 1, (k, m, exact, approx)
            elif exact >= bucket_value(HIST - 1):  # the last bucket's lower edge: a lower bound
                assert approx == bucket_value(HIST - 1), (k, m, exact, approx)
            else:  # the same log-spaced bucket: within one bucket's ratio
                assert exact / BUCKET_RATIO <= approx <= exact * BUCKET_RATIO, (k, m, exact, approx)


PRINCIPALS = [Principal(key_id="admin", role="admin"), Principal(key_id="aud", role="auditor"),
              Principal(key_id="key_x", role="builder", team_id="team_a"),
              Principal(key_id="key_a2", role="member", team_id="team_a"),
              Principal(key_id="key_b1", role="member", team_id="team_b", user_id="user_1"),
              Principal(key_id="key_n", role="reviewer")]
GROUPINGS = [("day",), ("team", "model", "use_case"), ("key",), ("user", "status"), ("workflow",), ("agent",),
             ("deployment", "provider"), ("model",), ("status", "day")]  # every grain is read by some view


def test_rollups_add_up_to_the_ledger_for_every_view(store: Store) -> None:
    rnd = random.Random(21)
    rows = random_rows(rnd, 700, "req_r")
    write(store, rows, batch=97)
    ranges = [(NOW - timedelta(days=3, hours=5), NOW), (NOW - timedelta(days=4), NOW - timedelta(hours=20)),
              (datetime(2026, 12, 2, tzinfo=UTC), datetime(2026, 12, 5, tzinfo=UTC)),  # whole days only
              (NOW - timedelta(hours=3), NOW - timedelta(minutes=1)),  # within one day: the ledger only
              (datetime(2026, 12, 1, tzinfo=UTC), NOW + timedelta(seconds=1))]  # ends after now: today's rollup
    filters = [(), (("team", "team_b"),), (("model", "m1"), ("status", "ok")), (("workflow", "lead_intake"),), ()]
    cases = list(zip(ranges, filters))
    for p in PRINCIPALS:  # each grouping meets two of the cases
        for i, group_by in enumerate(GROUPINGS):
            for (start, end), flt in (cases[i % len(cases)], cases[(i + 2) % len(cases)]):
                q = ReportQuery(group_by=group_by, start=start, end=end, filters=flt)
                raw = report(store, p, q)
                assert_same(rollup_report(store, p, q, now=NOW), raw)
                sums = rollup_report(store, p, q, latency=False, now=NOW)  # no percentiles: the histograms are not read
                assert {m: sums["totals"][m] for m in EXACT} == {m: raw["totals"][m] for m in EXACT}
                assert sums["totals"]["latency_p95_ms"] is None
    # a member's report holds only its own calls, whatever it groups by
    member = PRINCIPALS[3]
    q = ReportQuery(group_by=("team", "key"), start=NOW - timedelta(days=6), end=NOW + timedelta(seconds=1))
    mine = rollup_report(store, member, q, now=NOW)
    assert [(g["team"], g["key"]) for g in mine["data"]] == [("team_a", "key_a2")]
    assert mine["totals"]["requests"] == sum(r["key_id"] == "key_a2" for r in rows)
    # the backfill recomputes the same table the flushes kept
    with store.engine.connect() as conn:
        kept = sorted(tuple(r) for r in conn.execute(sa.select(usage_rollup)))
    with store.engine.begin() as conn:
        assert rebuild(conn) == len(rows)
    with store.engine.connect() as conn:
        rebuilt = sorted(tuple(r) for r in conn.execute(sa.select(usage_rollup)))
    sums = slice(-HIST - 2, -HIST)  # cost, saved_cost: float sums, added in another order
    assert [r[:sums.start] + r[-HIST:] for r in rebuilt] == [r[:sums.start] + r[-HIST:] for r in kept]
    assert [pytest.approx(r[sums]) for r in rebuilt] == [r[sums] for r in kept]


def test_concurrent_flushes_count_each_row_once(store: Store) -> None:
    rnd = random.Random(5)
    rows = random_rows(rnd, 240, "req_c")
    for round_ in range(3):
        # two writers (two replicas) flush overlapping batches at once; rows 100-139 are in both
        parts = [rows[:140], rows[100:]]
        gate = threading.Barrier(2)
        errors: list[BaseException] = []

        def flush(part: list[dict[str, Any]]) -> None:
            try:
                ledger = Ledger(store)
                for row in part:
                    ledger.record(dict(row, request_id=f"{row['request_id']}_{round_}"))
                gate.wait(10)
                ledger.flush_sync()
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=flush, args=(part,)) for part in parts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors
    admin = Principal(key_id="admin", role="admin")
    q = ReportQuery(group_by=("key", "day"), start=NOW - timedelta(days=6), end=NOW + timedelta(seconds=1))
    rolled, raw = rollup_report(store, admin, q, now=NOW), report(store, admin, q)
    assert raw["totals"]["requests"] == 3 * len(rows)
    assert_same(rolled, raw)


def test_the_migration_counts_the_rows_already_in_the_ledger(db_url: str) -> None:
    """obs_0005 on a store whose ledger already holds rows (an upgrade of a running install) backfills them."""
    from alembic import command
    from alembic.config import Config

    from keel.core.db import KEEL_ROOT, migration_dirs

    store = Store.open(db_url)
    try:
        cfg = Config()
        cfg.set_main_option("script_location", str(KEEL_ROOT / "core" / "migrations"))
        cfg.set_main_option("version_locations", " ".join(migration_dirs()))
        cfg.set_main_option("path_separator", "space")
        with store.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "obs_0004")  # the observe branch as it was before the rollups
        rows = random_rows(random.Random(3), 120, "req_m")
        with store.engine.begin() as conn:
            conn.execute(usage_ledger.insert(), rows)  # written straight into the table: no rollups yet
        store.upgrade()
        admin = Principal(key_id="admin", role="admin")
        q = ReportQuery(group_by=("team", "day"), start=NOW - timedelta(days=6), end=NOW + timedelta(seconds=1))
        rolled = rollup_report(store, admin, q, now=NOW)
        assert rolled["totals"]["requests"] == len(rows)
        assert_same(rolled, report(store, admin, q))
    finally:
        store.dispose()
