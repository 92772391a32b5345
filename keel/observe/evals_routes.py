"""Evaluations over HTTP: datasets (`POST /v1/evals/datasets`, JSON items or a JSONL body), runs (`POST
/v1/evals/runs`, stored with every item's scores), and the comparison of two runs."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request, Response

from keel.core.http import bounded_json, json_response
from keel.identity.auth import principal
from keel.identity.principal import Principal
from keel.observe.evals import Evals
from starlette.concurrency import run_in_threadpool

router = APIRouter(tags=["observe"])
MAX_BODY = 16 * 1024 * 1024


def _evals(request: Request) -> Evals:
    return request.app.state.evals


async def _json(request: Request) -> object:
    return await bounded_json(request, MAX_BODY, f"body is over {MAX_BODY // 1024 // 1024} MiB", "split the dataset")


@router.post("/v1/evals/datasets")
async def define_dataset(request: Request, p: Principal = Depends(principal)) -> Response:
    """A new version of a dataset: `{"name", "items": [{question, expected_answer, relevant}] or "<jsonl>"}`
    (builders of a team, admins); an unchanged one keeps its version (200)."""
    out = await run_in_threadpool(_evals(request).define, p, await _json(request))
    return json_response(out, 201 if out["created"] else 200)


@router.get("/v1/evals/datasets")
async def list_datasets(request: Request, p: Principal = Depends(principal)) -> Response:
    return json_response({"object": "list", "data": await run_in_threadpool(_evals(request).datasets, p)})


@router.post("/v1/evals/runs")
async def start_run(request: Request, p: Principal = Depends(principal)) -> Response:
    """Evaluate a dataset: `{"dataset", "collections", "top_k": 10, "mode": "hybrid", "rerank", "model",
    "prompt" (name@label; variables question and context), "judge", "embed_model"}`; answers when it is done."""
    return json_response(await _evals(request).run(p, await _json(request)), 201)


@router.get("/v1/evals/runs")
async def list_runs(request: Request, p: Principal = Depends(principal),
                    dataset: str | None = Query(None, max_length=64), limit: int = Query(50, ge=1, le=500)) -> Response:
    return json_response({"object": "list", "data": await run_in_threadpool(_evals(request).runs, p, dataset, limit)})


@router.get("/v1/evals/runs/{run_id}")
async def get_run(run_id: str, request: Request, p: Principal = Depends(principal)) -> Response:
    return json_response(await run_in_threadpool(_evals(request).get_run, p, run_id))


@router.get("/v1/evals/compare")
async def compare(request: Request, p: Principal = Depends(principal), a: str = Query(..., max_length=40),
                  b: str = Query(..., max_length=40)) -> Response:
    """Run `b` against run `a`: each metric's change and the items whose scores moved."""
    return json_response(await run_in_threadpool(_evals(request).compare, p, a, b))
