"""CPU per chat request of Keel servers, all threads, split by thread: an interleaved A/B of source trees.

Each tree (a checkout or a `git archive` export sharing this venv) serves `bench/gateway.py`'s set-up (auth,
budgets, rate limits, ledger on; guards off) against one loopback fake upstream; the trees' servers are
loaded in turn with `wrk` at c=50 (A B B A ...), and each round reports the process's CPU per request and
each thread group's share (`/proc/PID/task/*`). The host's speed drifts by more than the differences
measured, so only the medians of interleaved rounds compare.

    .venv/bin/python bench/cpu_split.py [--trees new=.,old=/tmp/old] [--rounds 6] [--seconds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import gateway as gw  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def python_threads(pid: int) -> dict[str, str]:
    """OS thread id -> Python thread name, from `py-spy dump` (the OS names every thread `python`)."""
    spy = Path(sys.executable).parent / "py-spy"
    out = subprocess.run([str(spy), "dump", "-p", str(pid)], capture_output=True, text=True).stdout
    return {tid: name or "python (unnamed)" for tid, name in re.findall(r'^Thread (\d+) \([^)]*\)(?:: "([^"]*)")?', out, re.M)}


def threads(pid: int, names: dict[str, str]) -> dict[str, float]:
    """CPU seconds per thread group: Python threads by name (digits folded), the rest as `native`."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = re.sub(r"[-_ ]?\d+$", "", names.get(task.name, "native"))
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / TICK
    return out


def start(tree: Path, tmp: Path, upstream: str):
    """`bench/gateway.py`'s Keel, served from `tree`."""
    saved, path = gw.ROOT, os.environ.get("PYTHONPATH")
    gw.ROOT = tree
    os.environ["PYTHONPATH"] = str(tree)  # the tree's own code, not the venv's editable install
    try:
        return gw.start_keel(tmp, upstream)
    finally:
        gw.ROOT = saved
        if path is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trees", default="new=.")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--latency-ms", type=float, default=20)
    args = ap.parse_args()
    trees = {k: Path(v).resolve() for k, v in (t.split("=", 1) for t in args.trees.split(","))}
    tmp = Path(tempfile.mkdtemp(prefix="keel-cpu-"))
    port = gw.free_port()
    up = subprocess.Popen([gw.PY, "-m", "tests.fakes.openai_upstream", "--port", str(port),
                           "--latency-ms", str(args.latency_ms)], cwd=gw.ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    servers = {}
    try:
        gw.wait_http(f"http://127.0.0.1:{port}/_stats")
        for name, tree in trees.items():
            (tmp / name).mkdir()
            servers[name] = start(tree, tmp / name, f"http://127.0.0.1:{port}/v1")
        url = {n: s[1] + "/v1/chat/completions" for n, s in servers.items()}
        names_of = {}
        for name, (proc, _, key) in servers.items():
            gw.wrk(url[name], key, gw.BODY, 50, 3, tmp)  # warm-up
            names_of[name] = python_threads(proc.pid)
        names = list(trees)
        res: dict[str, list[dict]] = {n: [] for n in names}
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else reversed(names):
                proc, _, key = servers[name]
                before = threads(proc.pid, names_of[name])
                w = gw.wrk(url[name], key, gw.BODY, 50, args.seconds, tmp)
                after = threads(proc.pid, names_of[name])
                n = w["rps"] * args.seconds
                split = {t: round((after[t] - before.get(t, 0.0)) / n * 1e6, 1) for t in after
                         if after[t] - before.get(t, 0.0) > 0}
                row = {"rps": w["rps"], "cpu_us": round(sum(split.values()), 1), "errors": w["errors"], "threads": split}
                res[name].append(row)
                print(f"# {name} round {r}: {json.dumps(row)}", file=sys.stderr)
        out = {}
        for name, rows in res.items():
            groups = sorted({t for row in rows for t in row["threads"]})
            out[name] = {"cpu_us_per_req": round(statistics.median(r["cpu_us"] for r in rows), 1),
                         "rps_c50": round(statistics.median(r["rps"] for r in rows), 1),
                         "errors": sum(r["errors"] for r in rows),
                         "threads": {t: round(statistics.median(r["threads"].get(t, 0.0) for r in rows), 1) for t in groups}}
        print(json.dumps(out))
    finally:
        for proc, _, _ in servers.values():
            gw.stop(proc)
        gw.stop(up)


if __name__ == "__main__":
    main()
