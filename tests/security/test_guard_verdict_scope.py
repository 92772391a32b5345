"""The guards' clean-verdict cache (keel/governance/guards/verdicts.py) skips the scan of a text already found
clean. Shared across teams, that skip is a timing oracle: a long text answers tens of milliseconds sooner when
any other team sent exactly it, so a key of team B could test whether team A pasted a given document. Verdicts
are kept per team (per key for a key without a team): B's first send of A's text is scanned in full.

Observed through the traces (each scan is a `guard <name>` span; the caller's `traceparent` names the trace)."""

from __future__ import annotations

import secrets

import httpx
import orjson
import pytest

from conftest import eventually
from tests.fakes.openai_upstream import FakeOpenAI

pytestmark = pytest.mark.store

POLICY = """
name: verdict-scope
guards:
  input:  {pii: redact, secrets: block}
  output: {pii: allow}
"""
TEXT = "The quarterly plan for project Falcon covers hiring, vendors and the budget review. " * 40


@pytest.fixture(scope="module")
def world(module_server_factory, tmp_path_factory):
    fake = FakeOpenAI(reply="Noted.").start()
    base = tmp_path_factory.mktemp("verdicts")
    (base / "policy.yaml").write_text(POLICY)
    (base / "keel.yaml").write_text(
        f"models:\n  - {{alias: up, provider: openai_compatible, model: m, id: up/one, base_url: {fake.url}}}\n")
    srv = module_server_factory(config=base / "keel.yaml", KEEL_POLICY_FILE=str(base / "policy.yaml"),
                                KEEL_TRACE_EXPORTER="jsonl")
    keys = {}
    with srv.admin() as a:
        for team in ("red", "blue"):
            assert a.post("/admin/teams", json={"name": team}).status_code in (201, 409)
            keys[team] = a.post("/admin/keys", json={"role": "builder", "team": team, "name": team}).json()["key"]
        keys["none"] = a.post("/admin/keys", json={"role": "builder", "name": "no-team"}).json()["key"]
    yield srv, keys
    fake.stop()


def _chat(srv, key: str, text: str) -> str:
    """Send `text` under a fresh trace id; returns the trace id."""
    trace = secrets.token_hex(16)
    r = httpx.post(srv.url + "/v1/chat/completions", timeout=60,
                   json={"model": "up", "messages": [{"role": "user", "content": text}]},
                   headers={"Authorization": f"Bearer {key}", "traceparent": f"00-{trace}-{secrets.token_hex(8)}-01"})
    assert r.status_code == 200, r.text
    return trace


def _scans(srv, trace: str) -> list[str]:
    """The guard-scan spans of `trace`, once its request span is exported."""
    path = srv.data_dir / "traces.jsonl"

    def spans() -> list[dict]:
        rows = [orjson.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        mine = [s for s in rows if s["trace_id"] == trace]
        assert any(s["name"].startswith("POST") or s["name"].startswith("chat") for s in mine), len(mine)
        return mine
    return sorted(s["name"] for s in eventually(spans, timeout=30) if s["name"].startswith("guard "))


def test_a_clean_verdict_is_not_shared_across_teams(world):
    """Guards: one team's clean verdict skipping the scan for another team's identical text (a timing oracle)."""
    srv, keys = world
    text = TEXT + secrets.token_hex(8)
    assert _scans(srv, _chat(srv, keys["red"], text))  # red's first send: scanned
    assert not _scans(srv, _chat(srv, keys["red"], text))  # red again: its own verdict, no scan (the cache works)
    assert _scans(srv, _chat(srv, keys["blue"], text))  # blue's first send of the same text: scanned in full
    assert _scans(srv, _chat(srv, keys["none"], text))  # a key without a team: its own verdicts too
