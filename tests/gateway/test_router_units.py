"""Router building blocks without a server: the circuit breaker's state machine on a fake clock, the three
balancing strategies with a seeded random source, and which errors may be retried."""

import random
from collections import Counter

import pytest
from conftest import Clock

from keel.core.errors import ContextOverflow, Forbidden, InternalError, NotSupported, Unavailable
from keel.core.settings import DeploymentConfig
from keel.gateway.circuit import CLOSED, HALF_OPEN, OPEN, Circuit
from keel.gateway.protocol import upstream_error
from keel.gateway.router import (
    EXPLORE, NEXT, RETRY, STOP, DeploymentState, classify, least_busy, lowest_latency, weighted,
)


@pytest.fixture
def clock():
    return Clock()


def fail(c: Circuit, n: int = 1) -> None:
    for _ in range(n):
        c.record(c.acquire(), False)


# -- circuit breaker ---------------------------------------------------------------------------------------

def test_opens_after_n_consecutive_failures_and_rejects_while_open(clock):
    c = Circuit(failures=3, cooldown_s=10, clock=clock)
    fail(c, 2)
    assert c.state == CLOSED and c.available()
    fail(c)
    assert c.state == OPEN
    assert c.acquire() is None and not c.available()
    clock.now += 9.9
    assert c.acquire() is None
    assert c.retry_in() == pytest.approx(0.1)


def test_a_success_resets_the_consecutive_count(clock):
    c = Circuit(failures=3, cooldown_s=10, clock=clock)
    fail(c, 2)
    c.record(c.acquire(), True)
    fail(c, 2)
    assert c.state == CLOSED


def test_half_open_lets_exactly_one_trial_through_and_closes_on_success(clock):
    c = Circuit(failures=2, cooldown_s=5, clock=clock)
    fail(c, 2)
    clock.now += 5
    assert c.available()
    trial = c.acquire()
    assert trial is not None and c.state == HALF_OPEN
    assert c.acquire() is None, "a second request during the trial must be rejected"
    c.record(trial, True)
    assert c.state == CLOSED and c.failures == 0
    assert c.acquire() is not None


def test_failed_trial_reopens_for_a_full_cool_down(clock):
    c = Circuit(failures=2, cooldown_s=5, clock=clock)
    fail(c, 2)
    clock.now += 6
    c.record(c.acquire(), False)
    assert c.state == OPEN
    clock.now += 4.9
    assert c.acquire() is None
    clock.now += 0.1
    assert c.acquire() is not None


def test_late_results_from_before_the_opening_change_nothing(clock):
    """Regression guard: a slow request admitted while closed must not close an open circuit (or skip the trial)."""
    c = Circuit(failures=2, cooldown_s=5, clock=clock)
    early = c.acquire()
    fail(c, 2)
    c.record(early, True)
    assert c.state == OPEN
    clock.now += 5
    trial = c.acquire()
    c.record(early, True)
    assert c.state == HALF_OPEN and c.acquire() is None
    c.record(trial, False)
    assert c.state == OPEN


def test_a_trial_without_verdict_frees_the_slot(clock):
    c = Circuit(failures=1, cooldown_s=5, clock=clock)
    fail(c)
    clock.now += 5
    c.record(c.acquire(), None)  # cancelled, or the caller's own 4xx
    assert c.state == HALF_OPEN
    assert c.acquire() is not None


def test_a_lost_trial_frees_the_slot_after_another_cool_down(clock):
    c = Circuit(failures=1, cooldown_s=5, clock=clock)
    fail(c)
    clock.now += 5
    assert c.acquire() is not None  # never reports back
    clock.now += 4
    assert c.acquire() is None
    clock.now += 1
    assert c.acquire() is not None


def test_failure_reported_without_token_counts_against_current_state(clock):
    c = Circuit(failures=2, cooldown_s=5, clock=clock)
    c.record(None, False)
    c.record(None, False)
    assert c.state == OPEN
    c.record(None, False)  # while open: ignored, the cool-down is not extended
    clock.now += 5
    assert c.available()


