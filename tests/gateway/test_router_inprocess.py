"""The router inside the real Gateway (real store, deployments, providers, ledger) against loopback fake
upstreams, in one process, so its own state can be inspected: in-flight counts for streams, backoff
delays, the governance `allow` hook, the attempts record."""

import asyncio
import time
import uuid
from typing import Any

import pytest
from opentelemetry import trace

from keel.core.db import Store
from keel.core.errors import Forbidden, NotSupported, Unavailable, UpstreamError
from keel.core.settings import AliasConfig, DeploymentConfig, Settings
from keel.gateway import registry
from keel.gateway.deployments import Deployments
from keel.gateway.pipeline import Call, Gateway, Providers
from keel.gateway.protocol import ChatRequest, ProviderContext
from keel.gateway.router import Router
from keel.identity.principal import Principal
from keel.observe.ledger import Ledger
from conftest import ledger_rows
from tests.fakes.openai_upstream import FakeOpenAI

pytestmark = pytest.mark.store


@pytest.fixture(scope="module")
def fakes():
    with FakeOpenAI() as a, FakeOpenAI() as b:
        yield a, b


@pytest.fixture
def fake_a(fakes):
    fakes[0].reset()
    return fakes[0]


@pytest.fixture
def fake_b(fakes):
    fakes[1].reset()
    return fakes[1]


