"""Cached prompt tokens are billed at the provider's cached rate: a hosted preset (DeepSeek) with no price
configured, whose answers report cache hits in OpenAI's field or DeepSeek's own, is costed from the
default table with the discount — in the ledger and in `x-keel-cost`."""

from __future__ import annotations

import threading

import orjson
import pytest
from aiohttp import web

from conftest import wait_ledger
from keel.core.settings import DeploymentConfig
from keel.observe.prices import PriceTable

pytestmark = pytest.mark.store
PROMPT, CACHED, OUT = 1200, 1000, 30


class ScriptedUpstream:
    """A loopback server that answers every chat completion with fixed usage, reporting the cache hits in
    OpenAI's field on odd requests and in DeepSeek's on even ones (the outside-network edge)."""

    def __init__(self) -> None:
        self.url = ""
        self._ready = threading.Event()
        self._loop = None
        self.served = 0

    async def _chat(self, request: web.Request) -> web.Response:
        usage = {"prompt_tokens": PROMPT, "completion_tokens": OUT, "total_tokens": PROMPT + OUT}
        self.served += 1
        if self.served % 2:
            usage["prompt_tokens_details"] = {"cached_tokens": CACHED}
        else:
            usage.update(prompt_cache_hit_tokens=CACHED, prompt_cache_miss_tokens=PROMPT - CACHED)
        body = {"id": "x", "object": "chat.completion", "created": 0, "model": "deepseek-chat", "usage": usage,
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "hi"}}]}
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    def _run(self) -> None:
        import asyncio

        async def main() -> None:
            app = web.Application()
            app.router.add_post("/v1/chat/completions", self._chat)
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = runner.addresses[0][1]
            self.url = f"http://127.0.0.1:{port}/v1"
            self._stop = asyncio.Event()
            self._ready.set()
            await self._stop.wait()
            await runner.cleanup()

        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(main())

    def __enter__(self) -> "ScriptedUpstream":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def test_cached_prompt_tokens_cost_the_cached_rate(server_factory, tmp_path):
    table = PriceTable()
    dep = DeploymentConfig(alias="ds", provider="deepseek", model="deepseek-chat")
    r = table.rates(dep)
    assert r is not None and r.cached_input < r.input  # DeepSeek bills cache hits at a discount
    want = table.cost(dep, PROMPT, OUT, cached=CACHED)
    assert want < table.cost(dep, PROMPT, OUT)
    with ScriptedUpstream() as up:
        cfg = tmp_path / "keel.yaml"
        cfg.write_text(f"models:\n  - {{alias: ds, provider: deepseek, model: deepseek-chat, base_url: {up.url}}}\n"
                       "ledger_flush_interval_s: 0.1\n")
        srv = server_factory(config=cfg)
        for field in ("openai", "deepseek"):
            resp = srv.admin().post("/v1/chat/completions", json={"model": "ds", "messages": [{"role": "user", "content": "hi"}]})
            assert resp.status_code == 200, resp.text
            assert float(resp.headers["x-keel-cost"]) == pytest.approx(want, abs=1e-9), field
            row, = wait_ledger(srv.extra["db_url"], f"request_id = '{resp.headers['x-request-id']}'")
            assert row.cost == pytest.approx(want) and row.tokens_in == PROMPT
