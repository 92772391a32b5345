"""Rate limits through the real server against the loopback fake upstream: per key, team and deployment,
requests and tokens per minute, one limit shared by two `keel serve` processes on one database, and the
429 problem that names the limit."""

from __future__ import annotations

import asyncio
import os

import httpx
import pytest

from conftest import fake_upstream, ledger_rows

pytestmark = pytest.mark.store


@pytest.fixture
def upstream():
    with fake_upstream("--latency-ms", "20") as root:
        yield root + "/v1"


def write_config(tmp_path, base_url, extra: str = ""):
    cfg = tmp_path / "keel.yaml"
    cfg.write_text(f"""
models:
  - alias: fake
    provider: openai_compatible
    model: gpt-fake
    base_url: {base_url}
    input_price_per_1m: 1.0
    output_price_per_1m: 2.0
{extra}
ledger_flush_interval_s: 0.2
""")
    return cfg


def new_key(srv, **kw) -> dict:
    r = srv.admin().post("/admin/keys", json={"role": "member", "name": "rl", **kw})
    assert r.status_code == 201, r.text
    return r.json()


def chat(url: str, key: str, **kw) -> httpx.Response:
    body = {"model": "fake", "messages": [{"role": "user", "content": "hello"}], **kw}
    return httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)


async def burst(url: str, key: str, n: int, concurrency: int) -> list[int]:
    sem = asyncio.Semaphore(concurrency)
    body = {"model": "fake", "messages": [{"role": "user", "content": "hello"}]}
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
        async def one() -> int:
            async with sem:
                return (await client.post("/v1/chat/completions", json=body)).status_code
        return await asyncio.gather(*(one() for _ in range(n)))


def test_key_rpm_429_names_the_limit_and_says_when_it_resets(one_window, upstream, tmp_path):
    """Regression guard: the 429 carries retry-after and a problem body naming scope, id, metric, value, reset."""
    def scenario(start, minute) -> None:
        srv = start(config=write_config(tmp_path, upstream))
        key = new_key(srv)
        r = srv.admin().put(f"/admin/limits/keys/{key['id']}", json={"rpm": 3})
        assert r.status_code == 200 and r.json()["rpm"] == 3
        minute.begin()
        codes = [chat(srv.url, key["key"]).status_code for _ in range(3)]
        assert codes == [200, 200, 200]
        r = chat(srv.url, key["key"])
        assert r.status_code == 429
        assert r.headers["content-type"].startswith("application/problem+json")
        retry = int(r.headers["retry-after"])
        assert 1 <= retry <= 60
        body = r.json()
        assert body["code"] == "rate_limited"
        assert body["limit"] == {"scope": "key", "id": key["id"], "metric": "rpm", "value": 3, "window_s": 60,
                                 "resets_at": body["limit"]["resets_at"], "retry_after_s": retry}
        assert key["id"] in body["detail"] and "3 requests per minute" in body["detail"]
        assert f"/admin/limits/keys/{key['id']}" in body["fix"]
        assert body["error"]["code"] == "rate_limited"  # what OpenAI SDKs show

        # Removing the limit takes effect at once in this replica.
        assert srv.admin().delete(f"/admin/limits/keys/{key['id']}").status_code == 204
        assert chat(srv.url, key["key"]).status_code == 200
        srv.stop()
        refused = [row for row in ledger_rows(srv.extra["db_url"]) if row.error_code == "rate_limited"]
        assert len(refused) == 1 and refused[0].http_status == 429 and refused[0].cost == 0

    one_window(scenario)


def test_tpm_counts_the_prompt_up_front_and_real_usage_after(one_window, upstream, tmp_path):
    """Tokens/min: a request is admitted while the real tokens of earlier ones leave room for its prompt."""
    def scenario(start, minute) -> None:
        srv = start(config=write_config(tmp_path, upstream))
        key = new_key(srv)
        assert srv.admin().put(f"/admin/limits/keys/{key['id']}", json={"tpm": 100}).status_code == 200
        minute.begin()
        used: list[int] = []
        for _ in range(20):
            r = chat(srv.url, key["key"])
            if r.status_code != 200:
                break
            used.append(r.json()["usage"]["total_tokens"])
        assert r.status_code == 429 and r.json()["limit"]["metric"] == "tpm"
        # Keel estimates the prompt "hello" at 9 tokens. A request was admitted while the real usage so far
        # plus its prompt fitted the limit, and refused once it did not.
        assert len(used) >= 2
        assert sum(used[:-1]) + 9 <= 100 < sum(used) + 9, used

    one_window(scenario)


