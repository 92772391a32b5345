"""The wait decision of `keel/workflows/waits.py`, time given: which answers are waits (an open circuit,
429/503 with Retry-After, a rate-limit window, a budget that resets, a provider that is down), which fail
at once (policy, guards, bad requests, credentials), how long each wait is, and where the bound ends it."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import yaml

from keel.core.errors import (
    BadRequest, BudgetExceeded, Forbidden, RateLimited, Unavailable, UpstreamError, UpstreamRateLimited,
    UpstreamRefused, UpstreamRejected, UpstreamTimeout,
)
from keel.governance.guards.runner import GuardBlocked
from keel.governance.policy.engine import PolicyDenied
from keel.workflows.effects import EffectUnavailable
from keel.workflows.errors import SpecError
from keel.workflows.spec import parse_spec
from keel.workflows.waits import (
    BACKOFF_CAP_S, DEFAULT_MAX_WAIT_S, MIN_WAIT_S, ProviderUnavailable, Unavailability, decide, hold, public,
    unavailable,
)

NOW = 1_800_000_000.0  # the injected clock: every decision is made at this time


def circuit_open(retry_s: int = 21) -> Unavailable:
    """What the router raises while an alias's circuit is open."""
    return Unavailable(f"model 'local-chat' is unavailable: the circuit is open (next trial in {retry_s} s)",
                       fix="retry later", headers={"Retry-After": str(retry_s)}, model="local-chat")


def model(exc: BaseException) -> Unavailability | None:
    return unavailable(exc, target="local-chat", kind="model", now=NOW)


def test_an_open_circuit_waits_until_its_trial():
    """Guards the reported failure: a 21 s open circuit was a failed run; it is a 21 s wait."""
    u = model(circuit_open(21))
    assert u == Unavailability("circuit_open", "local-chat", "model", 21.0)
    assert decide(u, now=NOW, since=NOW, bound_s=DEFAULT_MAX_WAIT_S, waits=0) == 21.0


def test_limits_budgets_and_upstream_429s_wait_for_the_time_they_name():
    limited = RateLimited("rate limit reached", headers={"Retry-After": "17"})
    assert model(limited) == Unavailability("rate_limited", "local-chat", "model", 17.0)
    assert model(UpstreamRateLimited("429", retry_after=7.0)).retry_after == 7.0
    resets = datetime.fromtimestamp(NOW + 90, UTC).isoformat()
    budget = BudgetExceeded("budget b1 is spent", budget={"id": "b1", "resets_at": resets})
    assert model(budget) == Unavailability("budget_exhausted", "local-chat", "model", 90.0)


def test_a_provider_down_without_a_time_backs_off_doubling_to_a_cap():
    u = model(UpstreamError("deployment failed with HTTP 503"))
    assert u is not None and u.reason == "upstream_unavailable" and u.retry_after is None
    delays = [decide(u, now=NOW, since=NOW, bound_s=DEFAULT_MAX_WAIT_S, waits=n) for n in range(8)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, BACKOFF_CAP_S, BACKOFF_CAP_S, BACKOFF_CAP_S]
    assert model(UpstreamTimeout("no answer")).reason == "upstream_unavailable"


@pytest.mark.parametrize("exc", [
    PolicyDenied("policy rule 'x' forbids confidential data from reaching model 'cloud'"),
    GuardBlocked("the input guard 'secrets' blocked the request"),
    Forbidden("the key may not use model 'cloud'"),
    BadRequest("max_tokens must be positive"),
    UpstreamRejected("deployment failed with HTTP 400", status=400),
    UpstreamRefused("deployment failed with HTTP 401: bad key"),
    BudgetExceeded("total budget spent", budget={"id": "b1", "resets_at": None}),  # never refills
    Unavailable("no deployment of model 'x' could take the request"),  # configuration, not an outage
    ValueError("a bug"),
], ids=lambda e: type(e).__name__)
def test_what_waiting_cannot_fix_is_not_a_wait(exc):
    """Guards "fail at once": none of these may hold a run for max_wait."""
    assert model(exc) is None
    with pytest.raises(type(exc)):
        hold(exc, target="local-chat", kind="model", now=NOW, since=None, bound_s=60, waits=0, topic="t")


