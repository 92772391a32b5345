"""`GET /v1/drift`: each drift signal's test, windows, statistic, p-value and status, and the latest alerts."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from starlette.concurrency import run_in_threadpool

from keel.core.http import json_response
from keel.identity.auth import principal
from keel.identity.principal import Principal

router = APIRouter(tags=["observe"])


@router.get("/v1/drift")
async def drift(request: Request, p: Principal = Depends(principal)) -> Response:
    """Live traffic's drift signals, tested now (recent window against the reference before it), and the
    alerts raised since the start; needs `metrics.read` (admins, auditors): the signals span every team."""
    p.require("metrics.read")
    watch = request.app.state.drift
    signals = await run_in_threadpool(watch.monitor.check)
    return json_response({"object": "drift", "signals": signals, "alerts": list(watch.alerts),
                          "interval_s": watch.interval_s})
