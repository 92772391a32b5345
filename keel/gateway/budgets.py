"""Budgets: spend limits per API key, team or user, per day, month or in total, that concurrent requests
and replicas cannot overshoot.

Before a call the stage reserves its worst-case cost: the prompt as the provider counts it plus
`max_tokens` (or what is left of the context window), at the highest prices among the alias's
deployments and its fallbacks. After the call — answered, failed or cut short — it settles to the real
cost (`Call.cost()`, zero for a cache hit).

The store keeps one `budget_usage` row per budget and period (periods roll over because rows are keyed
on the period), holding the limit, `spent` and `reserved`. A replica reserves capacity from that row in
slices with one conditional UPDATE that grants at most what is left (`spent + reserved + grant <=
limit`), and serves requests' reservations from its slice in memory; settled spend goes back to the
store every half second, a slice's free capacity once its budget saw no request for `budget_idle_s`
(5 s), and everything at shutdown (a budget in use keeps its slice, so its requests need no store round
trip, a client that pauses for a few seconds included; another replica waits at most that long for the
capacity an idle one holds, at most one slice each). Every request's worst case was granted by the
store before the call, and the store never grants past the limit, so spend cannot pass it — as long as
a call costs no more than its worst case, i.e. the provider's `count_tokens` does not undercount the
prompt (a call that costs more is logged as a warning and its real cost is recorded).

A replica's slice is also written as a hold (`budget_holds`) that it renews. A replica that dies leaves
its hold to expire; any replica then counts the held amount as spent — it cannot know how much really
was — so a crash errs towards refusing, never towards overspending.

Money is kept in integer nano-dollars so that sums are exact.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Callable

import sqlalchemy as sa

from keel.core.clock import utcnow
from keel.core.db import Store
from keel.core.errors import BudgetExceeded
from keel.core.http1 import WireError
from keel.core.ids import new_id
from keel.core.outbound import Outbound
from keel.core.settings import Settings
from keel.core.webhook import post_json_once
from keel.gateway.admission import Fresh, Lookups, Ticker, prompt_tokens, settled
from keel.gateway.budget_admin import (
    NANO, BudgetAdmin, budget_events, budget_holds, budget_usage, budgets, period_bounds, usd,
)
from keel.gateway.deployments import Deployments
from keel.gateway.pipeline import Call, Next, deployment_kind
from keel.gateway.protocol import Usage
from keel.observe.prices import DEFAULT as DEFAULT_PRICES

log = logging.getLogger("keel.gateway.budgets")

FLUSH_S = 0.5  # settled spend goes to the store this often
RELOAD_S = 2.0
HOLD_TTL_S = 60  # a hold not renewed for this long belongs to a dead replica
HEARTBEAT_S = 10.0
SWEEP_S = 15.0
SLICE = 0.01  # a replica's slice: at most this share of the limit …
SLICE_CALLS = 1000  # … and at most this many worst-case calls, but at least one
_ENSURE = sa.text("""
INSERT INTO budget_usage (id, budget_id, period_key, limit_nano, spent_nano, reserved_nano, granted_nano)
SELECT :usage_id, id, :period_key, limit_nano, 0, 0, 0 FROM budgets WHERE id = :budget_id
ON CONFLICT (id) DO NOTHING
""")

_LEFT = "limit_nano - spent_nano - reserved_nano"
_GRANT = f"CASE WHEN CAST(:want AS BIGINT) <= {_LEFT} THEN CAST(:want AS BIGINT) ELSE {_LEFT} END"
_CLAIM = sa.text(f"""
UPDATE budget_usage SET granted_nano = {_GRANT}, reserved_nano = reserved_nano + {_GRANT}
WHERE id = :usage_id AND {_LEFT} > 0
RETURNING granted_nano, spent_nano, reserved_nano, limit_nano
""")

_HOLD = sa.text("""
INSERT INTO budget_holds (id, replica, usage_id, amount_nano, expires_at)
VALUES (:id, :replica, :usage_id, :amount, :expires_at)
ON CONFLICT (id) DO UPDATE SET amount_nano = budget_holds.amount_nano + excluded.amount_nano,
                               expires_at = excluded.expires_at