class Sleeps:
    """Records backoff delays instead of waiting them out."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


@pytest.fixture
def build(db_url, tmp_path):
    made: list[Gateway] = []

    def make(models: list[dict[str, Any]], aliases: dict[str, dict[str, Any]] | None = None,
             provider_overrides: dict[str, str] | None = None, **router_kw: Any) -> tuple[Gateway, Router]:
        providers = provider_overrides or {}
        settings = Settings(data_dir=tmp_path, embedded_models=False,
                            models=[DeploymentConfig(provider=providers.get(m["id"], "openai_compatible"), **m)
                                    for m in models],
                            aliases={k: AliasConfig(**v) for k, v in (aliases or {}).items()})
        store = Store.open(db_url)
        store.upgrade()
        deployments = Deployments(store, settings, ProviderContext(get_secret=lambda name: ""))
        router = Router(Providers(deployments), settings, **router_kw)
        gw = Gateway(deployments, Ledger(store), trace.get_tracer("test"), router=router)
        made.append(gw)
        return gw, router

    yield make
    for gw in made:
        gw.deployments.store.dispose()


def new_call(alias: str, stream: bool = False) -> Call:
    return Call(request_id=uuid.uuid4().hex, principal=Principal(key_id="k1", role="admin"), kind="chat",
                alias=alias, chat=ChatRequest(model=alias, messages=[{"role": "user", "content": "hi"}],
                                              stream=stream))


async def read_all(gw: Gateway, call: Call) -> str:
    out = []
    async for delta in gw.chat_stream(call):
        out.append(delta.content or "")
    return "".join(out)


def run(gw: Gateway, coro: Any) -> Any:
    async def main() -> Any:
        try:
            return await coro
        finally:
            await gw.deployments.close()
    return asyncio.run(main())


def test_stream_in_flight_counts_return_to_zero_however_the_stream_ends(build, fake_a, fake_b):
    gw, router = build([dict(alias="s", model="gpt", id="s/a", base_url=fake_a.url),
                        dict(alias="bad", model="fault:reset", id="bad/b", base_url=fake_b.url)])

    async def scenario() -> None:
        assert "Hello from the fake" in await read_all(gw, new_call("s", stream=True))
        assert router.snapshot()["s/a"]["in_flight"] == 0
        held = gw.chat_stream(new_call("s", stream=True))
        await held.__anext__()
        assert router.snapshot()["s/a"]["in_flight"] == 1
        await held.aclose()  # the client hung up after the first event
        assert router.snapshot()["s/a"]["in_flight"] == 0
        with pytest.raises(UpstreamError):
            await read_all(gw, new_call("bad", stream=True))  # reset after the first delta: no failover
        snap = router.snapshot()["bad/b"]
        assert snap["in_flight"] == 0
        assert snap["failures"] == 1, "a mid-stream failure counts against the deployment"

    run(gw, scenario())


def test_least_busy_sends_the_next_request_to_the_idle_deployment(build, fake_a, fake_b):
    gw, router = build([dict(alias="lb", model="gpt", id="lb/a", base_url=fake_a.url),
                        dict(alias="lb", model="gpt", id="lb/b", base_url=fake_b.url)],
                       {"lb": {"strategy": "least-busy"}})

    async def scenario() -> list[str]:
        held = gw.chat_stream(new_call("lb", stream=True))
        await held.__anext__()
        busy = router.snapshot()
        first = next(did for did, s in busy.items() if s["in_flight"] == 1)
        served = []
        for _ in range(4):
            call = new_call("lb")
            await gw.chat(call)
            served.append(call.deployment.deployment_id())
        await held.aclose()
        return [first, *served]

    first, *served = run(gw, scenario())
    assert first not in served and len(set(served)) == 1


def test_retries_back_off_exponentially_with_jitter(build, fake_a):
    sleeps = Sleeps()
    gw, _router = build([dict(alias="x", model="fault:503", id="x/a", base_url=fake_a.url)],
                        {"x": {"retries": 3, "backoff_ms": 100, "circuit_failures": 10}}, sleep=sleeps)
    call = new_call("x")
    with pytest.raises(UpstreamError) as exc:
        run(gw, gw.chat(call))
    assert exc.value.status == 502 and exc.value.ids["tried"] == ["x/a"]
    assert fake_a.requests == 4
    lows = [0.05, 0.1, 0.2]
    assert len(sleeps.delays) == 3
    assert all(lo <= d <= 2 * lo for lo, d in zip(lows, sleeps.delays)), sleeps.delays
    assert [a["error"] for a in call.annotations["attempts"]] == ["upstream_error"] * 4


def test_retry_after_is_honoured_when_short_and_another_deployment_is_preferred(build, fake_a, fake_b):
    sleeps = Sleeps()
    gw, _router = build([dict(alias="r", model="gpt", id="r/a", base_url=fake_a.url)], sleep=sleeps)
    fake_a.retry_after = "1.5"
    fake_a.fail_next("429")
    call = new_call("r")
    run(gw, gw.chat(call))
    assert fake_a.requests == 2 and sleeps.delays and sleeps.delays[0] >= 1.5
    assert [a["error"] for a in call.annotations["attempts"]] == ["upstream_rate_limited", None]

    sleeps.delays.clear()
    gw2, _ = build([dict(alias="r", model="gpt", id="r/a", base_url=fake_a.url),
                    dict(alias="r", model="gpt", id="r/b", base_url=fake_b.url, weight=0.001)],
                   sleep=sleeps)
    fake_a.reset()
    fake_a.retry_after = "1.5"
    fake_a.fail_next("429", times=-1)
    for _ in range(3):
        call = new_call("r")
        run(gw2, gw2.chat(call))
        assert call.deployment.deployment_id() == "r/b"
    assert sleeps.delays == [], "moving to another deployment needs no wait"


def test_allow_hook_keeps_calls_away_from_forbidden_deployments(build, fake_a, fake_b):
    gw, _router = build([dict(alias="p", model="gpt", id="p/cloud", base_url=fake_a.url),
                         dict(alias="p", model="gpt", id="p/onprem", base_url=fake_b.url),
                         dict(alias="q", model="gpt", id="q/cloud", base_url=fake_a.url)],
                        {"p": {"fallbacks": ["q"]}},
                        allow=lambda call, cfg: not cfg.deployment_id().endswith("/cloud"))
    for _ in range(5):
        call = new_call("p")
        run(gw, gw.chat(call))
        assert call.deployment.deployment_id() == "p/onprem"
    assert fake_a.requests == 0
    fake_b.fail_next("500", times=-1)
    with pytest.raises(UpstreamError):  # the onprem deployment fails; the fallback q is cloud-only: never reached
        run(gw, gw.chat(new_call("p")))
    assert fake_a.requests == 0

    gw2, _ = build([dict(alias="p", model="gpt", id="p/cloud", base_url=fake_a.url)],
                   allow=lambda call, cfg: False)
    with pytest.raises(Forbidden):
        run(gw2, gw2.chat(new_call("p")))
    assert fake_a.requests == 0


def test_all_circuits_open_gives_unavailable_with_retry_after(build, fake_a):
    gw, router = build([dict(alias="c", model="fault:500", id="c/a", base_url=fake_a.url)],
                       {"c": {"retries": 0, "circuit_failures": 2, "circuit_cooldown_s": 30}})
    for _ in range(2):
        with pytest.raises(UpstreamError):
            run(gw, gw.chat(new_call("c")))
    with pytest.raises(Unavailable) as exc:
        run(gw, gw.chat(new_call("c")))
    assert "circuit is open" in exc.value.detail and exc.value.headers["Retry-After"] == "30"
    assert fake_a.requests == 2
    assert router.snapshot()["c/a"]["circuit"] == "open"


def test_failed_requests_are_metered_once_without_cost(build, fake_a, fake_b, db_url):
    """Regression guard: a request that failed on every deployment writes one row, with no estimated tokens."""
    gw, _router = build([dict(alias="m", model="fault:500", id="m/a", base_url=fake_a.url, input_price_per_1m=5),
                         dict(alias="m2", model="fault:502", id="m2/b", base_url=fake_b.url)],
                        {"m": {"fallbacks": ["m2"], "retries": 1, "backoff_ms": 1}, "m2": {"retries": 0}})
    call = new_call("m", stream=True)
    with pytest.raises(UpstreamError):
        run(gw, read_all(gw, call))
    gw.ledger.flush_sync()
    rows = ledger_rows(db_url)
    assert len(rows) == 1 and rows[0].status == "error" and rows[0].request_id == call.request_id
    assert rows[0].cost == 0 and rows[0].tokens_in == 0 and rows[0].tokens_out == 0
    assert fake_a.requests == 2 and fake_b.requests == 1


class Sleepy:
    """A plugin provider that never answers and enforces no timeout of its own (nor can it stream)."""

    name, supports_tools, supports_json_mode, can_stream, can_embed = "sleepy", False, False, False, False

    def __init__(self, config, ctx) -> None:
        self.config = config

    async def chat(self, req):
        await asyncio.sleep(60)  # the subject: a provider that never answers

    def count_tokens(self, messages) -> int:
        return 1

    async def close(self) -> None:
        pass


def test_router_guards_the_timeout_of_providers_without_one(build, fake_a):
    registry.register("sleepy", Sleepy)
    gw, router = build([dict(alias="z", model="m", id="z/sleepy", timeout_s=0.2),
                         dict(alias="ok", model="gpt", id="ok/a", base_url=fake_a.url)],
                        {"z": {"fallbacks": ["ok"]}}, provider_overrides={"z/sleepy": "sleepy"})
    call = new_call("z")
    t0 = time.monotonic()
    run(gw, gw.chat(call))
    assert 0.2 <= time.monotonic() - t0 < 3
    assert call.deployment.deployment_id() == "ok/a"
    assert [a["error"] for a in call.annotations["attempts"]] == ["upstream_timeout", None]
    assert router.snapshot()["z/sleepy"]["failures"] == 1, "a timeout counts against the deployment"

    with pytest.raises(NotSupported):  # asked of the model itself: not hidden by a fallback
        run(gw, gw.chat(new_call("z", stream=True)))
    assert fake_a.requests == 1


def test_max_retries_retries_the_same_deployment_before_moving_on(build, fake_a, fake_b):
    sleeps = Sleeps()
    gw, _router = build([dict(alias="s", model="gpt", id="s/a", base_url=fake_a.url, max_retries=1, weight=1000),
                         dict(alias="s", model="gpt", id="s/b", base_url=fake_b.url, weight=0.001)], sleep=sleeps)
    fake_a.fail_next("502")
    call = new_call("s")
    run(gw, gw.chat(call))
    assert call.deployment.deployment_id() == "s/a" and fake_a.requests == 2 and fake_b.requests == 0
    assert len(sleeps.delays) == 1

    fake_a.fail_next("502", times=2)  # a second failure: its one sticky retry is used up, b serves
    call = new_call("s")
    run(gw, gw.chat(call))
    assert call.deployment.deployment_id() == "s/b"
    assert [a["deployment"] for a in call.annotations["attempts"]] == ["s/a", "s/a", "s/b"]


def test_the_early_answer_leaves_before_the_routers_bookkeeping(build, fake_a):
    """`call.answer` gets the provider's result while the attempt is still open (in flight, not yet in
    the attempts record); once the call returns, the router has settled it."""
    gw, router = build([dict(alias="m", model="gpt", id="m/a", base_url=fake_a.url)])
    call = new_call("m")
    seen: list[tuple[int, int, str | None]] = []

    def answer(result: Any) -> None:
        seen.append((router.snapshot()["m/a"]["in_flight"], len(call.annotations["attempts"]), result.content))

    call.answer = answer
    result = run(gw, gw.chat(call))
    assert seen == [(1, 0, result.content)] and result.content
    assert call.answer is None and router.snapshot()["m/a"]["in_flight"] == 0
    assert [a["deployment"] for a in call.annotations["attempts"]] == ["m/a"]
