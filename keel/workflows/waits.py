"""Provider outages as durable waits, not failures.

A step that calls a model, or an HTTP target, may be told "not now": an open circuit, a 429 or 503
with `Retry-After`, a rate-limit window, a budget period that resets, a provider that is down. Such an
answer does not fail the run: the step's attempt returns a *wait* (checkpointed), the run waits durably
(a DBOS receive with a timeout: its deadline is in DBOS' system database, so a restart waits only what
is left, and a message on the wait's topic — an operator's resume — ends it early), then tries again
as a new DBOS step. The waiting is bounded (the step's `timeout_s` for model steps, else the
workflow's `max_wait`): a next try past the bound fails the step with `workflow_provider_unavailable`.
Answers no wait can fix — a policy denial, a guard's block, a bad request, a refused credential —
fail at once.

The pieces are independent of workflows so that the agents' loop can use them the same way:
`unavailable` (is this error a "not now"?), `decide` (how long, or give up; pure, given the time),
`hold` (the wait record or the final error) and `attempts` (the durable loop around DBOS steps).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from keel.core.errors import (
    BudgetExceeded, KeelError, RateLimited, Unavailable, UpstreamError, UpstreamRateLimited,
)
from keel.workflows.durable import DBOS
from keel.workflows.spec_types import DEFAULT_MAX_WAIT_S

__all__ = ["DEFAULT_MAX_WAIT_S", "WAITING", "ProviderUnavailable", "Unavailability", "attempts", "decide", "hold",
           "public", "unavailable"]
WAITING = "waiting_provider"
BACKOFF_BASE_S = 1.0  # the first wait when the answer names no time; doubles per wait …
BACKOFF_CAP_S = 30.0  # … up to this
MIN_WAIT_S = 0.5  # never try again sooner (a `Retry-After: 0` from a circuit about to probe)
HOST_STATUSES = (429, 503)  # an http/notify target's answers that are waits when they carry Retry-After


@dataclass(frozen=True)
class Unavailability:
    """Why a target cannot serve now, and for how long it said (None: it did not say; back off)."""

    reason: str  # circuit_open | rate_limited | budget_exhausted | upstream_rate_limited | upstream_unavailable
    target: str  # the model alias, or the host an http/notify step calls
    kind: str  # "model" or "host"
    retry_after: float | None


def _header_seconds(exc: KeelError) -> float | None:
    for name, value in exc.headers.items():
        if name.lower() == "retry-after":
            try:
                return max(0.0, float(value))
            except ValueError:
                return None
    return None


def _resets_in(exc: BudgetExceeded, now: float) -> float | None:
    resets = (exc.ids.get("budget") or {}).get("resets_at")
    if not resets:
        return None  # a total budget never refills: no wait helps
    try:
        at = datetime.fromisoformat(str(resets).replace("Z", "+00:00"))
    except ValueError:
        return None
    return max(0.0, (at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp() - now)


def unavailable(exc: BaseException, *, target: str, kind: str, now: float) -> Unavailability | None:
    """The "not now" in `exc`, or None when waiting cannot help (policy, guards, bad request, credentials).

    Model calls (`kind="model"`): an open circuit (503 with Retry-After), a Keel rate limit (429, the
    window's reset), a budget whose period resets, an upstream 429 or 5xx/timeout/connection failure.
    Hosts (`kind="host"`): a 429 or 503 that says `Retry-After`; other failures keep the step's retries.
    """
    if not isinstance(exc, KeelError):
        return None
    if kind == "host":
        status = exc.ids.get("upstream_status")
        if status in HOST_STATUSES and exc.retry_after is not None:
            return Unavailability("host_rate_limited" if status == 429 else "host_unavailable", target, kind,
                                  exc.retry_after)
        return None
    if isinstance(exc, Unavailable):
        after = _header_seconds(exc)
        return Unavailability("circuit_open", target, kind, after) if after is not None else None
    if isinstance(exc, RateLimited):
        return Unavailability("rate_limited", target, kind, _header_seconds(exc))
    if isinstance(exc, BudgetExceeded):
        after = _resets_in(exc, now)
        return Unavailability("budget_exhausted", target, kind, after) if after is not None else None
    if isinstance(exc, UpstreamError) and exc.retryable:
        reason = "upstream_rate_limited" if isinstance(exc, UpstreamRateLimited) else "upstream_unavailable"
        return Unavailability(reason, target, kind, exc.retry_after)
    return None


def decide(u: Unavailability, *, now: float, since: float, bound_s: float, waits: int) -> float | None:
    """Seconds to wait before the next try, or None to give up.

    The answer's own time (Retry-After, the circuit's trial, the window's or budget's reset) is waited
    out, never less than MIN_WAIT_S; without one the wait doubles from BACKOFF_BASE_S up to BACKOFF_CAP_S
    (`waits`: how many came before). The next try must fall within `bound_s` of `since` (the first "not
    now"): a named time past it gives up at once (waiting cannot help in time); a backoff is cut to it.
    """
    deadline = since + bound_s
    if u.retry_after is not None:
        delay = max(MIN_WAIT_S, u.retry_after)
        return delay if now + delay <= deadline else None
    delay = max(MIN_WAIT_S, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** min(waits, 32)))
    left = deadline - now
    if left < MIN_WAIT_S:
        return None
    return min(delay, left)


class ProviderUnavailable(KeelError):
    """A step's model or target stayed unavailable past its bound (`max_wait`, or the step's `timeout_s`)."""

    code, status, title = "workflow_provider_unavailable", 503, "Provider unavailable for too long"
    retryable = False  # the step's own retries must not start the wait over


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


def hold(exc: BaseException, *, target: str, kind: str, now: float, since: float | None, bound_s: float,
         waits: int, topic: str) -> dict[str, Any]:
    """The wait record for `exc` (its `seconds`, `since_ts` and `topic` drive `attempts`; the rest is what
    run detail shows), or raise: `exc` itself when waiting cannot help, ProviderUnavailable past the bound."""
    u = unavailable(exc, target=target, kind=kind, now=now)
    if u is None:
        raise exc
    first = now if since is None else since
    delay = decide(u, now=now, since=first, bound_s=bound_s, waits=waits)
    detail = exc.detail if isinstance(exc, KeelError) else str(exc)
    if delay is None:
        named = f"; it asked for {math.ceil(u.retry_after)} s more" if u.retry_after is not None else ""
        raise ProviderUnavailable(
            f"{kind} {target!r} stayed unavailable ({u.reason}) for {now - first:.0f} s, the step may wait "
            f"{bound_s:.0f} s{named}: {detail}",
            fix="raise the workflow's max_wait (or the step's timeout_s), add a fallback alias, or retry the run "
                "when the provider is back", target=target, reason=u.reason, waits=waits) from None
    return {"for": target, "kind": kind, "reason": u.reason, "code": getattr(exc, "code", "error"),
            "detail": detail[:500], "since": _iso(first), "next_try_at": _iso(now + delay),
            "deadline": _iso(first + bound_s), "waits": waits + 1, "seconds": round(delay, 3), "since_ts": first,
            "topic": topic}


def public(wait: dict[str, Any] | None) -> dict[str, Any] | None:
    """A wait record as run detail shows it (the loop's own fields left out)."""
    if not wait:
        return None
    return {k: v for k, v in wait.items() if k not in ("since_ts", "topic", "seconds")}


Attempt = Callable[[int, float | None], Awaitable[dict[str, Any]]]


async def attempts(attempt: Attempt, opts: dict[str, Any]) -> dict[str, Any]:
    """Run `attempt(n, since)` as one DBOS step (`opts`: its name and retry settings) after another: while
    it returns `{"status": WAITING, "wait": <hold's record>}` wait durably — until the record's `seconds`
    pass or a message arrives on its `topic` (a resume) — then try again with `n + 1` and the first wait's
    `since_ts`. Any other result is returned; an error raised by an attempt ends the loop."""
    n, since = 0, None
    while True:
        res = await DBOS.run_step_async(opts, attempt, n, since)
        wait = res.get("wait") if isinstance(res, dict) and res.get("status") == WAITING else None
        if wait is None:
            return res
        since = wait["since_ts"]
        await DBOS.recv_async(topic=wait["topic"], timeout_seconds=wait["seconds"])
        n += 1
