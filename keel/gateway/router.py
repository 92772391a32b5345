"""The router: the terminal step of the governed path, turning an alias into an answer from one of its
deployments even when some of them fail.

For one client request it tries the alias's deployments, chosen by the alias's strategy, skipping
deployments whose circuit is open, that the `allow` hook (governance) forbids, or that cannot do what
the request asks. Retryable failures (429, 5xx, connection errors, timeouts) get up to `retries` more
attempts in the alias: first on a deployment not tried yet (at once), else again on one that failed,
after a jittered exponential backoff (`backoff_ms`, doubling) or the 429's retry-after when that is
at most RETRY_AFTER_MAX_S. A deployment that timed out is not tried again in the same request, and a
deployment's `max_retries` makes the router retry it before moving on. Then come the alias's ordered
`fallbacks` (not theirs: no chains), each with its own deployments and settings. A request rejected
because of the request itself (4xx, NotSupported, ContextOverflow, policy) is never retried. A
stream fails over only before its first delta: the router pulls that delta itself and hands back an
iterator that starts with it; a later failure reaches the client as an SSE error event.

Failed attempts are never billed: the Gateway writes one ledger row per client request, for
`call.deployment` (the deployment that served it); the tries are in `call.annotations["attempts"]`.
Breakers, in-flight counts and latency windows live in this process (per replica).
"""

from __future__ import annotations

import asyncio
import math
import random
import statistics
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from keel.core.errors import (
    Forbidden, InternalError, KeelError, NotSupported, RateLimited, Unavailable, UpstreamTimeout,
)
from keel.core.settings import AliasConfig, DeploymentConfig, Settings
from keel.gateway import registry
from keel.gateway.circuit import HALF_OPEN, Circuit
from keel.gateway.pipeline import Call, Upstream, deployment_kind
from keel.gateway.protocol import ChatDelta, upstream_error
from keel.gateway.providers.openai_compatible import HTTPProvider

RETRY_AFTER_MAX_S = 2.0  # a 429's retry-after up to this is waited out; a longer one moves on
BACKOFF_CAP_S = 2.0
TIMEOUT_GRACE_S = 1.0  # the router's guard over the provider's own timeout_s, for providers that lack one
LATENCY_WINDOW = 16  # recent samples per deployment for `lowest-latency`
EXPLORE = 0.1  # share of `lowest-latency` picks made at random, so a slow-then-recovered deployment is re-measured

RETRY, NEXT, STOP = "retry", "next", "stop"

Allow = Callable[[Call, DeploymentConfig], bool]


def classify(err: BaseException) -> str:
    """RETRY: another try may succeed, even on the same deployment (429, 5xx, connection, timeout).
    NEXT: this deployment cannot serve it, another might (a bad upstream credential, a missing model).
    STOP: the request itself is the problem (4xx, NotSupported, ContextOverflow, policy) or Keel has a bug."""
    if not isinstance(err, KeelError) or isinstance(err, InternalError):
        return STOP
    if isinstance(err, RateLimited) and err.failover:  # a deployment's own rate limit: another may take it
        return NEXT
    if err.retryable:
        return RETRY
    return NEXT if err.status >= 500 else STOP


# -- per-deployment state and strategies -----------------------------------------------------------------

@dataclass
class DeploymentState:
    """What the router knows about one deployment in this process."""

    circuit: Circuit
    in_flight: int = 0
    # recent latencies in ms, apart for streams (time to first delta) and whole answers
    latencies: dict[bool, deque[float]] = field(
        default_factory=lambda: {False: deque(maxlen=LATENCY_WINDOW), True: deque(maxlen=LATENCY_WINDOW)})

    def latency(self, stream: bool) -> float | None:
        window = self.latencies[stream]
        return statistics.median(window) if window else None


Option = tuple[DeploymentConfig, DeploymentState]


def weighted(options: list[Option], stream: bool, rng: random.Random) -> Option:
    """Random, in proportion to each deployment's `weight`."""
    if len(options) == 1:
        return options[0]
    return rng.choices(options, weights=[cfg.weight for cfg, _ in options])[0]


