"""The shipping files parse and hold the essentials: a multi-stage, non-root image built with the Makefile's
portable llama.cpp flags and a health check; compose and Kubernetes manifests that give every Keel process
the same master key, probe /healthz and /readyz, migrate in a job of their own, and never run as root.
(docker is not available where the tests run: these are the checks that need none.)"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def dockerfile() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def makefile_var(name: str) -> str:
    m = re.search(rf"^{name} := (.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert m, name
    return m.group(1).strip()


def test_dockerfile_is_multi_stage_non_root_portable_and_checked() -> None:
    """Guards: a native llama.cpp build (dies on other CPUs), a root container, a missing health check."""
    lines = dockerfile()
    froms = [line for line in lines if line.startswith("FROM ")]
    assert len(froms) >= 2 and all(":" in f.split()[1] and not f.split()[1].endswith(":latest") for f in froms)
    final = lines[lines.index(froms[-1]):]
    users = [line.split()[1] for line in final if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root"), users
    text = "\n".join(lines)
    assert makefile_var("LLAMA_CMAKE_ARGS") in text, "the image must build llama.cpp with the Makefile's flags"
    assert f"llama-cpp-python=={makefile_var('LLAMA_VERSION')}" in text
    assert "HNSWLIB_NO_NATIVE=1" in text
    health = [line for line in final if line.startswith("HEALTHCHECK ")]
    assert health and "/healthz" in health[0]
    # hadolint's usual findings: unpinned/uncleaned apt, pip caches, ADD, shell-form entrypoints, sudo
    for line in lines:
        if "apt-get install" in line:
            assert "--no-install-recommends" in line and "rm -rf /var/lib/apt/lists/*" in line, line
        assert not line.startswith("ADD "), line
        assert "sudo " not in line and "apt-get upgrade" not in line, line
    assert "PIP_NO_CACHE_DIR=1" in text
    assert "MALLOC_MMAP_THRESHOLD_=131072" in text, "the allocator setting that bounds memory (docs/scaling.md)"
    for line in lines:
        if line.startswith(("CMD ", "ENTRYPOINT ")):
            assert line.split(None, 1)[1].startswith("["), line
    assert ".venv" in (ROOT / ".dockerignore").read_text().split()


def keel_services(compose: dict) -> dict[str, dict]:
    return {name: svc for name, svc in compose["services"].items() if svc.get("image", "").startswith("keel")}


def test_compose_runs_two_replicas_a_worker_and_the_shared_parts() -> None:
    """Guards: replicas with different master keys, API replicas that also run background work, a missing
    worker or migration step, a root container."""
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert "pgvector" in services["postgres"]["image"]
    assert "valkey" in services["valkey"]["image"]
    assert "opentelemetry-collector" in services["otel-collector"]["image"]
    keel = keel_services(compose)
    api = [n for n, s in keel.items() if s["command"] == ["serve", "--role", "api"]]
    workers = [n for n, s in keel.items() if s["command"] == ["worker"]]
    assert len(api) == 2 and len(workers) == 1, keel.keys()
    migrate = [n for n, s in keel.items() if s["command"] == ["db", "upgrade"]]
    assert len(migrate) == 1
    master = {s["environment"]["KEEL_MASTER_KEY"] for s in keel.values()}
    assert len(master) == 1 and "KEEL_MASTER_KEY" in master.pop()
    for name in api + workers:
        svc = keel[name]
        assert svc["user"].split(":")[0] not in ("0", "root")
        assert svc["depends_on"][migrate[0]]["condition"] == "service_completed_successfully"
        assert "/healthz" in " ".join(svc["healthcheck"]["test"])
        assert svc["environment"]["KEEL_REDIS_URL"].startswith("redis://valkey")
        assert "otel-collector" in svc["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"]
        assert svc["environment"]["MALLOC_MMAP_THRESHOLD_"] == "131072"
    collector = DEPLOY / services["otel-collector"]["volumes"][0].split(":")[0]
    assert "otlp" in yaml.safe_load(collector.read_text())["receivers"]


def manifests() -> list[dict]:
    docs: list[dict] = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def pod_spec(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]


def test_kubernetes_manifests_hold_probes_one_secret_a_migration_job_and_budgets() -> None:
    """Guards: a pod without probes or running as root, a process that misses the shared master key, no
    migration job, a voluntary disruption that takes every API replica at once."""
    docs = manifests()
    kinds = [d["kind"] for d in docs]
    for kind in ("Deployment", "Secret", "Job", "PodDisruptionBudget", "Service", "ConfigMap"):
        assert kind in kinds, kind
    secret = next(d for d in docs if d["kind"] == "Secret")
    assert "KEEL_MASTER_KEY" in secret["stringData"]
    config = next(d for d in docs if d["kind"] == "ConfigMap")
    assert config["data"]["MALLOC_MMAP_THRESHOLD_"] == "131072"
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    job = next(d for d in docs if d["kind"] == "Job")
    assert pod_spec(job)["containers"][0]["args"] == ["db", "upgrade"]
    api = deployments["keel-api"]
    assert api["spec"]["replicas"] >= 2
    assert pod_spec(api)["containers"][0]["args"] == ["serve", "--role", "api"]
    assert pod_spec(deployments["keel-worker"])["containers"][0]["args"] == ["worker"]
    for doc in [*deployments.values(), job]:
        spec = pod_spec(doc)
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
        for c in spec["containers"]:
            assert {"secretRef": {"name": secret["metadata"]["name"]}} in c["envFrom"], doc["metadata"]["name"]
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
    for doc in deployments.values():
        c = pod_spec(doc)["containers"][0]
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    pdbs = {d["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"]: d
            for d in docs if d["kind"] == "PodDisruptionBudget"}
    assert pdbs["api"]["spec"]["minAvailable"] >= 1 and "worker" in pdbs
    labels = api["spec"]["template"]["metadata"]["labels"]
    service = next(d for d in docs if d["kind"] == "Service")
    assert service["spec"]["selector"].items() <= labels.items()