def test_hosts_wait_only_on_429_or_503_with_retry_after():
    def host(status: int, after: float | None) -> Unavailability | None:
        exc = EffectUnavailable(f"POST answered {status}", retry_after=after, upstream_status=status)
        return unavailable(exc, target="crm.example.com", kind="host", now=NOW)

    assert host(503, 5) == Unavailability("host_unavailable", "crm.example.com", "host", 5.0)
    assert host(429, 1) == Unavailability("host_rate_limited", "crm.example.com", "host", 1.0)
    assert host(503, None) is None  # no time named: the step's own retries apply
    assert host(500, 5) is None
    assert host(400, 5) is None


def test_the_bound_gives_up_on_a_named_time_past_it_and_cuts_a_backoff_to_it():
    named = Unavailability("circuit_open", "m", "model", 30.0)
    assert decide(named, now=NOW + 50, since=NOW, bound_s=100, waits=3) == 30.0
    assert decide(named, now=NOW + 70, since=NOW, bound_s=100, waits=3) == 30.0  # the next try at the bound
    assert decide(named, now=NOW + 71, since=NOW, bound_s=100, waits=3) is None  # waiting cannot help in time
    backoff = Unavailability("upstream_unavailable", "m", "model", None)
    assert decide(backoff, now=NOW + 95, since=NOW, bound_s=100, waits=6) == 5.0  # cut to the deadline
    assert decide(backoff, now=NOW + 100 - MIN_WAIT_S / 2, since=NOW, bound_s=100, waits=6) is None
    zero = Unavailability("circuit_open", "m", "model", 0.0)
    assert decide(zero, now=NOW, since=NOW, bound_s=100, waits=0) == MIN_WAIT_S  # never a busy loop


def test_hold_records_what_run_detail_shows_and_fails_past_the_bound():
    wait = hold(circuit_open(21), target="local-chat", kind="model", now=NOW, since=None, bound_s=600, waits=0,
                topic="resume.summary.0")
    assert wait["for"] == "local-chat" and wait["reason"] == "circuit_open" and wait["code"] == "unavailable"
    assert wait["next_try_at"] == datetime.fromtimestamp(NOW + 21, UTC).isoformat()
    assert wait["since"] == datetime.fromtimestamp(NOW, UTC).isoformat()
    assert wait["deadline"] == datetime.fromtimestamp(NOW + 600, UTC).isoformat()
    assert (wait["since_ts"], wait["seconds"], wait["waits"], wait["topic"]) == (NOW, 21.0, 1, "resume.summary.0")
    assert set(public(wait)) == {"for", "kind", "reason", "code", "detail", "since", "next_try_at", "deadline",
                                 "waits"}
    # later tries keep the first wait's start: the bound is for all the waiting of the step
    again = hold(circuit_open(21), target="local-chat", kind="model", now=NOW + 500, since=NOW, bound_s=600,
                 waits=5, topic="resume.summary.5")
    assert again["since_ts"] == NOW and again["waits"] == 6
    with pytest.raises(ProviderUnavailable) as err:
        hold(circuit_open(21), target="local-chat", kind="model", now=NOW + 590, since=NOW, bound_s=600, waits=9,
             topic="resume.summary.9")
    assert err.value.code == "workflow_provider_unavailable" and "local-chat" in err.value.detail
    assert err.value.retryable is False and err.value.fix


def test_max_wait_is_a_workflow_duration_defaulting_to_an_hour():
    base = "name: w\nsteps:\n  - {id: a, type: transform, output: x}\n"
    assert parse_spec(base).max_wait_s == DEFAULT_MAX_WAIT_S
    assert parse_spec("max_wait: 2m\n" + base).max_wait_s == 120.0
    again = parse_spec(yaml.safe_dump(parse_spec("max_wait: 90\n" + base).to_dict()))
    assert again.max_wait_s == 90.0
    with pytest.raises(SpecError) as err:
        parse_spec("max_wait: soon\n" + base)
    assert err.value.errors[0]["field"] == "max_wait"
