"""Workflow test harness: the real server, spec helpers, and waiting for a run to reach a status."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import httpx

from conftest import KeelServer, eventually, loopback_process

FINAL = ("completed", "failed", "cancelled")


def define(srv: KeelServer, source: str, key: str | None = None) -> dict[str, Any]:
    with srv.client(key or srv.admin_key) as c:
        r = c.post("/v1/workflows", content=source, headers={"content-type": "application/yaml"})
    assert r.status_code in (200, 201), r.text
    return r.json()


def start(srv: KeelServer, name: str, inputs: dict[str, Any] | None = None, key: str | None = None) -> str:
    with srv.client(key or srv.admin_key) as c:
        r = c.post(f"/v1/workflows/{name}/runs", json={"inputs": inputs or {}})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def run_detail(srv: KeelServer, name: str, run_id: str, key: str | None = None) -> dict[str, Any]:
    with srv.client(key or srv.admin_key) as c:
        r = c.get(f"/v1/workflows/{name}/runs/{run_id}")
    assert r.status_code == 200, r.text
    return r.json()


def wait_run(srv: KeelServer, name: str, run_id: str, statuses: tuple[str, ...] = FINAL,
             timeout: float = 60) -> dict[str, Any]:
    """Poll until the run's status is one of `statuses`; fail with the last detail seen."""
    last: dict[str, Any] = {}

    def reached() -> dict[str, Any] | None:
        nonlocal last
        last = run_detail(srv, name, run_id)  # an HTTP error (a server restarting) is retried
        return last if last.get("status") in statuses else None
    try:
        return eventually(reached, timeout=timeout, interval=0.1, retry=(httpx.HTTPError,))
    except AssertionError as exc:
        raise AssertionError(f"run {run_id} did not reach {statuses} in {timeout}s: {last}\n"
                             f"{srv.logs()[-3000:]}") from exc


def steps_by_id(detail: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["id"]: s for s in detail["steps"]}


def pending_approval(srv: KeelServer, run_id: str, key: str | None = None) -> dict[str, Any]:
    with srv.client(key or srv.admin_key) as c:
        rows = c.get("/v1/approvals").json()["data"]
    found = [a for a in rows if a["run_id"] == run_id]
    assert found, f"no pending approval for {run_id}: {rows}"
    return found[0]


@contextlib.contextmanager
def receiver() -> Iterator[str]:
    """`tests.fakes.receiver` (dedupes side effects by idempotency key) as a subprocess; yields its root URL."""
    with loopback_process("tests.fakes.receiver") as url:
        yield url
