"""`keel eval …`: run a dataset against a running Keel (`run`, with `--fail-under` for CI gates), list and
show runs, and compare two runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional
from urllib.parse import urlencode

import typer

from keel.core.cliutil import KeyOpt, UrlOpt, client, console, handle_errors, print_rows
from keel.core.errors import BadRequest
from keel.observe.evals import METRICS

eval_app = typer.Typer(help="Evaluations: retrieval and answer quality, stored and compared run to run.",
                       no_args_is_help=True)


def parse_gates(gates: list[str]) -> dict[str, float]:
    out = {}
    for gate in gates:
        name, sep, value = gate.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or name.strip() not in METRICS:
            raise BadRequest(f"--fail-under {gate!r}: write METRIC=VALUE with METRIC one of {', '.join(METRICS)}",
                             fix="e.g. --fail-under ndcg@10=0.7")
    return out


@eval_app.command("run")
@handle_errors
def run(dataset: str = typer.Argument(..., help="a .jsonl file (uploaded as a dataset named after it) or the name "
                                                "of a stored dataset"),
        collection: list[str] = typer.Option([], "--collection", "-c", help="a collection to search; repeatable"),
        model: Optional[str] = typer.Option(None, help="answer each question with this model alias"),
        prompt: Optional[str] = typer.Option(None, help="a registry prompt (name@label) for the answers"),
        judge: Optional[str] = typer.Option(None, help="a model alias that judges groundedness"),
        embed_model: Optional[str] = typer.Option(None, help="an embedding alias for semantic match"),
        top_k: int = typer.Option(10, help="hits per question"),
        mode: str = typer.Option("hybrid", help="hybrid, vector or bm25"),
        rerank: Optional[str] = typer.Option(None, help="a reranker alias, or off (default: the collection's)"),
        name: Optional[str] = typer.Option(None, help="the dataset name for an uploaded file (default: its stem)"),
        fail_under: list[str] = typer.Option([], "--fail-under", help="METRIC=X: exit 1 when the metric is below X"),
        as_json: bool = typer.Option(False, "--json", help="the run as JSON"),
        url: Optional[str] = UrlOpt, key: Optional[str] = KeyOpt) -> None:
    """Evaluate DATASET; prints each metric and the run id (compare runs with `keel eval compare`)."""
    gates = parse_gates(fail_under)
    api = client(url, key)
    path = Path(dataset)
    if path.suffix == ".jsonl" or path.is_file():
        if not path.is_file():
            raise BadRequest(f"{path} does not exist", fix="pass a .jsonl file or a stored dataset's name")
        up = api.post("/v1/evals/datasets", {"name": name or path.stem, "items": path.read_text(encoding="utf-8")})
        dataset = up["name"]
    body = {"dataset": dataset, "collections": collection, "top_k": top_k, "mode": mode}
    body.update({k: v for k, v in (("model", model), ("prompt", prompt), ("judge", judge),
                                   ("embed_model", embed_model), ("rerank", rerank)) if v})
    out = api.post("/v1/evals/runs", body)
    if as_json:
        print(json.dumps(out, indent=2))
    else:
        print_rows(["metric", "value"], [[k, v] for k, v in out["metrics"].items()])
        console.print(f"run {out['id']} ({out['items_count']} items of {out['dataset']}@{out['dataset_version']})",
                      markup=False)
    failed = [f"{k} {out['metrics'].get(k)} < {v}" for k, v in gates.items()
              if out["metrics"].get(k) is None or out["metrics"][k] < v]
    if failed:
        console.print("below --fail-under: " + "; ".join(failed), style="bold red", markup=False)
        sys.exit(1)


@eval_app.command("runs")
@handle_errors
def runs(dataset: Optional[str] = typer.Option(None), url: Optional[str] = UrlOpt, key: Optional[str] = KeyOpt) -> None:
    """Recent runs, newest first."""
    query = urlencode({"dataset": dataset} if dataset else {})
    rows = client(url, key).get("/v1/evals/runs" + (f"?{query}" if query else ""))["data"]
    print_rows(["id", "dataset", "created_at", *METRICS],
               [[r["id"], r["dataset"], r["created_at"], *(r["metrics"].get(k) for k in METRICS)] for r in rows])


@eval_app.command("compare")
@handle_errors
def compare(a: str, b: str, url: Optional[str] = UrlOpt, key: Optional[str] = KeyOpt) -> None:
    """Run B against run A: each metric and its change, then how many items moved."""
    out = client(url, key).get("/v1/evals/compare?" + urlencode({"a": a, "b": b}))
    print_rows(["metric", "a", "b", "delta"], [[k, v["a"], v["b"], v["delta"]] for k, v in out["metrics"].items()])
    console.print(f"{len(out['changed_items'])} items changed" +
                  ("" if out["same_dataset"] else " (different datasets)"), markup=False)


def mount(app: typer.Typer) -> None:
    app.add_typer(eval_app, name="eval")
