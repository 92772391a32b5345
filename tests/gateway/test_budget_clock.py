"""Budgets on an injected clock: periods roll over and dead replicas' holds expire without waiting or
patching `time`."""

from __future__ import annotations

import asyncio

import pytest

from conftest import MASTER_KEY, Clock


def stage_on(store, settings, deployments, clock: Clock):
    from keel.core.outbound import Outbound
    from keel.gateway.budgets import Budgets

    return Budgets(store, settings, deployments, Outbound(), clock=clock)


def build(tmp_path, db_url):
    from keel.app import create_app
    from keel.core.settings import Settings

    settings = Settings(data_dir=tmp_path / "data", database_url=db_url, embedded_models=False, master_key=MASTER_KEY)
    app = create_app(settings).app
    return app.state.store, settings, app.state.gateway.deployments


def test_a_spent_day_budget_opens_again_the_next_day(tmp_path, db_url):
    """Guards the period roll-over: a day budget with nothing left refuses today and has its whole limit
    again once the clock passes midnight (UTC)."""
    from keel.identity import service as identity

    store, settings, deployments = build(tmp_path, db_url)
    clock = Clock(1_780_000_000.0 - 1_780_000_000.0 % 86_400 + 86_400 - 60)  # one minute before a midnight
    stage = stage_on(store, settings, deployments, clock)
    _, key = identity.create_key(store, role="member")
    budget = stage.create("key", key["id"], "day", 0.001)  # 1,000,000 nano-dollars
    pool = stage._pool(stage._defs[budget["id"]])
    assert asyncio.run(stage._take(pool, 1_000_000))
    assert not asyncio.run(stage._take(pool, 1))  # nothing left today

    clock.now += 120  # the next day
    tomorrow = stage._pool(stage._defs[budget["id"]])
    assert tomorrow is not pool and tomorrow.period_key != pool.period_key
    assert asyncio.run(stage._take(tomorrow, 1_000_000))
    store.dispose()


def test_a_dead_replicas_hold_expires_on_the_clock(tmp_path, db_url):
    """Guards hold expiry against the injected clock: another replica sweeps a hold only once the clock
    passed its expiry, and counts it as spent."""
    from keel.gateway.budgets import HOLD_TTL_S
    from keel.identity import service as identity

    store, settings, deployments = build(tmp_path, db_url)
    clock = Clock(1_780_000_000.0)
    stage = stage_on(store, settings, deployments, clock)
    _, key = identity.create_key(store, role="member")
    budget = stage.create("key", key["id"], "total", 0.001)
    pool = stage._pool(stage._defs[budget["id"]])
    assert asyncio.run(stage._take(pool, 35_000))

    other = stage_on(store, settings, deployments, clock)
    assert other.sweep() == 0  # the hold is alive
    clock.now += HOLD_TTL_S + 1  # its replica stopped renewing it
    assert other.sweep() == 1
    state = stage.get(budget["id"])
    assert state["reserved"] == 0 and state["spent"] == pytest.approx(35e-6)
    store.dispose()
