"""PII leak conformance: a peer's suite (`pii-leak-benchmark` 0.6.0, PyPI) run against a real Keel on loopback.

Keel serves with input and output PII and secrets set to `redact`; the suite's capture servers are its
upstreams (`conformance-model` for v1 `selfcheck`, `test` for the v2 response-split profile). Runs:
`selfcheck --profile pii-v1`, `selfcheck --profile pii-secrets-v1` (verdict CLEAN/LEAK/CHECK FAILED/NOT
MEASURED) and `pii-leak-benchmark-v2 --gateway-url …` (fidelity, leak rate single-chunk and adversarial,
request-path boundary), and prints one JSON line. Needs `pip install 'pii-leak-benchmark==0.6.0'`.

    .venv/bin/python bench/pii_leak.py [--oracle midpoint|exhaustive-2-part] [--seed HEX] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
BIN = Path(PY).parent
ADMIN = "sk-keel-benchadmin00_" + "p" * 32
POLICY = """
name: pii-leak-bench
guards:
  input:   {pii: redact, secrets: redact}
  output:  {pii: redact, secrets: redact}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, log: Path) -> None:
    import httpx
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"keel exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer in 120 s")


def start_keel(base: Path, v1_port: int, v2_port: int) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    (base / "data").mkdir(parents=True)
    (base / "policy.yaml").write_text(POLICY)
    cfg = base / "keel.yaml"
    cfg.write_text("models:\n"
                   f"  - {{alias: conformance-model, provider: openai_compatible, model: m, "
                   f"base_url: 'http://127.0.0.1:{v1_port}/v1'}}\n"
                   f"  - {{alias: test, provider: openai_compatible, model: test, "
                   f"base_url: 'http://127.0.0.1:{v2_port}/v1'}}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEEL_")}
    env.update({"KEEL_DATA_DIR": str(base / "data"), "KEEL_DATABASE_URL": f"sqlite:///{base / 'keel.db'}",
                "KEEL_BOOTSTRAP_ADMIN_KEY": ADMIN, "KEEL_MASTER_KEY": "bench-master-key",
                "KEEL_EMBEDDED_MODELS": "false", "KEEL_LOG_REQUESTS": "false", "PYTHONUNBUFFERED": "1",
                "KEEL_POLICY_FILE": str(base / "policy.yaml")})
    log = base / "keel.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([PY, "-m", "keel", "serve", "--port", str(port), "--config", str(cfg)],
                                env=env, cwd=base, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/healthz", proc, log)
    except BaseException:
        stop(proc)
        raise
    return proc, url, log


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run(argv: list[str], timeout: float = 900) -> tuple[int, str]:
    env = {**os.environ, "CONFORMANCE_TARGET_API_KEY": ADMIN}
    p = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout + p.stderr


def selfcheck(url: str, port: int, profile: str, out: Path) -> dict[str, Any]:
    path = out / f"selfcheck-{profile}.json"
    rc, text = run([str(BIN / "pii-leak-benchmark"), "selfcheck", "--target-base-url", url + "/v1",
                    "--target-model", "conformance-model", "--capture-port", str(port), "--profile", profile,
                    "--json-out", str(path)])
    verdict = next((v for v in ("CHECK FAILED", "NOT MEASURED", "CLEAN", "LEAK") if re.search(rf"\b{v}\b", text)),
                   "unknown")
    (out / f"selfcheck-{profile}.txt").write_text(text)
    return {"profile": profile, "rc": rc, "verdict": verdict}


def v2(url: str, port: int, out: Path, oracle: str, seed: str | None) -> dict[str, Any]:
    summary = out / "v2-summary.json"
    argv = [str(BIN / "pii-leak-benchmark-v2"), "--out", str(out / "v2"), "--only", "keel",
            "--gateway-url", url + "/v1/chat/completions", "--upstream-port", str(port), "--model", "test",
            "--oracle", oracle, "--json-out", str(summary)]
    if seed:
        argv += ["--seed", seed]
    rc, text = run(argv)
    (out / "v2.txt").write_text(text)
    rows = json.loads(summary.read_text()) if summary.exists() else None
    report = out / "v2" / "keel.json"
    boundary: Any = None
    if report.exists():
        doc = json.loads(report.read_text())
        boundary = _find(doc, "configured_upstream_boundary") or _find(doc, "boundary")
    return {"rc": rc, "summary": rows, "boundary": boundary, "tail": text[-1500:] if rc else None}


def _find(node: Any, key: str) -> Any:
    if isinstance(node, dict):
        if key in node:
            return node[key]
        for v in node.values():
            found = _find(v, key)
            if found is not None:
                return found
    if isinstance(node, list):
        for v in node:
            found = _find(v, key)
            if found is not None:
                return found
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--oracle", default="exhaustive-2-part",
                    choices=("midpoint", "exhaustive-2-part", "exhaustive-3-part", "union-worst-case"))
    ap.add_argument("--seed", default="a1b2c3d4e5f60001")
    ap.add_argument("--out", default=None, help="where the suite's reports go (default: a temp dir, removed)")
    args = ap.parse_args()
    if not (BIN / "pii-leak-benchmark").exists():
        sys.exit("pii-leak-benchmark is not installed: .venv/bin/pip install 'pii-leak-benchmark==0.6.0'")
    base = Path(tempfile.mkdtemp(prefix="keel-bench-pii-"))
    out = Path(args.out) if args.out else base / "reports"
    out.mkdir(parents=True, exist_ok=True)
    v1_port, v2_port = free_port(), free_port()
    proc, url, _log = start_keel(base / "keel", v1_port, v2_port)
    try:
        res: dict[str, Any] = {"selfcheck": [selfcheck(url, v1_port, p, out) for p in ("pii-v1", "pii-secrets-v1")],
                               "v2": v2(url, v2_port, out, args.oracle, args.seed), "oracle": args.oracle}
    finally:
        stop(proc)
        if not args.out:
            shutil.rmtree(base, ignore_errors=True)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
