"""The default price table: list prices for well-known models (offline, from the bundled table), none for
self-hosted ones, discounted cached-input and batch rates, tiered prices per call; and a budget that trips
on a deployment with no price configured."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime

import httpx
import pytest

from conftest import loopback_process, problem, wait_ledger
from keel.core.settings import DeploymentConfig
from keel.observe.prices import PriceTable

WHEN = datetime(2026, 11, 1, tzinfo=UTC)  # prices are dated: the test pins the date it checks


def dep(provider: str, model: str, **kw) -> DeploymentConfig:
    return DeploymentConfig(alias="m", provider=provider, model=model, **kw)


def test_well_known_models_have_list_prices_and_self_hosted_ones_none():
    table = PriceTable(now=WHEN)
    mini = table.rates(dep("openai_compatible", "gpt-4o-mini"))  # no base_url: OpenAI's own API
    assert mini is not None and (mini.input, mini.output) == (0.15, 0.6)
    assert mini.cached_input < mini.input and mini.batch_input < mini.input and mini.batch_output < mini.output
    assert table.rates(dep("openai_compatible", "gpt-4o-mini", base_url="https://api.openai.com/v1")) == mini
    haiku = table.rates(dep("anthropic", "claude-3-5-haiku-latest"))
    assert haiku is not None and (haiku.input, haiku.output) == (0.8, 4.0)
    # A self-hosted server has no list price, whatever model name it serves.
    assert table.rates(dep("openai_compatible", "gpt-4o-mini", base_url="http://vllm.internal:8000/v1")) is None
    assert table.rates(dep("local", "smollm2")) is None
    assert table.rates(dep("openai_compatible", "no-such-model-anywhere")) is None
    assert table.cost(dep("local", "smollm2"), 10_000, 10_000) == 0.0


def test_cost_uses_the_deployments_own_prices_first_then_cached_and_batch_rates():
    table = PriceTable(now=WHEN)
    own = dep("openai_compatible", "gpt-4o-mini", input_price_per_1m=1.0, output_price_per_1m=2.0)
    assert table.cost(own, 1000, 100) == pytest.approx(1000e-6 + 200e-6)
    listed = dep("openai_compatible", "gpt-4o-mini")
    assert table.cost(listed, 1000, 100) == pytest.approx((1000 * 0.15 + 100 * 0.6) / 1e6)
    r = table.rates(listed)
    assert table.cost(listed, 1000, 100, cached=400) == pytest.approx((600 * 0.15 + 400 * r.cached_input + 60) / 1e6)
    assert table.cost(listed, 1000, 100, batch=True) < table.cost(listed, 1000, 100)


def test_tiered_prices_are_charged_per_call():
    """A model whose rate rises past a prompt size is priced by the package for each call, not linearly."""
    table = PriceTable(now=WHEN)
    gemini = dep("gemini", "gemini-2.5-pro")
    r = table.rates(gemini)
    assert r is not None and r.tiered
    small, big = table.cost(gemini, 1000, 0), table.cost(gemini, 300_000, 0)
    assert small == pytest.approx(1000 * r.input / 1e6)
    assert big > 300 * small  # the long prompt's tokens cost more each


@pytest.fixture
def anthropic_upstream():
    with contextlib.ExitStack() as stack:
        yield stack.enter_context(loopback_process("tests.fakes.anthropic_upstream"))


@pytest.mark.store
def test_budget_trips_with_default_prices_and_no_price_configured(server_factory, anthropic_upstream, tmp_path):
    """Regression guard: a deployment without prices cost 0, so no budget ever applied to it. With the
    default table its calls reserve and settle at list price, and the budget refuses once spent."""
    cfg = tmp_path / "keel.yaml"
    cfg.write_text(f"""
models:
  - alias: claude
    provider: anthropic
    model: claude-3-5-haiku-latest
    base_url: {anthropic_upstream}
ledger_flush_interval_s: 0.1
budget_idle_s: 0.2
""")
    srv = server_factory(config=cfg)
    admin = srv.admin()
    key = admin.post("/admin/keys", json={"role": "member", "name": "budgeted"}).json()
    # One call reserves at most (prompt + 50) tokens at $0.8/$4 per 1M: well under 300 µ$; five fit in 1 m$.
    budget = admin.post("/admin/budgets", json={"scope": "key", "scope_id": key["id"], "amount": 0.001,
                                                "period": "day"}).json()
    body = {"model": "claude", "max_tokens": 50, "messages": [{"role": "user", "content": "hello there"}]}
    codes = []
    with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {key['key']}"}, timeout=30) as c:
        for _ in range(40):
            r = c.post("/v1/chat/completions", json=body)
            codes.append(r.status_code)
            if r.status_code != 200:
                break
    assert codes[-1] == 402 and codes.count(200) >= 3, codes
    refused = problem(r, 402, budget["id"])
    assert refused["code"] == "budget_exceeded" and refused["required"] > 0
    rows = wait_ledger(srv.extra["db_url"], "status = 'ok'", n=codes.count(200))
    table = PriceTable()
    deployment = dep("anthropic", "claude-3-5-haiku-latest")
    for row in rows:
        assert row.cost > 0
        assert row.cost == pytest.approx(table.cost(deployment, row.tokens_in, row.tokens_out))
    assert sum(row.cost for row in rows) <= 0.001