def least_busy(options: list[Option], stream: bool, rng: random.Random) -> Option:
    """Fewest requests in flight from this process; ties by weight."""
    low = min(st.in_flight for _, st in options)
    return weighted([o for o in options if o[1].in_flight == low], stream, rng)


def lowest_latency(options: list[Option], stream: bool, rng: random.Random) -> Option:
    """Lowest median of recent latencies; unmeasured deployments first, and a random pick now and then."""
    unmeasured = [o for o in options if o[1].latency(stream) is None]
    if unmeasured:
        return weighted(unmeasured, stream, rng)
    if len(options) > 1 and rng.random() < EXPLORE:
        return options[rng.randrange(len(options))]
    return min(options, key=lambda o: o[1].latency(stream))  # type: ignore[arg-type, return-value]


STRATEGIES: dict[str, Callable[[list[Option], bool, random.Random], Option]] = {
    "weighted": weighted, "least-busy": least_busy, "lowest-latency": lowest_latency}


# -- the stream handed back once its first delta exists --------------------------------------------------

class _Stream:
    """The provider's stream with its first delta put back in front. When it ends, fails or is closed
    (even before it was started) it releases the deployment's in-flight slot exactly once."""

    def __init__(self, first: ChatDelta | None, inner: AsyncIterator[ChatDelta],
                 done: Callable[[bool | None], None]) -> None:
        self._first = first
        self._inner = inner
        self._done: Callable[[bool | None], None] | None = done

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self) -> ChatDelta:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        if self._done is None:
            raise StopAsyncIteration
        try:
            return await self._inner.__anext__()
        except StopAsyncIteration:
            self._end(None)
            raise
        except BaseException as exc:
            self._end(False if classify(exc) != STOP else None)
            raise

    async def aclose(self) -> None:
        self._first = None
        self._end(None)
        await _aclose(self._inner)

    def _end(self, ok: bool | None) -> None:
        done, self._done = self._done, None
        if done is not None:
            done(ok)

    def __del__(self) -> None:
        self._end(None)  # dropped without being closed (a stage failed after the router): free the slot


async def _aclose(stream: Any) -> None:
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()


# -- one request's routing -------------------------------------------------------------------------------

@dataclass
class _Tried:
    """How one deployment did during the current request."""

    fails: int = 0
    again: bool = False  # may the same deployment be tried once more?
    retry_after: float | None = None


class _Failed(Exception):
    """Internal: an attempt (or a whole alias) failed in a way that lets the router go on."""

    def __init__(self, error: KeelError | None) -> None:
        self.error = error


