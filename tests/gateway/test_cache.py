"""Response cache through the real server against the loopback fake upstream: exact and semantic
hits, what is never cached, team isolation, TTL, invalidation by alias, streams, replicas.

The fake counts the chat requests it receives, so "served from the cache" means "the upstream
saw no request"; the ledger shows each hit with the original tokens, cost 0 and the saved cost.
"""

import asyncio
import time
import uuid

import httpx
import orjson
import pytest

from conftest import Clock, eventually, fake_upstream, ledger_rows, wait_ledger

pytestmark = pytest.mark.store
PRICE_IN, PRICE_OUT = 1.0, 2.0
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def upstream():
    """The fake OpenAI upstream; a small delay between stream events lets a client hang up mid-stream."""
    with fake_upstream("--latency-ms", "20", "--chunk-delay-ms", "15") as root:
        yield root


@pytest.fixture(scope="module")
def config(upstream, tmp_path_factory):
    models = "".join(f"""
  - alias: {alias}
    provider: openai_compatible
    model: gpt-fake
    base_url: {upstream}/v1
    input_price_per_1m: {PRICE_IN}
    output_price_per_1m: {PRICE_OUT}""" for alias in ("plain", "exact", "semantic", "short"))
    path = tmp_path_factory.mktemp("cfg") / "keel.yaml"
    path.write_text(f"""
models:{models}
aliases:
  exact: {{cache: {{mode: exact}}}}
  semantic: {{cache: {{mode: semantic, similarity_threshold: 0.85, embedding_alias: local-embed}}}}
  short: {{cache: {{mode: exact, ttl_s: 1}}}}
ledger_flush_interval_s: 0.05
""")
    return path


@pytest.fixture(scope="module")
def srv(module_server_factory, config):
    return module_server_factory(config=config, KEEL_EMBEDDED_MODELS="true")


def upstream_calls(upstream) -> int:
    return httpx.get(upstream + "/_stats").json()["paths"].get("/v1/chat/completions", 0)


def chat(srv, content, key=None, model="exact", **kw) -> httpx.Response:
    messages = content if isinstance(content, list) else [{"role": "user", "content": content}]
    r = httpx.post(srv.url + "/v1/chat/completions", json={"model": model, "messages": messages, **kw},
                   headers={"Authorization": f"Bearer {key or srv.admin_key}"}, timeout=30)
    assert r.status_code == 200, r.text
    return r


def hit(r) -> bool:
    return r.headers.get("x-keel-cache") == "hit"


