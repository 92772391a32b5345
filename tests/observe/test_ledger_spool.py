"""A server killed before its ledger's flush loses no metered call: each row is spooled to the data dir as it is
recorded, and the next server on the same data dir writes what the killed one had not (once: a row already
written is not counted again, in the ledger or its rollups). Real servers, SIGKILL, SQLite or PostgreSQL."""

from __future__ import annotations

import signal

import httpx
import pytest

from conftest import eventually, ledger_rows, wait_ledger
from tests.fakes.openai_upstream import FakeOpenAI

pytestmark = pytest.mark.store


@pytest.fixture
def upstream():
    fake = FakeOpenAI(reply="one two three").start()
    yield fake
    fake.stop()


def config(tmp_path, upstream: str, flush_s: float):
    path = tmp_path / f"keel-{flush_s}.yaml"
    path.write_text(f"""
models:
  - {{alias: cloud, provider: openai_compatible, model: gpt-cloud, id: cloud/remote, base_url: {upstream},
      input_price_per_1m: 3.0, output_price_per_1m: 7.0}}
ledger_flush_interval_s: {flush_s}
""")
    return path


def chat(srv) -> str:
    r = httpx.post(srv.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {srv.admin_key}"}, timeout=30,
                   json={"model": "cloud", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    return r.headers["x-request-id"]


def test_a_killed_server_loses_no_metered_call_and_counts_none_twice(server_factory, tmp_path, upstream, db_url):
    data = tmp_path / "data"
    first = server_factory(config=config(tmp_path, upstream.url, 0.05), data_dir=data)
    written = chat(first)
    wait_ledger(db_url, f"request_id = '{written}'")  # in the store; its spool segment may still be there
    first.stop(signal.SIGKILL)
    slow = server_factory(config=config(tmp_path, upstream.url, 3600), data_dir=data)  # flushes only at stop
    answered = [chat(slow) for _ in range(5)]
    assert ledger_rows(db_url, "request_id IN ({})".format(", ".join(f"'{r}'" for r in answered))) == []
    slow.stop(signal.SIGKILL)  # five answered calls, none in the store
    third = server_factory(config=config(tmp_path, upstream.url, 0.05), data_dir=data)
    rows = wait_ledger(db_url, "request_id IN ({})".format(", ".join(f"'{r}'" for r in [written, *answered])), n=6)
    assert sorted(r.request_id for r in rows) == sorted([written, *answered])
    assert all(r.tokens_in > 0 and r.cost > 0 for r in rows)

    def reported() -> dict | None:  # the rollups agree: six calls, the one written before the kill counted once
        with third.admin() as c:
            rep = c.get("/v1/usage", params={"group_by": "model", "start": "2000-01-01"}).json()
        return rep if rep["totals"]["requests"] == 6 else None

    assert eventually(reported, timeout=30)["totals"]["requests"] == 6
    assert len(ledger_rows(db_url)) == 6
    third.stop()
    assert [p.name for p in (data / "spool" / "ledger").iterdir()] == []  # a clean stop leaves no segment
