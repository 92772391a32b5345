"""`keel config export` / `keel config import`: a server's deployments, workflows, agents and policy become
files that carry no secret value, import into another server and export again identically; a bad file or a
refusal by the server leaves the target as it was."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, KeelServer

pytestmark = pytest.mark.store

SECRET = "sk-upstream-" + "s3cr3t" * 6
WORKFLOW = """\
name: {name}
steps:
  - id: draft
    type: transform
    output: "{text}"
"""
MANDATE = """\
name: {name}
model: cfg-chat
goal: {goal}
tools:
  notify: {{allow_recipients: ["*@acme.example"]}}
"""
STATIC = """\
models:
  - {alias: static-chat, provider: openai_compatible, model: m, id: zz-static, base_url: "http://127.0.0.1:9/v1"}
"""


def keel(srv: KeelServer, *args: str, key: str | None = None) -> subprocess.CompletedProcess:
    env = {**srv.env, "KEEL_URL": srv.url, "KEEL_API_KEY": key if key is not None else srv.admin_key,
           "COLUMNS": "400"}
    return subprocess.run([sys.executable, "-m", "keel", "config", *args], env=env, capture_output=True,
                          text=True, timeout=120, cwd=ROOT)


@pytest.fixture(scope="module")
def source(module_server_factory, tmp_path_factory) -> KeelServer:
    cfg = tmp_path_factory.mktemp("cfg") / "keel.yaml"
    cfg.write_text(STATIC)  # a keel.yaml deployment: not exported (the file is in git already), never overwritten
    srv = module_server_factory(config=cfg)
    with srv.admin() as c:
        for alias in ("cfg-chat", "cfg-other"):
            r = c.post("/admin/deployments", json={"alias": alias, "provider": "openai_compatible", "model": "m",
                                                   "base_url": "http://127.0.0.1:9/v1", "api_key": SECRET})
            assert r.status_code == 201, r.text
        assert c.post("/v1/workflows", json={"spec": WORKFLOW.format(name="cfg_flow", text="v1")}).status_code == 201
        assert c.post("/v1/agents", json={"spec": MANDATE.format(name="cfg_agent", goal="help")}).status_code == 201
    return srv


@pytest.fixture(scope="module")
def exported(source: KeelServer, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("export") / "config"
    out = keel(source, "export", str(dest))
    assert out.returncode == 0, out.stderr
    return dest


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "keel-config.json"}


def with_deployment(exported: Path, dest: Path, did: str, fields: str) -> Path:
    """A copy of `exported` at `dest` with one more deployment file, `did`, of `fields` plus a model and URL."""
    subprocess.run(["cp", "-r", str(exported), str(dest)], check=True)
    (dest / "deployments" / "zz.yaml").write_text(
        f"{fields}provider: openai_compatible\nmodel: m\nid: {did}\nbase_url: http://127.0.0.1:9/v1\n")
    index = json.loads((dest / "keel-config.json").read_text())
    index["files"]["deployments/zz.yaml"] = {"name": did}
    (dest / "keel-config.json").write_text(json.dumps(index))
    return dest


def test_export_holds_every_definition_and_no_secret_value(exported: Path) -> None:
    """Guards: a provider key (given as api_key, kept in the vault) leaking into files meant for git."""
    got = files(exported)
    assert {"workflows/cfg_flow.yaml", "agents/cfg_agent.yaml", "policy.yaml"} <= got.keys()
    assert sum(name.startswith("deployments/") for name in got) == 2
    for name, body in got.items():
        assert SECRET.encode() not in body and b"s3cr3t" not in body, name
    assert b"s3cr3t" not in (exported / "keel-config.json").read_bytes()
    dep = next(body for name, body in got.items() if name.startswith("deployments/cfg-chat"))
    assert b"credential: deployment-cfg-chat" in dep


def test_import_is_validated_whole_then_round_trips(exported: Path, module_server_factory, tmp_path: Path) -> None:
    """Guards: a half-applied import when one file of several is wrong; an export that another Keel cannot
    take back, or that changes on the way."""
    target = module_server_factory()
    bad = tmp_path / "bad"
    subprocess.run(["cp", "-r", str(exported), str(bad)], check=True)
    (bad / "workflows" / "cfg_flow.yaml").write_text(WORKFLOW.format(name="cfg_flow", text="v2"))
    (bad / "agents" / "cfg_agent.yaml").write_text(MANDATE.format(name="cfg_agent", goal="help") + "budgets: 7\n")
    out = keel(target, "import", str(bad))
    assert out.returncode == 1 and "agents/cfg_agent.yaml" in out.stderr and "nothing imported" in out.stderr, \
        out.stderr
    with target.admin() as c:
        assert c.get("/v1/workflows").json()["data"] == []
        assert [d for d in c.get("/admin/deployments").json()["data"] if d["source"] == "api"] == []
    not_export = keel(target, "import", str(tmp_path))
    assert not_export.returncode == 1 and "not a Keel config export" in not_export.stderr

    out = keel(target, "import", str(exported))
    assert out.returncode == 0, out.stderr
    assert "2 deployments, 1 workflows, 1 agents" in out.stdout
    again = keel(target, "export", str(tmp_path / "again"))
    assert again.returncode == 0, again.stderr
    assert files(tmp_path / "again") == files(exported)
    out = keel(target, "import", str(exported))
    assert out.returncode == 0 and "nothing changed" in out.stdout, out.stdout


def test_a_refusal_by_the_server_puts_back_what_changed(exported: Path, source: KeelServer, tmp_path: Path) -> None:
    """Guards: an import the server refuses midway (here: a deployment keel.yaml defines) leaving earlier
    definitions changed."""
    target = source
    edited = with_deployment(exported, tmp_path / "edited", "zz-static", "alias: static-chat\n")
    dep = next((edited / "deployments").glob("cfg-chat*"))
    dep.write_text(dep.read_text().replace("timeout_s: 60.0", "timeout_s: 5.0"))
    out = keel(target, "import", str(edited))
    assert out.returncode == 1 and "zz-static" in out.stderr and "1 change(s) made before it were put back" \
        in out.stderr, out.stderr
    with target.admin() as c:
        timeouts = {d["alias"]: d["timeout_s"] for d in c.get("/admin/deployments").json()["data"]}
    assert timeouts["cfg-chat"] == 60.0


def test_export_needs_an_admin_key(source: KeelServer, tmp_path: Path) -> None:
    out = keel(source, "export", str(tmp_path / "x"), key="sk-keel-not-a-key")
    assert out.returncode == 1 and "error [" in out.stderr and not (tmp_path / "x").exists()


def test_import_activates_a_changed_policy(exported: Path, module_server_factory, tmp_path: Path) -> None:
    """Guards: an import that said the policy differed but left the target on its old policy (the policy file
    is not the only way in since PUT /admin/policy), and a later refusal leaving the new policy active."""
    target = module_server_factory()
    edited = tmp_path / "edited"
    subprocess.run(["cp", "-r", str(exported), str(edited)], check=True)
    policy = (edited / "policy.yaml").read_text()
    new = policy.replace(policy.split("name:", 1)[1].splitlines()[0], " imported-policy", 1) if "name:" in policy \
        else "name: imported-policy\n" + policy
    (edited / "policy.yaml").write_text(new)
    with target.admin() as c:
        before = c.get("/admin/policy").json()
    out = keel(target, "import", str(edited))
    assert out.returncode == 0, out.stderr
    assert "policy" in out.stdout and "activated" in out.stdout, out.stdout
    with target.admin() as c:
        now = c.get("/admin/policy").json()
    assert now["content"] == new and now["version"] != before["version"]
    again = keel(target, "import", str(edited))
    assert again.returncode == 0 and "nothing changed" in again.stdout, again.stdout

    # An import refused before its policy (the original one again) leaves the active policy as it was.
    refused = with_deployment(exported, tmp_path / "refused", "zz-x", "alias: x\ntimeout_s: -1\n")
    out = keel(target, "import", str(refused))
    with target.admin() as c:
        assert c.get("/admin/policy").json()["content"] == new, out.stdout + out.stderr
