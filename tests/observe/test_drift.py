"""Drift: the tests behind each signal (their p-values against textbook cases, and their false-alarm rate on
unshifted samples), and live: a latency shift on real traffic fires the latency signal, which shows in
`GET /v1/drift` and `keel drift`, is written to the audit log and POSTed to the webhook."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import eventually, problem
from keel.observe.drift import DriftMonitor, ks_2samp, mmd_permutation, two_proportion_z
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.receiver import Receiver


def test_ks_matches_the_textbook_cases():
    rng = np.random.default_rng(1)
    same = rng.normal(size=400)
    d, p = ks_2samp(same, same)
    assert d == 0 and p == 1.0
    d, p = ks_2samp(rng.normal(size=300), rng.normal(0.5, 1, size=300))
    en = math.sqrt(300 * 300 / 600)  # Q_KS(λ) ≈ 2·exp(-2λ²) this far in the tail
    assert abs(d - 0.17) < 1e-9 and abs(p - 2 * math.exp(-2 * ((en + 0.12 + 0.11 / en) * d) ** 2)) < 1e-6
    d, p = ks_2samp([1, 2, 3], [10, 11, 12])  # disjoint: D = 1
    assert d == 1.0 and p < 0.1


def test_two_proportion_z_matches_a_hand_computation():
    z, p = two_proportion_z(10, 100, 25, 100)  # pooled 0.175, se = sqrt(.175*.825*.02) = 0.05374
    assert abs(z - 0.15 / math.sqrt(0.175 * 0.825 * 0.02)) < 1e-9 and abs(p - math.erfc(abs(z) / math.sqrt(2))) < 1e-12
    assert two_proportion_z(0, 50, 0, 50) == (0.0, 1.0)


def test_mmd_separates_shifted_embeddings_and_keeps_its_false_alarm_rate():
    rng = np.random.default_rng(2)
    base = rng.normal(size=(60, 16))
    _, p = mmd_permutation(base[:30], base[30:] + 0.8, 200, rng)
    assert p < 0.01
    alarms = sum(mmd_permutation(rng.normal(size=(40, 8)), rng.normal(size=(40, 8)), 100, rng)[1] < 0.05
                 for _ in range(60))
    assert alarms <= 9  # 5% of 60 is 3; binomial tail well under 1e-3 past 9


def test_the_monitor_warms_up_then_sees_a_rate_change():
    mon = DriftMonitor(window=50, reference=100)
    for _ in range(20):
        mon.observe_retrieval(None, None, 3)
    status = {s["signal"]: s for s in mon.check(track=True)}
    assert status["no_answer_rate"]["status"] == "warming_up"
    for i in range(130):
        mon.observe_retrieval(None, None, 3 if i % 10 else 0)  # 10% no-answer
    assert {s["signal"]: s for s in mon.check(track=True)}["no_answer_rate"]["status"] == "ok"
    for i in range(50):
        mon.observe_retrieval(None, None, 0 if i % 2 else 3)  # 50% no-answer
    s = {s["signal"]: s for s in mon.check(track=True)}["no_answer_rate"]
    assert s["status"] == "drift" and s["new"] and s["recent_rate"] == 0.5 and s["reference_rate"] < 0.2
    again = {s["signal"]: s for s in mon.check(track=True)}["no_answer_rate"]
    assert again["status"] == "drift" and not again["new"]  # alerted once per onset


@pytest.mark.store
def test_a_latency_shift_alerts_the_webhook_and_the_audit_log(server_factory, tmp_path):
    with FakeOpenAI() as fake, Receiver() as hook:
        cfg = tmp_path / "keel.yaml"
        cfg.write_text(f"models:\n  - {{alias: fake, provider: openai_compatible, model: m, base_url: {fake.url}}}\n"
                       "ledger_flush_interval_s: 0.05\n")
        srv = server_factory(config=cfg, KEEL_DRIFT_INTERVAL_S="0.2", KEEL_DRIFT_WINDOW="30",
                             KEEL_DRIFT_REFERENCE="30", KEEL_DRIFT_WEBHOOK_URL=hook.url + "/drift")
        body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        with srv.admin() as admin:
            for _ in range(30):
                assert admin.post("/v1/chat/completions", json=body).status_code == 200
            fake.latency = 0.15
            for _ in range(30):
                assert admin.post("/v1/chat/completions", json=body).status_code == 200

            def latency_alert():
                return [r for r in list(hook.log) if (r["body"] or {}).get("signal") == "latency_ms"] or None
            sent = eventually(latency_alert, timeout=30)[0]["body"]
            assert sent["type"] == "drift.detected" and sent["p_value"] < 0.01
            assert sent["recent_median"] > sent["reference_median"] + 100
            drift = {s["signal"]: s for s in admin.get("/v1/drift").json()["signals"]}
            assert drift["latency_ms"]["status"] == "drift" and drift["latency_ms"]["test"].startswith("two-sample")
            assert drift["query_embedding"]["status"] == "warming_up"
            from typer.testing import CliRunner

            from keel.cli import app
            shown = CliRunner().invoke(app, ["drift"], env={"KEEL_URL": srv.url, "KEEL_API_KEY": srv.admin_key})
            assert shown.exit_code == 0 and "latency_ms" in shown.output and "drift in latency_ms" in shown.output
            audit = admin.get("/v1/audit", params={"limit": 50}).json()["data"]
            assert any(e["action"] == "drift.detected" and e["details"]["signal"] == "latency_ms" for e in audit)
        admin_key = srv.admin_key
        with srv.client(admin_key) as c:
            member = c.post("/admin/keys", json={"role": "member", "name": "m"}).json()["key"]
        with srv.client(member) as m:
            assert problem(m.get("/v1/drift"), 403)["code"] == "forbidden"
