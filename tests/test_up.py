"""`keel up`: embedded defaults, prints the URL and — on first start only — the admin key."""

import os
import re
import signal
import subprocess
import sys

import httpx

from conftest import eventually, free_port


def _up(tmp_path, port):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEEL_")}
    env.update({"KEEL_DATA_DIR": str(tmp_path / ".keel"), "PYTHONUNBUFFERED": "1"})
    return subprocess.Popen([sys.executable, "-m", "keel", "up", "--port", str(port)], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def _wait_ready(url, timeout=60):
    """Until /readyz answers 200 (fails after `timeout` seconds)."""
    eventually(lambda: httpx.get(url + "/readyz", timeout=1).status_code == 200, timeout=timeout, interval=0.2,
               retry=(httpx.HTTPError,))


def _stop(proc):
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    return proc.returncode, out


def _lead_intake_end_to_end(url, headers):
    """The demo workflow with the bundled model: enrich → summarise → CRM → notify sales → draft →
    a reviewer edits and approves → the edited email is what is sent."""
    lead = {"company": "Acme Logistics", "contact": "Ana", "email": "ana@acme-logistics.example",
            "message": "We want to automate customs paperwork."}
    r = httpx.post(url + "/v1/workflows/lead_intake/runs", json={"inputs": lead}, headers=headers)
    assert r.status_code == 201, r.text
    run_id = r.json()["id"]

    def run_in(*statuses):
        run = httpx.get(url + f"/v1/workflows/lead_intake/runs/{run_id}", headers=headers).json()
        return run if run["status"] in statuses else None
    run = eventually(lambda: run_in("waiting_approval", "failed"), timeout=240, interval=0.5)
    assert run["status"] == "waiting_approval", run
    steps = {s["id"]: s for s in run["steps"]}
    assert "Acme Logistics" in steps["enrich"]["output"]["hits"][0]["text"]
    assert steps["summary"]["output"]["text"].strip() and steps["draft"]["output"]["text"].strip()
    assert run["usage"]["calls"] >= 2 and run["usage"]["completion_tokens"] > 0
    approval = f"apr_{run_id}.review"
    r = httpx.post(url + f"/v1/approvals/{approval}/approve", headers=headers,
                   json={"edits": {"draft": "Hi Ana, thanks for reaching out. Talk soon!"}, "reason": "tone"})
    assert r.status_code == 200, r.text
    run = eventually(lambda: run_in("completed", "failed"), timeout=120, interval=0.3)
    assert run["status"] == "completed", run
    crm = httpx.get(url + "/v1/records/crm_leads", headers=headers).json()["data"]
    assert [c["data"]["company"] for c in crm if c["run_id"] == run_id] == ["Acme Logistics"]
    mail = httpx.get(url + f"/v1/outbox?run_id={run_id}", headers=headers).json()["data"]
    assert sorted(m["to"] for m in mail) == ["ana@acme-logistics.example", "sales@example.com"]
    sent = [m for m in mail if m["to"] == "ana@acme-logistics.example"][0]
    assert sent["body"] == "Hi Ana, thanks for reaching out. Talk soon!"


def test_up_prints_url_and_key_once_then_serves_models_and_demo_data(tmp_path):
    port = free_port()
    proc = _up(tmp_path, port)
    url = f"http://127.0.0.1:{port}"
    _wait_ready(url)
    assert (tmp_path / ".keel" / "keel.db").exists()
    lines = []
    while not any("sk-keel-" in line for line in lines):
        lines.append(proc.stdout.readline())
    key = re.search(r"sk-keel-\S+", "".join(lines)).group(0)
    assert any(url in line for line in lines)
    headers = {"Authorization": f"Bearer {key}"}

    def demo_data():  # three collections (the support agent's handbook too), ingested in the background
        colls = httpx.get(url + "/v1/collections", headers=headers).json()["data"]
        docs = [d for c in colls
                for d in httpx.get(url + f"/v1/collections/{c['id']}/documents", headers=headers).json()["data"]]
        return (colls, docs) if len(docs) >= 8 else None
    colls, docs = eventually(demo_data, timeout=90, interval=0.5)
    assert sorted(c["name"] for c in colls) == ["companies", "handbook", "support-handbook"] and len(docs) == 8
    _lead_intake_end_to_end(url, headers)
    rc, _ = _stop(proc)
    assert rc == 0
    port2 = free_port()
    proc = _up(tmp_path, port2)
    url2 = f"http://127.0.0.1:{port2}"
    _wait_ready(url2)
    models = httpx.get(url2 + "/v1/models", headers={"Authorization": f"Bearer {key}"}).json()
    assert {"local-chat", "local-embed"} <= {m["id"] for m in models["data"]}
    rc, out = _stop(proc)
    assert rc == 0 and "sk-keel-" not in out