def test_team_limit_is_shared_by_its_keys_and_deployment_limit_guards_the_upstream(one_window, upstream, tmp_path):
    def scenario(start, minute) -> None:
        srv = start(config=write_config(tmp_path, upstream, "    rpm: 5\n"))
        admin = srv.admin()
        assert admin.post("/admin/teams", json={"name": "growth"}).status_code == 201
        a, b = new_key(srv, team="growth"), new_key(srv, team="growth")
        r = admin.put("/admin/limits/teams/growth", json={"rpm": 3})  # by name
        assert r.status_code == 200 and r.json()["id"].startswith("team_")
        other = new_key(srv)
        minute.begin()
        codes = [chat(srv.url, k["key"]).status_code for k in (a, b, a, b)]
        assert codes == [200, 200, 200, 429]
        # The deployment allows 5 a minute: 3 used by the team, 2 left for anyone else.
        codes = [chat(srv.url, other["key"]).status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        r = chat(srv.url, other["key"])
        assert r.json()["limit"]["scope"] == "deployment"
        assert r.json()["limit"]["id"] == "fake/openai_compatible/gpt-fake"
        listing = admin.get("/admin/limits").json()["data"]
        assert {(x["scope"], x["rpm"]) for x in listing} == {("team", 3), ("deployment", 5)}

    one_window(scenario)


def test_a_rate_limited_deployment_fails_over_to_another_of_the_alias(one_window, upstream, tmp_path):
    """Guards upstream protection without lost requests: when one deployment of an alias reaches its rpm,
    the router sends the request to another deployment instead of answering 429; only when every
    deployment is at its limit does the caller get the 429 naming one, with Retry-After."""
    second = f"""  - alias: fake
    provider: openai_compatible
    model: gpt-fake-b
    base_url: {upstream}
    rpm: 2
"""

    def scenario(start, minute) -> None:
        srv = start(config=write_config(tmp_path, upstream, "    rpm: 2\n" + second))
        key = new_key(srv)
        minute.begin()
        served = []
        for _ in range(4):
            r = chat(srv.url, key["key"])
            assert r.status_code == 200, r.text
            served.append(r.headers["x-keel-deployment"])
        assert sorted(served) == ["fake/openai_compatible/gpt-fake"] * 2 + ["fake/openai_compatible/gpt-fake-b"] * 2
        r = chat(srv.url, key["key"])
        assert r.status_code == 429 and r.json()["limit"]["scope"] == "deployment" and "retry-after" in r.headers

    one_window(scenario)


def test_limit_admin_api_validation(server_factory, upstream, tmp_path):
    srv = server_factory(config=write_config(tmp_path, upstream))
    admin = srv.admin()
    key = new_key(srv)
    r = admin.put(f"/admin/limits/keys/{key['id']}", json={})
    assert r.status_code == 422 and "set `rpm`, `tpm` or both" in r.json()["detail"]
    r = admin.put(f"/admin/limits/keys/{key['id']}", json={"rpm": 0})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "rpm"
    r = admin.put(f"/admin/limits/keys/{key['id']}", json={"rpm": 5, "burst": 2})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "burst"
    r = admin.put("/admin/limits/keys/key_nope", json={"rpm": 5})
    assert r.status_code == 404 and "key_nope" in r.json()["detail"] and "GET /admin/keys" in r.json()["fix"]
    r = admin.put("/admin/limits/teams/nope", json={"rpm": 5})
    assert r.status_code == 404 and "nope" in r.json()["detail"]
    r = admin.put("/admin/limits/widgets/x", json={"rpm": 5})
    assert r.status_code == 404 and "/admin/limits/keys/" in r.json()["fix"]
    r = admin.put("/admin/limits/deployments/x", json={"rpm": 5})
    assert r.status_code == 400 and "keel.yaml" in r.json()["fix"]
    r = admin.get(f"/admin/limits/keys/{key['id']}")
    assert r.status_code == 404 and "has no rate limit" in r.json()["detail"]
    r = srv.client(key["key"]).put(f"/admin/limits/keys/{key['id']}", json={"rpm": 5})
    assert r.status_code == 403
    # The visible key prefix works as well as the id.
    r = admin.put(f"/admin/limits/keys/{key['prefix']}", json={"rpm": 5, "tpm": 1000})
    assert r.status_code == 200 and r.json()["id"] == key["id"]
    assert admin.get(f"/admin/limits/keys/{key['id']}").json()["tpm"] == 1000


def admit_across_two_replicas(one_window, cfg, env: dict[str, str], limit: int = 200, sent: int = 300) -> None:
    """Two `keel serve` processes on one database (counting in `env`'s way) share a key's rpm limit of `limit`:
    `sent` requests split over them admit 95-100% of it, every other one a 429."""
    def scenario(start, minute) -> None:
        one = start(config=cfg, data="one", **env)
        key = new_key(one)
        assert one.admin().put(f"/admin/limits/keys/{key['id']}", json={"rpm": limit}).status_code == 200
        two = start(config=cfg, data="two", **env)

        async def both() -> list[int]:
            a, b = await asyncio.gather(burst(one.url, key["key"], sent // 2, 16),
                                        burst(two.url, key["key"], sent // 2, 16))
            return a + b

        minute.begin()
        codes = asyncio.run(both())
        admitted = codes.count(200)
        assert set(codes) <= {200, 429}, codes
        assert limit * 0.95 <= admitted <= limit, admitted

    one_window(scenario)


@pytest.mark.parametrize("counting", ["store", "redis"])
def test_one_limit_across_two_server_processes(one_window, upstream, tmp_path, counting):
    """Two `keel serve` processes on one database (and optionally one Redis) admit, together, the limit
    (within 5%) — not twice it."""
    env = {}
    if counting == "redis":
        if not os.environ.get("KEEL_TEST_REDIS_URL"):
            pytest.skip("set KEEL_TEST_REDIS_URL (and install `redis`) to count in Redis")
        env["KEEL_REDIS_URL"] = os.environ["KEEL_TEST_REDIS_URL"]
    admit_across_two_replicas(one_window, write_config(tmp_path, upstream), env)
