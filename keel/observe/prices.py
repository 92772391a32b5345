"""The one price table: what a model call costs when its deployment names no price.

Budgets (their reservation), the ledger (each row's cost), `x-keel-cost` and the usage reports all ask
it, so a call is costed the same everywhere. A deployment's own `input_price_per_1m` /
`output_price_per_1m` win; with neither set, the price comes from the `genai-prices` package
(Pydantic, MIT), whose table ships inside the wheel: nothing is fetched at run time (its opt-in
`UpdatePrices` is never started). Its data is as of the installed release (`SOURCE`).

A deployment is looked up only where a provider bills per token: a provider kind that names one
(`anthropic`, `openai`, `gemini`, …) or a `base_url` on a known provider's API host
(api.openai.com, api.groq.com, …). A self-hosted server (vLLM, Ollama, the bundled llama.cpp model)
has no list price and costs 0 unless its deployment sets one.

Cached input tokens and batch requests are priced at the provider's own discounted rates where it
bills them. Rates are read once per model and kept as plain floats; a model whose price has tiers
(e.g. a higher rate past 200k prompt tokens) is priced by the package for each call instead.

>>> mini = DeploymentConfig(alias="m", provider="openai_compatible", model="gpt-4o-mini")
>>> round(PriceTable().cost(mini, 1000, 100), 6)
0.00021
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version

from genai_prices import Usage, calc_price
from genai_prices.types import PriceCalculation

from keel.core.settings import DeploymentConfig

log = logging.getLogger("keel.prices")

SOURCE = f"genai-prices {version('genai-prices')}"

# Keel provider kinds (and OpenAI-compatible presets) that name a provider in the table.
PROVIDER_IDS = {
    "openai": "openai", "anthropic": "anthropic", "azure": "azure", "azure_openai": "azure",
    "gemini": "google", "google": "google", "vertex": "google", "bedrock": "aws", "mistral": "mistral",
    "groq": "groq", "together": "together", "fireworks": "fireworks", "deepseek": "deepseek",
    "openrouter": "openrouter", "xai": "x-ai", "cohere": "cohere", "perplexity": "perplexity",
}
# Kinds that never bill per token: their model runs here or on the company's own servers.
SELF_HOSTED = {"local", "local_embed", "vllm", "ollama", "tgi", "llamacpp", "sglang"}
_PROBE = 1000  # tokens: below every tier's threshold
_TIER_PROBE = 1_000_000


@dataclass(frozen=True)
class Rates:
    """Dollars per million tokens for one model; `tiered` models are priced per call by the package."""

    model: str
    provider: str
    input: float
    output: float
    cached_input: float
    batch_input: float
    batch_output: float
    tiered: bool = False
    source: str = SOURCE

    def to_dict(self) -> dict[str, object]:
        return {"model": self.model, "provider": self.provider, "input_per_1m": self.input,
                "output_per_1m": self.output, "cached_input_per_1m": self.cached_input,
                "batch_input_per_1m": self.batch_input, "batch_output_per_1m": self.batch_output,
                "tiered": self.tiered, "source": self.source}


def _where(cfg: DeploymentConfig) -> tuple[str | None, str | None]:
    """(provider_id, provider_api_url) to look the deployment up by, or (None, None): no list price."""
    if cfg.provider in SELF_HOSTED:
        return None, None
    if cfg.provider in PROVIDER_IDS:
        return PROVIDER_IDS[cfg.provider], None
    if cfg.base_url:
        return None, cfg.base_url
    if cfg.provider == "openai_compatible":  # no base_url: the provider's default, OpenAI's API
        return "openai", None
    return None, None


class PriceTable:
    """Default prices by deployment, read from the bundled table once per (provider, model)."""

    def __init__(self, now: datetime | None = None) -> None:
        self.now = now  # the price date; None: today (prices that changed over time are dated)
        self._rates: dict[tuple[str | None, str | None, str], Rates | None] = {}

    def rates(self, cfg: DeploymentConfig) -> Rates | None:
        """The deployment's list rates, or None when it has no list price (self-hosted, unknown model)."""
        pid, url = _where(cfg)
        if pid is None and url is None:
            return None
        model = cfg.model or cfg.alias
        key = (pid, url, model)
        if key not in self._rates:
            self._rates[key] = self._look_up(pid, url, model)
        return self._rates[key]

    def _calc(self, pid: str | None, url: str | None, model: str, usage: Usage,
              batch: bool = False) -> PriceCalculation:
        ctx = {"processing": "batch"} if batch else None
        when = self.now or datetime.now(UTC)
        if pid is not None:
            return calc_price(usage, model, provider_id=pid, genai_request_timestamp=when, price_context=ctx)
        return calc_price(usage, model, provider_api_url=url, genai_request_timestamp=when, price_context=ctx)

    def _look_up(self, pid: str | None, url: str | None, model: str) -> Rates | None:
        try:
            per = 1_000_000 / _PROBE

            def rate(batch: bool = False, **counts: int) -> float:
                return round(float(self._calc(pid, url, model, Usage(**counts), batch).total_price) * per, 9)

            inp = rate(input_tokens=_PROBE)
            out = rate(output_tokens=_PROBE)
            cached = rate(input_tokens=_PROBE, cache_read_tokens=_PROBE)
            big = self._calc(pid, url, model, Usage(input_tokens=_TIER_PROBE, output_tokens=_TIER_PROBE))
            tiered = abs(float(big.total_price) - (inp + out) * _TIER_PROBE / 1e6) > 1e-9
            rates = Rates(model=model, provider=big.provider.id, input=inp, output=out, cached_input=cached,
                          batch_input=rate(True, input_tokens=_PROBE), batch_output=rate(True, output_tokens=_PROBE),
                          tiered=tiered)
        except LookupError:
            log.info("no default price for this model", extra={"model": model, "provider": pid or url})
            return None
        return rates

    def cost(self, cfg: DeploymentConfig, prompt: int, completion: int, *, cached: int = 0,
             batch: bool = False) -> float:
        """Dollars for one call: the deployment's own prices if it sets any, else the table's (0 without one).
        `cached` is the part of `prompt` the provider read from its prompt cache."""
        if cfg.input_price_per_1m or cfg.output_price_per_1m:
            return (prompt * cfg.input_price_per_1m + completion * cfg.output_price_per_1m) / 1e6
        r = self.rates(cfg)
        if r is None or (prompt <= 0 and completion <= 0):
            return 0.0
        cached = min(max(cached, 0), prompt)
        if r.tiered:
            pid, url = _where(cfg)
            return float(self._calc(pid, url, r.model, Usage(input_tokens=prompt, output_tokens=completion,
                                                             cache_read_tokens=cached), batch).total_price)
        pin, pout = (r.batch_input, r.batch_output) if batch else (r.input, r.output)
        return ((prompt - cached) * pin + cached * r.cached_input + completion * pout) / 1e6

    def priced(self, cfg: DeploymentConfig) -> bool:
        """Whether calls on the deployment cost anything: its own prices, or the table's."""
        return bool(cfg.input_price_per_1m or cfg.output_price_per_1m or self.rates(cfg) is not None)

    def describe(self, cfg: DeploymentConfig) -> dict[str, object]:
        """Where the deployment's price comes from, for listings and docs."""
        if cfg.input_price_per_1m or cfg.output_price_per_1m:
            return {"source": "deployment", "input_per_1m": cfg.input_price_per_1m,
                    "output_per_1m": cfg.output_price_per_1m}
        r = self.rates(cfg)
        return r.to_dict() if r is not None else {"source": "none"}


DEFAULT = PriceTable()  # the process's table: a cache of the package's read-only data, no request state