def stream_chat(srv, content, model="exact", **kw) -> tuple[httpx.Headers, list[dict]]:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "stream": True, **kw}
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {srv.admin_key}"}) as r:
        assert r.status_code == 200
        events = [orjson.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        return r.headers, events


def text_of(events) -> str:
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices"))


def row(srv, response, timeout=10):
    rid = response.headers["x-request-id"] if hasattr(response, "headers") else response["x-request-id"]
    return wait_ledger(srv.extra["db_url"], f"request_id = '{rid}'", timeout=timeout)[0]


def unique(prefix="q") -> str:
    return f"{prefix} {uuid.uuid4().hex[:8]}"


def team_key(srv, team: str, models: list[str] | None = None) -> str:
    with srv.admin() as admin:
        assert admin.post("/admin/teams", json={"name": team}).status_code == 201
        r = admin.post("/admin/keys", json={"role": "member", "team": team, "name": f"{team}-key",
                                            "scopes": {"models": models}})
        assert r.status_code == 201, r.text
        return r.json()["key"]


# -- exact ------------------------------------------------------------------------------------------------

def test_exact_hit_metered_with_zero_cost_and_saved_cost(srv, upstream):
    """The second identical temperature-0 request is answered without an upstream call."""
    q, before = unique(), upstream_calls(upstream)
    first = chat(srv, q, temperature=0)
    second = chat(srv, q, temperature=0)
    assert upstream_calls(upstream) == before + 1
    assert not hit(first) and hit(second)
    a, b = first.json(), second.json()
    assert b["choices"] == a["choices"] and b["usage"] == a["usage"] and b["object"] == "chat.completion"
    assert b["id"] != a["id"] and "x-keel-deployment" not in second.headers
    r1, r2 = row(srv, first), row(srv, second)
    assert not r1.cache_hit and r1.saved_cost == 0
    assert r1.cost == pytest.approx((r1.tokens_in * PRICE_IN + r1.tokens_out * PRICE_OUT) / 1e6) and r1.cost > 0
    assert r2.cache_hit and r2.cost == 0 and r2.saved_cost == pytest.approx(r1.cost)
    assert (r2.tokens_in, r2.tokens_out) == (r1.tokens_in, r1.tokens_out) and r2.status == "ok"


def test_temperature_above_zero_not_cached_unless_forced(srv, upstream):
    q, before = unique(), upstream_calls(upstream)
    assert not hit(chat(srv, q, temperature=0.7)) and not hit(chat(srv, q, temperature=0.7))
    assert not hit(chat(srv, q))  # no temperature = the model's default, not 0
    assert upstream_calls(upstream) == before + 3
    chat(srv, q, temperature=0.7, keel={"cache": "force"})
    assert hit(chat(srv, q, temperature=0.7, keel={"cache": "force"}))
    assert upstream_calls(upstream) == before + 4


def test_per_request_opt_in_and_opt_out(srv, upstream):
    q, before = unique(), upstream_calls(upstream)
    chat(srv, q, model="plain", temperature=0)
    assert not hit(chat(srv, q, model="plain", temperature=0))  # alias has no cache
    chat(srv, q, model="plain", temperature=0, keel={"cache": "exact"})
    assert hit(chat(srv, q, model="plain", temperature=0, keel={"cache": "exact"}))
    chat(srv, q, temperature=0, keel={"cache": "off"})
    assert not hit(chat(srv, q, temperature=0, keel={"cache": "off"}))
    assert upstream_calls(upstream) == before + 5
    r = httpx.post(srv.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {srv.admin_key}"},
                   json={"model": "exact", "messages": [{"role": "user", "content": q}], "keel": {"cache": "yes"}})
    assert r.status_code == 422 and "keel.cache" in r.json()["detail"]  # checked with the body's shape


def test_tools_not_cached_unless_forced_then_tool_call_replayed(srv, upstream):
    q, before = unique("weather in Paris"), upstream_calls(upstream)
    chat(srv, q, temperature=0, tools=TOOLS)
    assert not hit(chat(srv, q, temperature=0, tools=TOOLS))
    assert upstream_calls(upstream) == before + 2
    first = chat(srv, q, temperature=0, tools=TOOLS, keel={"cache": "force"})
    second = chat(srv, q, temperature=0, tools=TOOLS, keel={"cache": "force"})
    assert hit(second) and upstream_calls(upstream) == before + 3
    assert second.json()["choices"][0]["message"]["tool_calls"] == first.json()["choices"][0]["message"]["tool_calls"]
    assert second.json()["choices"][0]["finish_reason"] == "tool_calls"


def test_ttl_expiry(srv, upstream):
    q, before = unique(), upstream_calls(upstream)
    chat(srv, q, model="short", temperature=0)
    assert hit(chat(srv, q, model="short", temperature=0))
    eventually(lambda: not hit(chat(srv, q, model="short", temperature=0)), timeout=5)  # hits until ttl_s: 1 ends
    assert upstream_calls(upstream) == before + 2


def test_invalidation_by_alias(srv, upstream):
    """Admin-only; drops one alias's entries, and answers made after it are cached again."""
    q = unique()
    chat(srv, q, temperature=0)
    chat(srv, q, model="plain", temperature=0, keel={"cache": "exact"})
    member = team_key(srv, unique("inv-team").replace(" ", "-"))
    denied = httpx.delete(srv.url + "/admin/cache/exact", headers={"Authorization": f"Bearer {member}"})
    assert denied.status_code == 403
    with srv.admin() as admin:
        r = admin.delete("/admin/cache/exact")
    assert r.status_code == 200 and r.json()["alias"] == "exact" and r.json()["deleted"] >= 1
    before = upstream_calls(upstream)
    assert hit(chat(srv, q, model="plain", temperature=0, keel={"cache": "exact"}))  # other aliases keep theirs
    assert not hit(chat(srv, q, temperature=0))
    assert hit(chat(srv, q, temperature=0))  # the fresh answer was stored again
    assert upstream_calls(upstream) == before + 1


def test_a_sync_keeps_our_own_invalidation_and_drops_memory_another_replica_invalidated(db_url):
    """Regression guard for the sync every SYNC_S (on the cache store's clock, injected here): it must not take
    this process's own invalidation for a new one (an answer filed after it would be dropped), and it must drop
    what memory holds of an alias another replica invalidated."""
    from keel.core.db import Store
    from keel.gateway.cache.store import CacheStore, Entry

    store = Store.open(db_url)
    store.upgrade()
    clock = Clock()

    def entry(eid: str) -> Entry:
        return Entry(eid, "exact", {"content": eid}, 0.5, time.time() + 600)

    async def body() -> None:
        here, there = CacheStore(store, clock=clock), CacheStore(store, clock=clock)
        await here.put(entry("e1"), kind="exact", scope="s")
        assert await here.get_exact("e1", "exact") is not None  # the first lookup reads the generations
        await here.invalidate("exact")
        gen = here.generation("exact")
        clock.now += CacheStore.SYNC_S  # the next lookup syncs
        assert await here.get_exact("e1", "exact") is None
        assert here.generation("exact") == gen  # our own invalidation: not forgotten again
        await here.put(entry("e2"), kind="exact", scope="s", generation=gen)
        assert "e2" in here._exact  # filed and remembered

        await there.invalidate("exact")  # another replica
        clock.now += CacheStore.SYNC_S / 2
        assert (await here.get_exact("e2", "exact")).id == "e2"  # from memory until the next sync
        clock.now += CacheStore.SYNC_S / 2
        assert await here.get_exact("e2", "exact") is None
        assert here.generation("exact") == gen + 1 and "e2" not in here._exact

    try:
        asyncio.run(body())
    finally:
        store.dispose()


# -- streams ----------------------------------------------------------------------------------------------

def test_streaming_hit_replays_content_and_usage(srv, upstream):
    q, before = unique(), upstream_calls(upstream)
    h1, first = stream_chat(srv, q, temperature=0, stream_options={"include_usage": True})
    h2, second = stream_chat(srv, q, temperature=0, stream_options={"include_usage": True})
    assert upstream_calls(upstream) == before + 1
    assert h1.get("x-keel-cache") is None and h2["x-keel-cache"] == "hit"
    assert text_of(second) == text_of(first) and len(text_of(first)) > 10
    assert 2 < len(second) < len(first)  # a few chunks, not one per token
    assert second[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [e["choices"][0]["finish_reason"] for e in second if e.get("choices")][-1] == "stop"
    assert second[-1]["usage"] == first[-1]["usage"] and second[-1]["usage"]["total_tokens"] > 0
    r1, r2 = row(srv, h1), row(srv, h2)
    assert r2.cache_hit and r2.stream and r2.cost == 0 and r1.cost > 0 and r2.saved_cost == pytest.approx(r1.cost)
    again = chat(srv, q, temperature=0)  # a stored stream answers a non-streaming request too
    assert hit(again) and again.json()["choices"][0]["message"]["content"] == text_of(first)


@pytest.mark.parametrize("fault", ["reset", "error-event", "no-done"])
def test_stream_cut_by_upstream_is_not_stored(srv, upstream, fault):
    q, before = unique(), upstream_calls(upstream)
    httpx.post(upstream + "/_control", json={"fault": fault, "times": 1})
    with httpx.stream("POST", srv.url + "/v1/chat/completions", timeout=30,
                      headers={"Authorization": f"Bearer {srv.admin_key}"},
                      json={"model": "exact", "messages": [{"role": "user", "content": q}], "stream": True,
                            "temperature": 0}) as r:
        try:
            body = b"".join(r.iter_bytes())
        except httpx.HTTPError:
            body = b""
    assert b"data: [DONE]" not in body
    h, _ = stream_chat(srv, q, temperature=0)
    assert h.get("x-keel-cache") is None and upstream_calls(upstream) == before + 2
    assert stream_chat(srv, q, temperature=0)[0]["x-keel-cache"] == "hit"


def test_stream_client_hangs_up_is_not_stored(srv, upstream):
    q, before = unique(), upstream_calls(upstream)
    with httpx.stream("POST", srv.url + "/v1/chat/completions", timeout=30,
                      headers={"Authorization": f"Bearer {srv.admin_key}"},
                      json={"model": "exact", "messages": [{"role": "user", "content": q}], "stream": True,
                            "temperature": 0}) as r:
        next(r.iter_lines())  # one event, then hang up
        cut = r.headers["x-request-id"]
    eventually(lambda: srv.answered(cut))  # the server is done with the cut stream (stored it or not)
    assert not hit(chat(srv, q, temperature=0))
    assert upstream_calls(upstream) == before + 2


# -- semantic ---------------------------------------------------------------------------------------------

def _ask(srv, system, question, key=None, **kw):
    return chat(srv, [{"role": "system", "content": system}, {"role": "user", "content": question}],
                key=key, model="semantic", **kw)


def test_semantic_hit_on_paraphrase_miss_on_unrelated(srv, upstream):
    system, before = unique("You are a geography tutor."), upstream_calls(upstream)
    first = _ask(srv, system, "What is the capital of France?", temperature=0.3)
    para = _ask(srv, system, "Which city is the capital of France?", temperature=0.3)
    assert not hit(first) and hit(para)
    assert para.json()["choices"] == first.json()["choices"]
    assert upstream_calls(upstream) == before + 1
    assert not hit(_ask(srv, system, "How do I bake sourdough bread?"))
    assert not hit(_ask(srv, system, "What is the capital of Germany?"))
    assert not hit(_ask(srv, unique("You are a pirate."), "What is the capital of France?"))  # other system prompt
    assert upstream_calls(upstream) == before + 4
    r1, r2 = row(srv, first), row(srv, para)
    assert r2.cache_hit and r2.cost == 0 and r1.cost > 0 and r2.saved_cost == pytest.approx(r1.cost)
    embeds = ledger_rows(srv.extra["db_url"], f"request_id = '{para.headers['x-request-id']}:cache'")
    assert len(embeds) == 1 and embeds[0].kind == "embedding" and embeds[0].alias == "local-embed"


def test_semantic_never_crosses_teams(srv, upstream):
    system = unique("You answer questions about our product.")
    key_a, key_b = team_key(srv, unique("team-a").replace(" ", "-")), team_key(srv, unique("team-b").replace(" ", "-"))
    before = upstream_calls(upstream)
    assert not hit(_ask(srv, system, "How do I reset my password?", key=key_a))
    assert not hit(_ask(srv, system, "How do I reset my password?", key=key_b))
    assert upstream_calls(upstream) == before + 2
    assert hit(_ask(srv, system, "How can I reset my password?", key=key_b))
    assert hit(_ask(srv, system, "How can I reset my password?", key=key_a))
    assert upstream_calls(upstream) == before + 2


def test_semantic_works_for_a_key_scoped_to_the_chat_model_only(srv, upstream):
    """Regression guard: the cache's own embedding call must not be refused by the key's model scope."""
    key = team_key(srv, unique("scoped").replace(" ", "-"), models=["semantic"])
    system, before = unique("Cooking helper."), upstream_calls(upstream)
    assert not hit(_ask(srv, system, "How long should I boil an egg?", key=key))
    assert hit(_ask(srv, system, "How long do I boil an egg for?", key=key))
    assert upstream_calls(upstream) == before + 1


def test_semantic_never_with_tools(srv, upstream):
    system, before = unique("Weather bot."), upstream_calls(upstream)
    for _ in range(2):
        assert not hit(_ask(srv, system, "What's the weather in Paris?", tools=TOOLS))
    assert upstream_calls(upstream) == before + 2


# -- replicas ---------------------------------------------------------------------------------------------

def test_replicas_share_entries_and_invalidation(srv, upstream, module_server_factory, config):
    """Two servers on one store: an answer stored by one is a hit on the other (exact and semantic);
    invalidating on one empties the other's memory within a second."""
    other = module_server_factory(config=config, db_url=srv.extra["db_url"], KEEL_EMBEDDED_MODELS="true")
    q, before = unique(), upstream_calls(upstream)
    chat(srv, q, model="plain", temperature=0, keel={"cache": "exact"})
    assert hit(chat(other, q, model="plain", temperature=0, keel={"cache": "exact"}))
    assert hit(chat(other, q, model="plain", temperature=0, keel={"cache": "exact"}))  # now from its memory
    with srv.admin() as admin:
        assert admin.delete("/admin/cache/plain").status_code == 200
    eventually(lambda: not hit(chat(other, q, model="plain", temperature=0, keel={"cache": "exact"})), timeout=5)
    assert upstream_calls(upstream) == before + 2
    system = unique("You are a geography tutor.")
    assert not hit(_ask(srv, system, "What is the capital of Italy?"))
    assert hit(_ask(other, system, "Which city is the capital of Italy?"))
    assert upstream_calls(upstream) == before + 3