# -- strategies ---------------------------------------------------------------------------------------------

def dep(name: str, weight: float = 1.0) -> DeploymentConfig:
    return DeploymentConfig(alias="a", provider="openai_compatible", model=name, id=f"a/{name}", weight=weight)


def opts(*names, weights=None):
    return [(dep(n, (weights or {}).get(n, 1.0)), DeploymentState(Circuit())) for n in names]


def picks(strategy, options, n=4000, stream=False, seed=7):
    rng = random.Random(seed)
    return Counter(strategy(options, stream, rng)[0].model for _ in range(n))


def test_weighted_follows_weights():
    got = picks(weighted, opts("x", "y", weights={"x": 3.0, "y": 1.0}))
    assert got["x"] / 4000 == pytest.approx(0.75, abs=0.03)


def test_least_busy_picks_fewest_in_flight_and_spreads_ties():
    o = opts("x", "y", "z")
    o[0][1].in_flight, o[1][1].in_flight, o[2][1].in_flight = 3, 1, 1
    got = picks(least_busy, o)
    assert got["x"] == 0 and got["y"] > 1500 and got["z"] > 1500


def test_lowest_latency_measures_unmeasured_first_then_prefers_the_fastest():
    o = opts("fast", "slow")
    o[0][1].latencies[False].extend([10, 12, 11])
    assert set(picks(lowest_latency, o)) == {"slow"}, "an unmeasured deployment is tried first"
    o[1][1].latencies[False].extend([50, 60, 55])
    got = picks(lowest_latency, o)
    assert got["slow"] / 4000 == pytest.approx(EXPLORE / 2, abs=0.02)  # only exploration reaches it
    assert got["fast"] > 3500


def test_lowest_latency_windows_are_per_mode_and_use_the_median():
    o = opts("x", "y")
    o[0][1].latencies[False].extend([5, 5, 5])
    o[1][1].latencies[False].extend([20, 20, 20])
    o[0][1].latencies[True].extend([90, 90, 90])
    o[1][1].latencies[True].extend([30, 30, 10_000])  # one outlier does not flip the ranking
    assert picks(lowest_latency, o, stream=False).most_common(1)[0][0] == "x"
    assert picks(lowest_latency, o, stream=True).most_common(1)[0][0] == "y"


def test_lowest_latency_exploration_lets_a_recovered_deployment_win_back():
    """Regression guard: a deployment once measured slow keeps getting tried, so its recovery is noticed."""
    o = opts("a", "b")
    a, b = o[0][1], o[1][1]
    a.latencies[False].extend([20] * 16)
    b.latencies[False].extend([5000] * 16)  # b was slow (or failing) and has recovered to 5 ms
    rng = random.Random(1)
    for _ in range(2000):
        cfg, st = lowest_latency(o, False, rng)
        st.latencies[False].append(20 if cfg.model == "a" else 5)
    assert b.latency(False) == 5
    assert Counter(lowest_latency(o, False, rng)[0].model for _ in range(1000))["b"] > 900


# -- which errors are retried -------------------------------------------------------------------------------

@pytest.mark.parametrize("err, kind", [
    (upstream_error(500, "boom", "d"), RETRY),
    (upstream_error(503, "busy", "d"), RETRY),
    (upstream_error(429, "slow down", "d"), RETRY),
    (upstream_error(None, "connection reset", "d"), RETRY),
    (upstream_error(None, "", "d", timeout=True), RETRY),
    (upstream_error(400, "bad param", "d"), STOP),
    (upstream_error(404, "no such model", "d"), STOP),
    (upstream_error(422, "invalid", "d"), STOP),
    (upstream_error(401, "bad key", "d"), NEXT),
    (upstream_error(403, "forbidden", "d"), NEXT),
    (NotSupported("no tools"), STOP),
    (ContextOverflow("too long"), STOP),
    (Forbidden("policy"), STOP),
    (InternalError("bug"), STOP),
    (Unavailable("model file missing"), NEXT),
    (ValueError("a bug"), STOP),
])
def test_classify(err, kind):
    assert classify(err) == kind