""")


@dataclass(frozen=True)
class BudgetDef:
    id: str
    scope: str
    scope_id: str
    period: str
    limit_nano: int
    alert_percent: float | None


class Pool:
    """This replica's share of one budget period. `avail + inflight + unflushed` is exactly what the
    store holds reserved for this replica (its hold): free capacity, requests' worst cases in flight,
    and settled spend not yet written."""

    __slots__ = ("usage_id", "budget", "period_key", "resets_at", "avail", "inflight", "unflushed", "lock",
                 "dead", "ensured", "state", "used", "idle")

    def __init__(self, budget: BudgetDef, period_key: str, resets_at: datetime | None) -> None:
        self.usage_id = f"{budget.id}@{period_key}"
        self.budget = budget
        self.period_key = period_key
        self.resets_at = resets_at
        self.avail = self.inflight = self.unflushed = 0
        self.lock: asyncio.Lock | None = None
        self.dead = False  # the budget is gone, or another replica expired this one's hold: stop writing
        self.ensured = False
        self.state: tuple[int, int, int] | None = None  # (spent, reserved, limit) as the store last said
        self.used = False  # a request reserved from it since the last flush
        self.idle = 0  # flushes in a row with no request

class Budgets(BudgetAdmin):
    """The budget stage (reserve before, settle after); the admin API's service functions come from
    `BudgetAdmin` (`keel/gateway/budget_admin.py`).

    >>> stage = Budgets(store, settings, deployments, Outbound.from_settings(settings))
    >>> stage.create("team", team_id, "month", 250.0)
    """

    changes_answer = False  # it settles spend after `nxt`, and never touches the answer

    def __init__(self, store: Store, settings: Settings, deployments: Deployments, outbound: Outbound, *,
                 clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.clock = clock  # wall-clock seconds: budget periods and hold expiry (tests move it by hand)
        self.monotonic = monotonic  # flush, heartbeat and reload intervals
        self.settings = settings
        # The alert URL is the admin's, like a provider's base_url: it goes out as providers do (CA bundle,
        # client certificate and the environment's proxy, with NO_PROXY for receivers inside the network).
        self.outbound = outbound
        self._tls = outbound.ssl_context("budget alert webhook")  # a bad CA bundle or certificate fails at start
        self.replica = new_id("replica")
        self.lookups = Lookups(deployments, settings)
        self._index: dict[tuple[str, str], tuple[BudgetDef, ...]] = {}
        self._defs: dict[str, BudgetDef] = {}
        self._fresh = Fresh(self.reload, monotonic)
        self._pools: dict[str, Pool] = {}
        self._periods: dict[str, tuple[float, str, datetime | None]] = {}
        self._beat = self._swept = monotonic()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ticker = Ticker("keel-budgets", FLUSH_S, self._tick)
        self.reload()

    async def start(self) -> None:
        """Flush settled spend every FLUSH_S, renew holds and sweep dead replicas' until `stop`."""
        self._ticker.start()

    async def stop(self) -> None:
        """Write everything still in memory (spend, free slices), send the alerts it crosses and wait for
        every alert's delivery to be written: the app runs this before it closes the store."""
        await self._ticker.stop()
        items = self._snapshot(everything=True)
        if items:
            alerts, _dead = await asyncio.get_running_loop().run_in_executor(None, self._flush, items)
            for event in alerts:
                self._notify(event)
        if self._tasks:
            await asyncio.wait(list(self._tasks))

    # -- the governed path -----------------------------------------------------------------------------
    async def handle(self, call: Call, nxt: Next) -> Any:
        if self._fresh.stale():
            await self._fresh.refresh()
        if not self._index:
            return await nxt(call)
        p, idx = call.principal, self._index
        defs = idx.get(("key", p.key_id), ())
        if p.team_id:
            defs += idx.get(("team", p.team_id), ())
        if p.user_id:
            defs += idx.get(("user", p.user_id), ())
        if not defs:
            return await nxt(call)
        worst = self.worst_case(call)
        if worst <= 0:
            return await nxt(call)
        taken: list[Pool] = []
        pools = [self._pool(d) for d in defs]
        for pool in pools if len(pools) == 1 else sorted(pools, key=lambda x: x.usage_id):
            if pool.avail >= worst:  # the common case, without a coroutine
                pool.avail -= worst
                pool.inflight += worst
            elif not await self._take(pool, worst):
                for t in taken:
                    t.inflight -= worst
                    t.avail += worst
                raise self._exceeded(pool, worst)
            pool.used = True
            taken.append(pool)

        def settle(usage: Usage | None) -> None:
            cost = 0 if usage is None or call.cache_hit else round(call.cost(usage) * NANO)
            for t in taken:
                t.inflight -= worst
                t.unflushed += cost
                t.avail += worst - cost
            if cost > worst:
                log.warning("call cost more than its reserved worst case",
                            extra={"request_id": call.request_id, "cost": usd(cost), "reserved": usd(worst)})

        try:
            out = await nxt(call)
        except BaseException:
            settle(None)
            raise
        return settled(call, out, settle)

    def worst_case(self, call: Call) -> int:
        """The most the call can cost, in nano-dollars, over every deployment that may serve it."""
        worst = 0
        kind = deployment_kind(call)
        for cfg in self.lookups.deployments(call.alias, kind, fallbacks=True):
            pin, pout = cfg.input_price_per_1m, cfg.output_price_per_1m
            if not pin and not pout and not DEFAULT_PRICES.priced(cfg):  # no price set, none in the table
                continue
            prompt = prompt_tokens(call, self.lookups.provider(cfg))
            out = 0
            if kind == "chat":  # embeddings and reranks produce no tokens
                max_tokens = call.chat.max_tokens if call.chat else None
                out = max_tokens if max_tokens else max(cfg.context_window - prompt, 0)
            if pin or pout:
                worst = max(worst, math.ceil((prompt * pin + out * pout) * 1000))  # $/1M tokens → n$/token
            else:
                worst = max(worst, math.ceil(DEFAULT_PRICES.cost(cfg, prompt, out) * NANO))
        return worst

    def _pool(self, d: BudgetDef) -> Pool:
        now = self.clock()
        cached = self._periods.get(d.period)
        if cached is None or now >= cached[0]:
            key, _start, end = period_bounds(d.period, datetime.fromtimestamp(now, UTC))
            cached = self._periods[d.period] = (end.timestamp() if end else math.inf, key, end)
        usage_id = f"{d.id}@{cached[1]}"
        pool = self._pools.get(usage_id)
        if pool is None or pool.dead:
            pool = self._pools[usage_id] = Pool(d, cached[1], cached[2])
        elif pool.budget is not d:
            pool.budget = d  # the limit or threshold changed; the store enforces the new limit itself
        return pool

    async def _take(self, pool: Pool, worst: int) -> bool:
        if pool.avail >= worst:
            pool.avail -= worst
            pool.inflight += worst
            return True
        if pool.lock is None:
            pool.lock = asyncio.Lock()
        async with pool.lock:  # one claim at a time per budget in this replica
            if pool.avail < worst and not pool.dead:
                limit = pool.budget.limit_nano
                want = max(worst - pool.avail, min(int(limit * SLICE), worst * SLICE_CALLS))
                got, state = await asyncio.get_running_loop().run_in_executor(None, self._claim, pool, want)
                if state is None:  # deleted meanwhile: nothing left to enforce
                    pool.dead = True
                else:
                    pool.ensured = True
                    pool.avail += got
                    pool.state = state
            if pool.dead:
                return True
            if pool.avail >= worst:
                pool.avail -= worst
                pool.inflight += worst
                return True
            return False

    def _claim(self, pool: Pool, want: int) -> tuple[int, tuple[int, int, int] | None]:
        """Reserve up to `want` from the store for this replica: (granted, (spent, reserved, limit)), or
        (0, None) when the budget no longer exists."""
        with self.store.engine.begin() as conn:
            if not pool.ensured:
                conn.execute(_ENSURE, {"usage_id": pool.usage_id, "period_key": pool.period_key,
                                       "budget_id": pool.budget.id})
            row = conn.execute(_CLAIM, {"usage_id": pool.usage_id, "want": want}).first()
            if row is None:
                now = conn.execute(sa.select(budget_usage.c.spent_nano, budget_usage.c.reserved_nano,
                                             budget_usage.c.limit_nano).where(budget_usage.c.id == pool.usage_id)
                                   ).first()
                return 0, (tuple(now) if now is not None else None)  # type: ignore[return-value]
            conn.execute(_HOLD, {"id": self._hold_id(pool), "replica": self.replica, "usage_id": pool.usage_id,
                                 "amount": row.granted_nano, "expires_at": int(self.clock()) + HOLD_TTL_S})
            return int(row.granted_nano), (int(row.spent_nano), int(row.reserved_nano), int(row.limit_nano))

    def _hold_id(self, pool: Pool) -> str:
        return f"{self.replica}|{pool.usage_id}"

    def _exceeded(self, pool: Pool, worst: int) -> BudgetExceeded:
        b = pool.budget
        spent, reserved, limit = pool.state or (0, 0, b.limit_nano)
        left = max(0, limit - spent - reserved + pool.avail)
        resets = pool.resets_at.isoformat() if pool.resets_at else None
        when = f"the {b.period} period resets at {resets}" if resets else "it is a total budget and never resets"
        return BudgetExceeded(
            f"budget {b.id} of {b.scope} {b.scope_id} ({b.period}) has ${usd(left):.6f} left of ${usd(limit):.6f}; "
            f"this request may cost up to ${usd(worst):.6f}",
            fix=f"lower max_tokens, wait ({when}), or ask an admin to raise it: PATCH /admin/budgets/{b.id}",
            budget={"id": b.id, "scope": b.scope, "scope_id": b.scope_id, "period": b.period,
                    "limit": usd(limit), "spent": usd(spent), "reserved": usd(reserved), "remaining": usd(left),
                    "resets_at": resets},
            required=usd(worst))

    # -- background upkeep ------------------------------------------------------------------------------
    def _snapshot(self, everything: bool = False) -> list[tuple[Pool, int, int]]:
        """Take the settled spend of every pool, and the free capacity of pools no request used for
        `budget_idle_s` (of all pools when `everything`), to hand back to the store."""
        items = []
        idle_flushes = max(1.0, self.settings.budget_idle_s / FLUSH_S)
        for pool in self._pools.values():
            pool.idle = 0 if pool.used else pool.idle + 1
            pool.used = False
            free = pool.avail if everything or pool.idle >= idle_flushes else 0
            if not pool.dead and (pool.unflushed or free):
                items.append((pool, pool.unflushed, free))
                pool.unflushed = 0
                pool.avail -= free
        return items

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        items = self._snapshot()
        if items:
            try:
                alerts, dead = await loop.run_in_executor(None, self._flush, items)
            except Exception:
                for pool, spent, free in items:  # the transaction rolled back: keep them for the next tick
                    pool.unflushed += spent
                    pool.avail += free
                raise
            for pool in dead:
                pool.dead = True
            for event in alerts:
                self._notify(event)
        mono = self.monotonic()
        for key in [k for k, p in self._pools.items()
                    if p.dead or (p.inflight == 0 and p.avail == 0 and p.unflushed == 0 and p.budget.period != "total"
                                  and p.resets_at is not None and p.resets_at.timestamp() < self.clock())]:
            del self._pools[key]
        if mono - self._fresh.at >= RELOAD_S:
            await loop.run_in_executor(None, self.reload)
        if mono - self._beat >= HEARTBEAT_S:
            self._beat = mono
            if any(p.inflight or p.avail for p in self._pools.values()):
                await loop.run_in_executor(None, self._heartbeat)
        if mono - self._swept >= SWEEP_S:
            self._swept = mono
            await loop.run_in_executor(None, self.sweep)

    def _flush(self, items: list[tuple[Pool, int, int]]) -> tuple[list[dict[str, Any]], list[Pool]]:
        """Write settled spend, hand back free capacity, renew holds; claim soft-limit alerts."""
        alerts: list[dict[str, Any]] = []
        dead: list[Pool] = []
        expires = int(self.clock()) + HOLD_TTL_S
        u, h = budget_usage.c, budget_holds.c
        with self.store.engine.begin() as conn:
            for pool, spent, free in sorted(items, key=lambda i: i[0].usage_id):
                back = spent + free
                conn.execute(sa.select(u.id).where(u.id == pool.usage_id).with_for_update())  # row order: usage, hold
                hold = self._hold_id(pool)
                if not conn.execute(budget_holds.update().where(h.id == hold).values(
                        amount_nano=h.amount_nano - back, expires_at=expires)).rowcount:
                    dead.append(pool)  # swept as a dead replica's: its amount was already counted as spent
                    continue
                conn.execute(budget_holds.delete().where(h.id == hold, h.amount_nano == 0))
                row = conn.execute(budget_usage.update().where(u.id == pool.usage_id).values(
                    spent_nano=u.spent_nano + spent, reserved_nano=u.reserved_nano - back,
                ).returning(u.spent_nano, u.limit_nano, u.alerted_at)).first()
                if row is None:
                    dead.append(pool)
                    continue
                if spent > 0 and row.alerted_at is None:
                    event = self._claim_alert(conn, pool, int(row.spent_nano), int(row.limit_nano))
                    if event is not None:
                        alerts.append(event)
        return alerts, dead

    def _claim_alert(self, conn: sa.Connection, pool: Pool, spent: int, limit: int) -> dict[str, Any] | None:
        """Record the soft-limit event once per budget and period, whichever replica crosses it first."""
        b = pool.budget
        pct = b.alert_percent if b.alert_percent is not None else self.settings.budget_alert_percent
        if spent * 100 < pct * limit:
            return None
        u = budget_usage.c
        if not conn.execute(budget_usage.update().where(u.id == pool.usage_id, u.alerted_at.is_(None))
                            .values(alerted_at=utcnow())).rowcount:
            return None
        event = {"id": new_id("bevt"), "budget_id": b.id, "period_key": pool.period_key, "kind": "soft_limit",
                 "ts": utcnow(), "spent_nano": spent, "limit_nano": limit,
                 "detail": {"scope": b.scope, "scope_id": b.scope_id, "period": b.period, "alert_percent": pct}}
        conn.execute(budget_events.insert().values(**event))
        return event

    def _heartbeat(self) -> None:
        with self.store.engine.begin() as conn:
            conn.execute(budget_holds.update().where(budget_holds.c.replica == self.replica)
                         .values(expires_at=int(self.clock()) + HOLD_TTL_S))

    def sweep(self) -> int:
        """Count expired holds (replicas that died) as spent; returns how many were swept."""
        now = int(self.clock())
        u, h = budget_usage.c, budget_holds.c
        swept = 0
        with self.store.engine.begin() as conn:
            expired = conn.execute(sa.select(h.id, h.usage_id).where(h.expires_at < now)).all()
            for hold_id, usage_id in sorted(expired, key=lambda r: r.usage_id):
                conn.execute(sa.select(u.id).where(u.id == usage_id).with_for_update())
                gone = conn.execute(budget_holds.delete().where(h.id == hold_id, h.expires_at < now)
                                    .returning(h.amount_nano, h.replica)).first()
                if gone is None or not gone.amount_nano:
                    continue
                row = conn.execute(budget_usage.update().where(u.id == usage_id).values(
                    spent_nano=u.spent_nano + gone.amount_nano, reserved_nano=u.reserved_nano - gone.amount_nano,
                ).returning(u.budget_id, u.period_key, u.spent_nano, u.limit_nano)).first()
                swept += 1
                if row is not None:
                    conn.execute(budget_events.insert().values(
                        id=new_id("bevt"), budget_id=row.budget_id, period_key=row.period_key, kind="hold_expired",
                        ts=utcnow(), spent_nano=row.spent_nano, limit_nano=row.limit_nano,
                        detail={"replica": gone.replica, "counted_as_spent": usd(gone.amount_nano)}))
        return swept

    # -- alerts -------------------------------------------------------------------------------------------
    def _notify(self, event: dict[str, Any]) -> None:
        log.warning("budget soft limit reached", extra={"budget_id": event["budget_id"],
                                                        "spent": usd(event["spent_nano"])})
        url = self.settings.alert_webhook_url
        if not url:
            return
        task = asyncio.get_running_loop().create_task(self._post(url, event), name="keel-budget-alert")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("budget alert task failed", exc_info=task.exception())

    async def _post(self, url: str, event: dict[str, Any]) -> None:
        """POST the alert; the outcome (HTTP status or error) is written on the event row."""
        body = {"type": "budget.soft_limit", "event_id": event["id"], "budget_id": event["budget_id"],
                **event["detail"], "period_key": event["period_key"], "spent": usd(event["spent_nano"]),
                "limit": usd(event["limit_nano"]), "ts": event["ts"].isoformat()}
        try:
            outcome = f"http {await post_json_once(self.outbound, self._tls, url, body, timeout_s=10)}"
        except (WireError, TimeoutError, OSError, ValueError) as exc:  # ValueError: a malformed URL
            outcome = f"failed: {type(exc).__name__}"
            log.warning("budget alert webhook failed", extra={"event_id": event["id"], "error": type(exc).__name__})
        await asyncio.get_running_loop().run_in_executor(None, self._delivered, event["id"], outcome)

    def _delivered(self, event_id: str, outcome: str) -> None:
        with self.store.engine.begin() as conn:
            conn.execute(budget_events.update().where(budget_events.c.id == event_id).values(delivery=outcome[:300]))

    # -- definitions --------------------------------------------------------------------------------------
    def reload(self) -> None:
        with self.store.engine.connect() as conn:
            rows = conn.execute(sa.select(budgets)).all()
        defs = {r.id: BudgetDef(r.id, r.scope, r.scope_id, r.period, int(r.limit_nano), r.alert_percent)
                for r in rows}
        index: dict[tuple[str, str], tuple[BudgetDef, ...]] = {}
        for d in defs.values():
            index[(d.scope, d.scope_id)] = index.get((d.scope, d.scope_id), ()) + (d,)
        self._defs, self._index = defs, index
        self._fresh.at = self.monotonic()
