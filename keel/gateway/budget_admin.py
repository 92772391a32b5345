"""Budgets' tables, money and periods, and the admin API's service functions (list, get, create, update,
delete); the stage that enforces them is `keel/gateway/budgets.py`."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from keel.core.clock import utcnow
from keel.core.db import Store, metadata
from keel.core.errors import Conflict, NotFound
from keel.core.ids import new_id
from keel.core.settings import Settings
from keel.identity.principal import Principal

NANO = 1_000_000_000
TS = sa.DateTime(timezone=True)

budgets = sa.Table(
    "budgets", metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("scope", sa.String(20), nullable=False),
    sa.Column("scope_id", sa.String(300), nullable=False),
    sa.Column("period", sa.String(10), nullable=False),
    sa.Column("limit_nano", sa.BigInteger, nullable=False),
    sa.Column("alert_percent", sa.Float, nullable=True),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("updated_at", TS, nullable=False),
    sa.UniqueConstraint("scope", "scope_id", "period", name="uq_budgets_scope"),
)

budget_usage = sa.Table(
    "budget_usage", metadata,
    sa.Column("id", sa.String(80), primary_key=True),
    sa.Column("budget_id", sa.String(40), sa.ForeignKey("budgets.id", ondelete="CASCADE"), nullable=False,
              index=True),
    sa.Column("period_key", sa.String(10), nullable=False),
    sa.Column("limit_nano", sa.BigInteger, nullable=False),
    sa.Column("spent_nano", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("reserved_nano", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("granted_nano", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("alerted_at", TS, nullable=True),
)

budget_holds = sa.Table(
    "budget_holds", metadata,
    sa.Column("id", sa.String(160), primary_key=True),
    sa.Column("replica", sa.String(40), nullable=False, index=True),
    sa.Column("usage_id", sa.String(80), nullable=False),
    sa.Column("amount_nano", sa.BigInteger, nullable=False),
    sa.Column("expires_at", sa.BigInteger, nullable=False, index=True),
)

budget_events = sa.Table(
    "budget_events", metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("budget_id", sa.String(40), nullable=False, index=True),
    sa.Column("period_key", sa.String(10), nullable=False),
    sa.Column("kind", sa.String(30), nullable=False),
    sa.Column("ts", TS, nullable=False),
    sa.Column("spent_nano", sa.BigInteger, nullable=False),
    sa.Column("limit_nano", sa.BigInteger, nullable=False),
    sa.Column("detail", sa.JSON, nullable=True),
    sa.Column("delivery", sa.String(300), nullable=True),
)


def usd(nano: int) -> float:
    return round(nano / NANO, 9)


def to_nano(amount_usd: float) -> int:
    return round(amount_usd * NANO)


def period_bounds(period: str, now: datetime) -> tuple[str, datetime | None, datetime | None]:
    """(row key, start, end) of the period containing `now`, in UTC; `total` never ends."""
    if period == "day":
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        return start.strftime("%Y-%m-%d"), start, start + timedelta(days=1)
    if period == "month":
        start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
        return start.strftime("%Y-%m"), start, end
    return "total", None, None


class BudgetAdmin:
    """The admin API's service functions over the budget tables; `Budgets` (the stage) adds them to
    itself, and re-reads its definitions (`reload`) after each change."""

    store: Store
    settings: Settings
    reload: Callable[[], None]

    def _public(self, conn: sa.Connection, r: Any) -> dict[str, Any]:
        key, start, end = period_bounds(r.period, utcnow())
        usage = conn.execute(sa.select(budget_usage).where(budget_usage.c.id == f"{r.id}@{key}")).first()
        spent = int(usage.spent_nano) if usage else 0
        reserved = int(usage.reserved_nano) if usage else 0
        pct = r.alert_percent if r.alert_percent is not None else self.settings.budget_alert_percent
        return {"id": r.id, "scope": r.scope, "scope_id": r.scope_id, "period": r.period, "amount": usd(r.limit_nano),
                "alert_percent": pct, "period_key": key, "period_start": start.isoformat() if start else None,
                "resets_at": end.isoformat() if end else None, "spent": usd(spent), "reserved": usd(reserved),
                "remaining": usd(max(0, int(r.limit_nano) - spent - reserved)),
                "alerted": bool(usage is not None and usage.alerted_at is not None),
                "created_at": r.created_at.isoformat() if r.created_at else None,
                "updated_at": r.updated_at.isoformat() if r.updated_at else None}

    def listing(self, scope: str | None = None, scope_id: str | None = None) -> list[dict[str, Any]]:
        q = sa.select(budgets).order_by(budgets.c.scope, budgets.c.scope_id, budgets.c.period)
        if scope:
            q = q.where(budgets.c.scope == scope)
        if scope_id:
            q = q.where(budgets.c.scope_id == scope_id)
        with self.store.engine.connect() as conn:
            return [self._public(conn, r) for r in conn.execute(q).all()]

    def binding(self, p: Principal) -> list[dict[str, Any]]:
        """What `GET /v1/budgets` shows `p`: the budgets that bind it, or every one to an admin."""
        return self.listing() if p.is_admin else self.applying(p.key_id, p.team_id, p.user_id)

    def applying(self, key_id: str, team_id: str | None, user_id: str | None) -> list[dict[str, Any]]:
        """The budgets that bound one caller's spending: its key's, its team's and its user's."""
        c = budgets.c
        pairs = [("key", key_id), *((("team", team_id),) if team_id else ()), *((("user", user_id),) if user_id else ())]
        q = (sa.select(budgets).where(sa.or_(*(sa.and_(c.scope == s, c.scope_id == i) for s, i in pairs)))
             .order_by(c.scope, c.scope_id, c.period))
        with self.store.engine.connect() as conn:
            return [self._public(conn, r) for r in conn.execute(q).all()]

    def get(self, budget_id: str, events: int = 20) -> dict[str, Any]:
        with self.store.engine.connect() as conn:
            r = conn.execute(sa.select(budgets).where(budgets.c.id == budget_id)).first()
            if r is None:
                raise _unknown(budget_id)
            out = self._public(conn, r)
            e = budget_events.c
            rows = conn.execute(sa.select(budget_events).where(e.budget_id == budget_id)
                                .order_by(e.ts.desc()).limit(events)).all()
        out["events"] = [{"id": x.id, "kind": x.kind, "ts": x.ts.isoformat(), "period_key": x.period_key,
                          "spent": usd(x.spent_nano), "limit": usd(x.limit_nano), "detail": x.detail,
                          "delivery": x.delivery} for x in rows]
        return out

    def create(self, scope: str, scope_id: str, period: str, amount: float,
               alert_percent: float | None = None) -> dict[str, Any]:
        now = utcnow()
        row = {"id": new_id("budget"), "scope": scope, "scope_id": scope_id, "period": period,
               "limit_nano": to_nano(amount), "alert_percent": alert_percent, "created_at": now, "updated_at": now}
        b = budgets.c
        with self.store.engine.begin() as conn:
            clash = conn.execute(sa.select(b.id).where(b.scope == scope, b.scope_id == scope_id, b.period == period)
                                 ).first()
            if clash is not None:
                raise Conflict(f"{scope} {scope_id} already has a {period} budget ({clash.id})",
                               fix=f"change it with PATCH /admin/budgets/{clash.id}", budget_id=clash.id)
            conn.execute(budgets.insert().values(**row))
        self.reload()
        return self.get(row["id"], events=0)

    def update(self, budget_id: str, amount: float | None = None,
               alert_percent: float | None = None) -> dict[str, Any]:
        """Change the limit (every period's row at once, so replicas enforce it from their next claim)
        or the alert threshold; a period whose spend is now under its threshold may alert again."""
        b, u = budgets.c, budget_usage.c
        with self.store.engine.begin() as conn:
            r = conn.execute(sa.select(budgets).where(b.id == budget_id)).first()
            if r is None:
                raise _unknown(budget_id)
            limit = to_nano(amount) if amount is not None else int(r.limit_nano)
            pct = alert_percent if alert_percent is not None else r.alert_percent
            conn.execute(budgets.update().where(b.id == budget_id).values(
                limit_nano=limit, alert_percent=pct, updated_at=utcnow()))
            conn.execute(budget_usage.update().where(u.budget_id == budget_id).values(limit_nano=limit))
            threshold = pct if pct is not None else self.settings.budget_alert_percent
            conn.execute(budget_usage.update().where(u.budget_id == budget_id, u.spent_nano * 100 < threshold * limit)
                         .values(alerted_at=None))
        self.reload()
        return self.get(budget_id, events=0)

    def delete(self, budget_id: str) -> None:
        """Delete the budget, its usage rows and the replicas' holds on them (replicas then stop writing)."""
        u = budget_usage.c
        with self.store.engine.begin() as conn:
            # Lock in the order every other writer uses — budget, usage rows, holds — so none deadlocks.
            if conn.execute(sa.select(budgets.c.id).where(budgets.c.id == budget_id).with_for_update()).first() is None:
                raise _unknown(budget_id)
            conn.execute(sa.select(u.id).where(u.budget_id == budget_id).order_by(u.id).with_for_update())
            conn.execute(budget_holds.delete().where(budget_holds.c.usage_id.like(f"{budget_id}@%")))
            conn.execute(budgets.delete().where(budgets.c.id == budget_id))
        self.reload()


def _unknown(budget_id: str) -> NotFound:
    return NotFound(f"budget {budget_id!r} does not exist", fix="list budgets at GET /admin/budgets",
                    budget_id=budget_id)