class Router:
    """Chooses and calls deployments for a call, with retries, fallbacks, timeouts and circuit breakers.

    `allow(call, cfg)` (default: allow all) is asked before any deployment is used, fallbacks included;
    governance plugs its policy in here, so a call never reaches a deployment that policy forbids.

    >>> router = Router(Providers(deployments), settings, allow=lambda call, cfg: cfg.provider != "anthropic")
    >>> gateway = Gateway(deployments, ledger, tracer, stages=stages, router=router)
    """

    def __init__(self, gateway: Upstream, settings: Settings, *, allow: Allow | None = None,
                 clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep) -> None:
        self.gateway = gateway
        self.settings = settings
        self.allow: Allow = allow or (lambda call, cfg: True)
        self.clock = clock
        self.rng = rng or random.Random()
        self.sleep = sleep
        self._states: dict[str, DeploymentState] = {}
        self._by_config: dict[int, tuple[DeploymentConfig, DeploymentState]] = {}
        self._default = AliasConfig()
        self._guarded: dict[str, bool] = {}

    def alias_config(self, alias: str) -> AliasConfig:
        conf = self.settings.aliases.get(alias)
        return self._default if conf is None else conf

    def state(self, cfg: DeploymentConfig) -> DeploymentState:
        hit = self._by_config.get(id(cfg))  # the same config object: no id to format
        if hit is not None and hit[0] is cfg:
            return hit[1]
        did = cfg.deployment_id()
        st = self._states.get(did)
        if st is None:
            conf = self.alias_config(cfg.alias)
            st = self._states[did] = DeploymentState(Circuit(conf.circuit_failures, conf.circuit_cooldown_s,
                                                             self.clock))
        if len(self._by_config) > 1000:  # configs are replaced when deployments reload
            self._by_config.clear()
        self._by_config[id(cfg)] = (cfg, st)
        return st

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Breaker state, consecutive failures, in-flight count and median latencies per deployment seen so far."""
        return {did: {"circuit": st.circuit.state, "failures": st.circuit.failures, "in_flight": st.in_flight,
                      "latency_ms": st.latency(False), "stream_latency_ms": st.latency(True)}
                for did, st in self._states.items()}

    # -- the entry point --------------------------------------------------------------------------------
    def call(self, call: Call) -> Awaitable[Any]:
        """Serve `call`; gives what the provider returns (for a stream: an iterator that starts with its
        first delta). Raises the last error when every deployment failed, or Unavailable/Forbidden when
        none could even be tried.

        Each coroutine layer on the path is resumed again when the upstream answers, so an alias without
        fallbacks is served by `_try_alias` alone, and one attempt is inlined there."""
        primary = self.gateway.resolve(call)  # the key's scope is checked for the requested alias only
        attempts: list[dict[str, Any]] = []
        call.annotations["attempts"] = attempts
        skipped: dict[str, str] = {}
        aliases = list(dict.fromkeys([call.alias, *self.alias_config(call.alias).fallbacks]))
        usable = self._usable(call, primary, skipped, primary=True)
        if len(aliases) == 1:
            return self._try_alias(call, call.alias, usable, attempts, skipped, exhausted=aliases)
        return self._with_fallbacks(call, aliases, usable, attempts, skipped)

    async def _with_fallbacks(self, call: Call, aliases: list[str], usable: list[DeploymentConfig],
                              attempts: list[dict[str, Any]], skipped: dict[str, str]) -> Any:
        last: KeelError | None = None
        for i, alias in enumerate(aliases):
            if i:
                usable = self._usable(call, self._fallback_candidates(call, alias, skipped), skipped, primary=False)
            try:
                return await self._try_alias(call, alias, usable, attempts, skipped)
            except _Failed as failed:
                last = failed.error or last
        call.provider = None  # nothing served it: nothing to bill, not even an estimate
        raise self._exhausted(call, aliases, last, attempts, skipped)

    def _fallback_candidates(self, call: Call, alias: str, skipped: dict[str, str]) -> list[DeploymentConfig]:
        wanted = deployment_kind(call)
        found = self.gateway.deployments.for_alias(alias)
        if not found:
            skipped[alias] = "unknown_alias"
        return [c for c in found if c.kind == wanted]

    def _usable(self, call: Call, candidates: list[DeploymentConfig], skipped: dict[str, str],
                primary: bool) -> list[DeploymentConfig]:
        """Candidates that policy allows and that can do what the request asks (tools, JSON mode, stream)."""
        usable: list[DeploymentConfig] = []
        unsupported: NotSupported | None = None
        for cfg in candidates:
            if not self.allow(call, cfg):
                skipped[cfg.deployment_id()] = "not_allowed"
                continue
            if primary and len(candidates) == 1:
                usable.append(cfg)  # `invoke` checks it anyway, and a NotSupported there is never retried
                break
            try:
                self.gateway.check_capabilities(call, cfg, self.gateway.deployments.provider(cfg))
            except NotSupported as exc:
                skipped[cfg.deployment_id()] = "not_supported"
                unsupported = unsupported or exc
                continue
            usable.append(cfg)
        if primary and not usable and unsupported is not None:
            raise unsupported  # the caller asked the model for something it cannot do; no fallback hides that
        return usable

    async def _try_alias(self, call: Call, alias: str, usable: list[DeploymentConfig],
                         attempts: list[dict[str, Any]], skipped: dict[str, str],
                         exhausted: list[str] | None = None) -> Any:
        """Up to 1 + `retries` attempts over the alias's usable deployments; then raises _Failed to move
        on, or (`exhausted`: the aliases tried, this one the last) the error for the whole call."""
        conf = self.alias_config(alias)
        choose = STRATEGIES[conf.strategy]
        tried: dict[str, _Tried] = {}
        last: KeelError | None = None
        prev: DeploymentConfig | None = None
        for _ in range(1 + conf.retries):
            pick = self._pick(call, usable, tried, prev, choose, skipped)
            if pick is None:
                break
            cfg, st = pick
            did = cfg.deployment_id()
            record = tried.setdefault(did, _Tried())
            if record.fails:
                base = conf.backoff_ms / 1000 * 2 ** (record.fails - 1)
                await self.sleep(max(min(BACKOFF_CAP_S, base) * self.rng.uniform(0.5, 1.0),
                                     record.retry_after or 0.0))
            # one attempt; for a stream, up to its first delta
            token = st.circuit.acquire()
            if token is None:  # the circuit opened while this request was backing off
                last = self._circuit_open(call, did, st)
            else:
                st.in_flight += 1
                t0 = time.perf_counter()
                try:
                    result = await self._invoke(call, cfg)
                except BaseException as exc:
                    last = self._failed(call, cfg, st, token, t0, attempts, exc)
                else:
                    self._settle(call, cfg, st, token, True, t0, attempts, None)
                    if call.stream:
                        return _Stream(result[1], result[0], lambda ok: self._stream_done(st, ok))
                    st.in_flight -= 1
                    return result
            prev = cfg
            record.fails += 1
            record.retry_after = last.retry_after if last is not None else None
            record.again = (classify(last) == RETRY and not isinstance(last, UpstreamTimeout)
                            and (record.retry_after or 0.0) <= RETRY_AFTER_MAX_S)
        if exhausted is None:
            raise _Failed(last)
        call.provider = None  # nothing served it: nothing to bill, not even an estimate
        raise self._exhausted(call, exhausted, last, attempts, skipped)

    def _pick(self, call: Call, usable: list[DeploymentConfig], tried: dict[str, _Tried],
              prev: DeploymentConfig | None, choose: Callable[[list[Option], bool, random.Random], Option],
              skipped: dict[str, str]) -> Option | None:
        """Sticky retry while `max_retries` allows it, else a deployment not tried yet, else one worth trying again."""
        options: list[Option] = []
        for cfg in usable:
            st = self.state(cfg)
            if st.circuit.available():
                options.append((cfg, st))
            else:
                skipped.setdefault(cfg.deployment_id(), "circuit_open")
        if not options:
            return None
        if prev is not None:
            rec = tried[prev.deployment_id()]
            if rec.again and rec.fails <= prev.max_retries:
                for opt in options:
                    if opt[0] is prev:
                        return opt
        fresh = [o for o in options if o[0].deployment_id() not in tried]
        if fresh:
            return choose(fresh, call.stream, self.rng)
        again = [o for o in options if tried[o[0].deployment_id()].again]
        return choose(again, call.stream, self.rng) if again else None

    def _invoke(self, call: Call, cfg: DeploymentConfig) -> Awaitable[Any]:
        """The provider's answer (awaited straight from `invoke`); for a stream, (its iterator, its first
        delta or None); with the router's own timeout for providers that do not enforce `timeout_s`."""
        if self._needs_guard(cfg):
            return self._timed(call, cfg)
        return self._first_delta(call, cfg) if call.stream else self.gateway.invoke(call, cfg)

    async def _timed(self, call: Call, cfg: DeploymentConfig) -> Any:
        try:
            async with asyncio.timeout(cfg.timeout_s + TIMEOUT_GRACE_S):
                return await (self._first_delta(call, cfg) if call.stream else self.gateway.invoke(call, cfg))
        except TimeoutError:
            raise upstream_error(None, "", cfg.deployment_id(), timeout=True) from None

    def _failed(self, call: Call, cfg: DeploymentConfig, st: DeploymentState, token: int, t0: float,
                attempts: list[dict[str, Any]], exc: BaseException) -> KeelError:
        """Settle a failed attempt; gives the error when the router may go on, re-raises it when it must stop."""
        st.in_flight -= 1
        kind = classify(exc)
        # Only the deployment's own failures count against it. A stop is the caller's request (an upstream
        # 400, bad input, policy), a cancellation or a bug in Keel; a deployment's own rate limit means the
        # upstream was never called: none of them says anything about the deployment's health.
        verdict = None if kind == STOP or (isinstance(exc, RateLimited) and exc.failover) else False
        self._settle(call, cfg, st, token, verdict, t0, attempts, exc)
        if kind == STOP:
            raise exc
        return exc  # type: ignore[return-value]  # not STOP: a KeelError

    async def _first_delta(self, call: Call, cfg: DeploymentConfig) -> Any:
        """A stream's provider iterator and its first delta (None for an empty stream)."""
        result = await self.gateway.invoke(call, cfg)
        t1 = time.perf_counter()
        try:
            return result, await result.__anext__()
        except StopAsyncIteration:
            return result, None
        except BaseException:
            await _aclose(result)
            raise
        finally:
            call.upstream_ms += (time.perf_counter() - t1) * 1000

    @staticmethod
    def _settle(call: Call, cfg: DeploymentConfig, st: DeploymentState, token: int, verdict: bool | None,
                t0: float, attempts: list[dict[str, Any]], error: BaseException | None) -> None:
        """Tell the breaker and the latency window how the attempt went, and note it in the attempts."""
        ms = (time.perf_counter() - t0) * 1000
        circuit = st.circuit
        trial = circuit.state == HALF_OPEN and circuit.epoch == token
        circuit.record(token, verdict)
        window = st.latencies[call.stream]
        if verdict is True:
            if trial:
                window.clear()  # it just recovered: measure it afresh
            window.append(ms)
        elif verdict is False:
            window.append(cfg.timeout_s * 1000)  # a failure ranks like a timeout
        attempts.append({"deployment": cfg.deployment_id(), "error": _code(error), "ms": round(ms, 3)})

    def _needs_guard(self, cfg: DeploymentConfig) -> bool:
        """HTTP providers enforce `timeout_s` themselves (raising UpstreamTimeout); others get the router's guard."""
        needs = self._guarded.get(cfg.provider)
        if needs is None:
            factory = registry.get(cfg.provider)
            needs = self._guarded[cfg.provider] = not (isinstance(factory, type) and issubclass(factory, HTTPProvider))
        return needs

    @staticmethod
    def _stream_done(st: DeploymentState, ok: bool | None) -> None:
        st.in_flight -= 1
        if ok is False:
            st.circuit.record(None, False)  # failed after its first delta: counts against the deployment

    # -- when nothing served the call ---------------------------------------------------------------------
    def _circuit_open(self, call: Call, did: str, st: DeploymentState) -> Unavailable:
        wait = math.ceil(st.circuit.retry_in())
        return Unavailable(f"deployment {did} is not taking requests: its circuit is open after repeated "
                           f"failures (next trial in {wait} s)", fix="retry later, or add a fallback alias",
                           headers={"Retry-After": str(max(wait, 1))}, model=call.alias, deployment=did)

    def _exhausted(self, call: Call, aliases: list[str], last: KeelError | None,
                   attempts: list[dict[str, Any]], skipped: dict[str, str]) -> KeelError:
        names = ", ".join(dict.fromkeys(aliases))
        opened = sorted(did for did, why in skipped.items() if why == "circuit_open")
        if last is not None:
            tried = list(dict.fromkeys(a["deployment"] for a in attempts))
            if tried:
                last.ids.setdefault("tried", tried)
            if opened:
                last.ids.setdefault("circuit_open", opened)
            return last
        if opened:
            waits = [self._states[did].circuit.retry_in() for did in opened if did in self._states]
            wait = max(1, math.ceil(min(waits))) if waits else 1
            return Unavailable(
                f"model {call.alias!r} is unavailable: the circuit is open for {', '.join(opened)} after repeated "
                f"failures (aliases tried: {names}; next trial in {wait} s)",
                fix="retry later, or add a healthy fallback alias", headers={"Retry-After": str(wait)},
                model=call.alias, circuit_open=opened)
        if skipped and all(why == "not_allowed" for why in skipped.values()):
            return Forbidden(f"policy allows no deployment of model {call.alias!r} or its fallbacks for this request",
                             fix="use another model, or ask an admin to change the policy", model=call.alias)
        return Unavailable(f"no deployment of model {call.alias!r} could take the request (aliases tried: {names})",
                           fix="check the aliases' deployments and fallbacks in keel.yaml", model=call.alias,
                           skipped=skipped or None)


def _code(error: BaseException | None) -> str | None:
    if error is None:
        return None
    if isinstance(error, KeelError):
        return error.code
    return type(error).__name__
