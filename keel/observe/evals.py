"""Evaluation datasets and runs: retrieval and answer quality, stored and compared run to run.

A dataset is JSONL, one item a line: `question`, and `expected_answer` and/or `relevant` — document ids or
sources (`"faq/general.rst.txt"`), or `{"source" | "document_id", "section", "chunks"}` objects where
`section` narrows the match to a section (its last heading) and `chunks` says how many of its chunks the
index holds (the ideal ranking of nDCG; default 1). A run searches each question in the given collections
(recall@k, MRR, nDCG@10 over the hits) and, given a model, answers it from the hits — with a registry prompt
if named (variables `question` and `context`) — scoring exact and semantic match against the expected
answer and groundedness against the passages (plus a judge model's verdict if one is named).

Searching, answering and embedding are the capabilities above this one: the app factory passes them in
(`EvalParts`), so a run takes the same governed paths as any caller, as the principal who started it.

>>> run = await Evals(store, parts).run(builder, {"dataset": "faq-dev", "collections": ["pydocs"]})
>>> run["metrics"]["ndcg@10"]
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
import sqlalchemy as sa

from keel.core.clock import utcnow
from keel.core.db import Store, metadata
from keel.core.errors import BadRequest, Conflict, NotFound
from keel.core.ids import new_id
from keel.identity import ownership
from keel.identity import service as identity
from keel.identity.principal import Principal
from keel.observe import evals_metrics as m
from keel.observe.prompts import NAME, Prompts, check_name, sees_all

TS = sa.DateTime(timezone=True)

eval_datasets = sa.Table(
    "eval_datasets", metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("items", sa.JSON, nullable=False),
    sa.Column("n_items", sa.Integer, nullable=False),
    sa.Column("team_id", sa.String(40), nullable=True),
    sa.Column("created_by", sa.String(40), nullable=False),
    sa.Column("created_at", TS, nullable=False),
    sa.UniqueConstraint("name", "version", name="uq_eval_datasets_name_version"),
)

eval_runs = sa.Table(
    "eval_runs", metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("dataset", sa.String(64), nullable=False, index=True),
    sa.Column("dataset_version", sa.Integer, nullable=False),
    sa.Column("config", sa.JSON, nullable=False),
    sa.Column("metrics", sa.JSON, nullable=False),
    sa.Column("items", sa.JSON, nullable=False),
    sa.Column("team_id", sa.String(40), nullable=True),
    sa.Column("created_by", sa.String(40), nullable=False),
    sa.Column("created_at", TS, nullable=False),
)

MAX_ITEMS, MAX_TEXT, MAX_RELEVANT = 5000, 20_000, 100
MODES = ("hybrid", "vector", "bm25")
METRICS = ("recall@k", "mrr", "ndcg@10", "exact_match", "semantic_match", "groundedness", "groundedness_judge")
RUN_FIELDS = {"dataset", "collections", "model", "prompt", "judge", "embed_model", "top_k", "mode", "rerank"}
ANSWER_SYSTEM = ("Answer the question from the numbered passages only, in a few sentences. If they do not hold "
                 "the answer, say you do not know.")
JUDGE = ("Passages:\n{context}\n\nAnswer:\n{answer}\n\nIs every claim in the answer supported by the passages? "
         "Reply with one word: YES or NO.")

Search = Callable[[Principal, str, list[str], int, str, "str | None"], Awaitable[list[dict[str, Any]]]]
Chat = Callable[[Principal, str, list[dict[str, str]], "str | None", str], Awaitable[str]]
Embed = Callable[[Principal, str, list[str]], Awaitable[list[list[float]]]]


@dataclass(frozen=True)
class EvalParts:
    """The paths a run takes, as its principal: `search(p, question, collections, top_k, mode, rerank)` → hits
    (`Hit.public()` dicts, best first); `chat(p, model, messages, prompt_version, task_id)` → the answer text;
    `embed(p, model, texts)` → vectors."""

    search: Search
    chat: Chat
    embed: Embed


def parse_items(raw: Any) -> list[dict[str, Any]]:
    """Dataset items from a list of objects or JSONL text; a 400 names the line and field."""
    if isinstance(raw, str):
        lines = [(i, line) for i, line in enumerate(raw.splitlines(), 1) if line.strip()]
        items = []
        for i, line in lines:
            try:
                items.append(orjson.loads(line))
            except orjson.JSONDecodeError as exc:
                raise BadRequest(f"dataset line {i} is not JSON: {exc}", fix="write one JSON object per line") from None
    elif isinstance(raw, list):
        items = raw
    else:
        raise BadRequest("`items` must be a list of objects or JSONL text", fix='send {"name": …, "items": [...]}')
    if not 0 < len(items) <= MAX_ITEMS:
        raise BadRequest(f"a dataset holds 1 to {MAX_ITEMS} items, not {len(items)}", fix="split it")
    return [_item(x, i) for i, x in enumerate(items, 1)]


def _item(x: Any, i: int) -> dict[str, Any]:
    where = f"item {i}"
    if not isinstance(x, dict) or set(x) - {"id", "question", "expected_answer", "relevant"}:
        raise BadRequest(f"{where} must be an object with question, expected_answer and/or relevant (and id)",
                         fix=f"fix {where}")
    q, exp = x.get("question"), x.get("expected_answer")
    if not isinstance(q, str) or not q.strip() or len(q) > MAX_TEXT:
        raise BadRequest(f"{where}: question must be a non-empty string", fix=f"fix {where}")
    if exp is not None and (not isinstance(exp, str) or len(exp) > MAX_TEXT):
        raise BadRequest(f"{where}: expected_answer must be a string", fix=f"fix {where}")
    rel = x.get("relevant")
    if exp is None and not rel:
        raise BadRequest(f"{where} needs expected_answer and/or relevant", fix="say what a good result is")
    out: dict[str, Any] = {"id": str(x.get("id") or i)[:100], "question": q}
    if exp is not None:
        out["expected_answer"] = exp
    if rel:
        if not isinstance(rel, list) or len(rel) > MAX_RELEVANT:
            raise BadRequest(f"{where}: relevant must be a list of at most {MAX_RELEVANT}", fix=f"fix {where}")
        out["relevant"] = [_relevant(r, where) for r in rel]
    return out


def _relevant(r: Any, where: str) -> dict[str, Any]:
    if isinstance(r, str) and r:
        return {"doc": r, "section": None, "chunks": 1}
    if isinstance(r, dict) and not set(r) - {"source", "document_id", "section", "chunks"}:
        doc = r.get("document_id") or r.get("source")
        chunks = r.get("chunks", 1)
        if isinstance(doc, str) and doc and (r.get("section") is None or isinstance(r["section"], str)) \
                and type(chunks) is int and 0 < chunks <= 10_000:
            return {"doc": doc, "section": r.get("section"), "chunks": chunks}
    raise BadRequest(f"{where}: each relevant entry is a document id or source, or {{source, section, chunks}}",
                     fix='e.g. "relevant": ["faq/general.rst.txt"] or [{"source": "…", "section": "…"}]')


def matches(hit: dict[str, Any], rel: dict[str, Any]) -> bool:
    if rel["doc"] not in (hit.get("document_id"), hit.get("source")):
        return False
    section = rel["section"]
    return section is None or section in (hit.get("section"), (hit.get("section") or "").split(" > ")[-1])


def score_retrieval(hits: list[dict[str, Any]], relevant: list[dict[str, Any]], k: int) -> dict[str, float]:
    """recall@k (share of relevant entries with a hit), MRR and nDCG@10 (binary gains) of one ranked hit list."""
    firsts = [next((j for j, r in enumerate(relevant) if matches(h, r)), None) for h in hits]
    flags = [f is not None for f in firsts]
    return {"recall@k": m.recall_at_k(firsts[:k], [j for j in range(len(relevant))], k), "mrr": m.mrr(flags[:k]),
            "ndcg@10": m.ndcg_at_k(flags, sum(r["chunks"] for r in relevant), 10)}


def context_of(hits: list[dict[str, Any]]) -> str:
    return "\n\n".join(f"[{i}] {h.get('title') or h.get('source')}: {h['text']}" for i, h in enumerate(hits, 1))


class Evals:
    """Datasets (team-owned, versioned) and runs (stored with every item's scores)."""

    def __init__(self, store: Store, parts: EvalParts) -> None:
        self.store = store
        self.parts = parts
        self.prompts = Prompts(store)

    # -- datasets --------------------------------------------------------------------------------------
    def define(self, p: Principal, body: Any) -> dict[str, Any]:
        p.require("evals.run")
        if not isinstance(body, dict) or set(body) - {"name", "items", "team"}:
            raise BadRequest("send {\"name\": …, \"items\": [...] or \"<jsonl>\"}", fix="use only name, items, team")
        name, items = check_name(body.get("name")), parse_items(body.get("items"))
        team = body.get("team")
        requested = identity.get_team(self.store, team)["id"] if isinstance(team, str) else None
        with self.store.engine.begin() as conn:
            prev = conn.execute(sa.select(eval_datasets).where(eval_datasets.c.name == name)
                                .order_by(eval_datasets.c.version.desc()).limit(1)).first()
            owner = self._owner(p, name, prev, requested)
            if prev is not None and prev.items == items:
                return {**self._public_dataset(prev), "created": False}
            row = {"id": new_id("evd"), "name": name, "version": prev.version + 1 if prev else 1, "items": items,
                   "n_items": len(items), "team_id": owner, "created_by": p.key_id, "created_at": utcnow()}
            try:
                conn.execute(eval_datasets.insert().values(**row))
            except sa.exc.IntegrityError:
                raise Conflict(f"dataset {name!r} changed meanwhile", fix="send it again", dataset=name) from None
        return {**self._public_dataset(_Row(row)), "created": True}

    @staticmethod
    def _owner(p: Principal, name: str, prev: Any, requested: str | None) -> str | None:
        """The team a dataset version belongs to, or the refusal (as for workflows and prompts)."""
        return ownership.owner(p, "dataset", name, exists=prev is not None,
                               prev_team=prev.team_id if prev is not None else None, requested=requested)

    def _visible(self, p: Principal, col: sa.Column) -> Any:
        return sa.true() if sees_all(p) else sa.or_(col.is_(None), col == p.team_id)

    def dataset(self, p: Principal, name: str) -> Any:
        d = eval_datasets.c
        with self.store.engine.connect() as conn:
            row = conn.execute(sa.select(eval_datasets).where(d.name == name, self._visible(p, d.team_id))
                               .order_by(d.version.desc()).limit(1)).first()
        if row is None:
            raise NotFound(f"no dataset {name!r} that this key may read", dataset=name,
                           fix="upload it first: keel eval run FILE.jsonl … (or POST /v1/evals/datasets)")
        return row

    def datasets(self, p: Principal) -> list[dict[str, Any]]:
        d = eval_datasets.c
        with self.store.engine.connect() as conn:
            rows = conn.execute(sa.select(eval_datasets).where(self._visible(p, d.team_id))
                                .order_by(d.name, d.version.desc())).all()
        latest: dict[str, Any] = {}
        for r in rows:
            latest.setdefault(r.name, r)
        return [self._public_dataset(r) for r in latest.values()]

    @staticmethod
    def _public_dataset(r: Any) -> dict[str, Any]:
        return {"object": "eval.dataset", "name": r.name, "version": r.version, "items": r.n_items,
                "team_id": r.team_id, "created_at": r.created_at.isoformat()}

    # -- runs ------------------------------------------------------------------------------------------
    def _run_config(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object", fix='send {"dataset": …, "collections": [...]}')
        unknown = sorted(set(body) - RUN_FIELDS)
        if unknown:
            raise BadRequest(f"unknown field {unknown[0][:60]!r}", fix=f"use only: {', '.join(sorted(RUN_FIELDS))}")
        cols = body.get("collections") or []
        if not isinstance(cols, list) or not all(isinstance(c, str) and c for c in cols) or len(cols) > 20:
            raise BadRequest("`collections` must be a list of collection names", fix='e.g. ["pydocs"]')
        top_k = body.get("top_k", 10)
        if type(top_k) is not int or not 1 <= top_k <= 50:
            raise BadRequest("`top_k` must be an integer from 1 to 50", fix="e.g. 10")
        if body.get("mode", "hybrid") not in MODES:
            raise BadRequest(f"`mode` must be one of {', '.join(MODES)}", fix="e.g. hybrid")
        for key in ("model", "prompt", "judge", "embed_model", "rerank"):
            if body.get(key) is not None and (not isinstance(body[key], str) or not 0 < len(body[key]) <= 200):
                raise BadRequest(f"`{key}` must be a name", fix=f"send the {key} as a string, or omit it")
        for key in ("prompt", "judge", "embed_model"):
            if body.get(key) and not body.get("model"):
                raise BadRequest(f"`{key}` needs `model` (the run must answer to use it)", fix="add model")
        if not NAME.fullmatch(str(body.get("dataset") or "")):
            raise BadRequest("`dataset` must name a dataset", fix="e.g. faq-dev")
        return {"dataset": body["dataset"], "collections": cols, "top_k": top_k, "mode": body.get("mode", "hybrid"),
                **{k: body.get(k) for k in ("model", "prompt", "judge", "embed_model", "rerank")}}

    async def run(self, p: Principal, body: Any) -> dict[str, Any]:
        """Evaluate every item of the dataset's latest version, store the run, return it with its metrics."""
        p.require("evals.run")
        cfg = self._run_config(body)
        ds = await asyncio.to_thread(self.dataset, p, cfg["dataset"])
        if cfg["collections"] == [] and any("relevant" in it for it in ds.items):
            raise BadRequest("this dataset scores retrieval: name the collections to search",
                             fix="add collections (keel eval run … --collection NAME)")
        run_id = new_id("evr")
        items = [await self._item(p, cfg, it, run_id) for it in ds.items]
        metrics = {k: v for k in METRICS if (v := m.mean(i[k] for i in items if k in i)) is not None}
        row = {"id": run_id, "dataset": ds.name, "dataset_version": ds.version, "config": cfg, "metrics": metrics,
               "items": items, "team_id": p.team_id, "created_by": p.key_id, "created_at": utcnow()}
        await asyncio.to_thread(self._insert, row)
        return self._public_run(_Row(row), with_items=False)

    async def _item(self, p: Principal, cfg: dict[str, Any], it: dict[str, Any], run_id: str) -> dict[str, Any]:
        out: dict[str, Any] = {"id": it["id"]}
        hits: list[dict[str, Any]] = []
        if cfg["collections"]:
            hits = await self.parts.search(p, it["question"], cfg["collections"], cfg["top_k"], cfg["mode"],
                                           cfg["rerank"])
            out["hits"] = [h.get("source") for h in hits]
        if it.get("relevant"):
            out.update(score_retrieval(hits, it["relevant"], cfg["top_k"]))
        if not cfg["model"]:
            return out
        context = context_of(hits)
        if cfg["prompt"]:
            rendered = await asyncio.to_thread(self.prompts.resolve, p, cfg["prompt"],
                                               {"question": it["question"], "context": context})
            messages, version = rendered.messages, rendered.ref
        else:
            messages = [{"role": "system", "content": ANSWER_SYSTEM},
                        {"role": "user", "content": f"Passages:\n{context}\n\nQuestion: {it['question']}"}]
            version = None
        answer = await self.parts.chat(p, cfg["model"], messages, version, run_id)
        out["answer"] = answer[:4000]
        out["groundedness"] = m.groundedness(answer, [h["text"] for h in hits])
        if cfg["judge"]:
            verdict = await self.parts.chat(p, cfg["judge"], [{"role": "user", "content": JUDGE.format(
                context=context, answer=answer)}], None, run_id)
            out["groundedness_judge"] = float(verdict.strip().upper().startswith("YES"))
        if "expected_answer" in it:
            out["exact_match"] = m.exact_match(answer, it["expected_answer"])
            if cfg["embed_model"]:
                a, b = await self.parts.embed(p, cfg["embed_model"], [answer or " ", it["expected_answer"] or " "])
                out["semantic_match"] = m.semantic_match(a, b)
        return out

    def _insert(self, row: dict[str, Any]) -> None:
        with self.store.engine.begin() as conn:
            conn.execute(eval_runs.insert().values(**row))

    @staticmethod
    def _runs_visible(p: Principal) -> Any:
        """A run shows what its starter's search found: its team's only (a team-less admin's, admins and auditors)."""
        t = eval_runs.c.team_id
        return sa.true() if sees_all(p) else (t == p.team_id) if p.team_id is not None else sa.false()

    def get_run(self, p: Principal, run_id: str, with_items: bool = True) -> dict[str, Any]:
        r = eval_runs.c
        with self.store.engine.connect() as conn:
            row = conn.execute(sa.select(eval_runs).where(r.id == run_id, self._runs_visible(p))).first()
        if row is None:
            raise NotFound(f"no eval run {run_id!r} that this key may read", run_id=run_id,
                           fix="list runs with GET /v1/evals/runs (keel eval runs)")
        # the items hold what the starter's search found (sources, answers from its passages): only the starter,
        # admins and auditors see them, never a teammate who may not read those collections
        return self._public_run(row, with_items and (sees_all(p) or row.created_by == p.key_id))

    def runs(self, p: Principal, dataset: str | None, limit: int) -> list[dict[str, Any]]:
        r = eval_runs.c
        q = sa.select(eval_runs).where(self._runs_visible(p)).order_by(r.created_at.desc(), r.id).limit(limit)
        if dataset:
            q = q.where(r.dataset == dataset)
        with self.store.engine.connect() as conn:
            return [self._public_run(row, False) for row in conn.execute(q)]

    def compare(self, p: Principal, a: str, b: str) -> dict[str, Any]:
        """Each metric of run `a` and run `b` and the change; the items whose scores moved."""
        ra, rb = self.get_run(p, a), self.get_run(p, b)
        metrics = {k: {"a": ra["metrics"].get(k), "b": rb["metrics"].get(k),
                       "delta": round(rb["metrics"][k] - ra["metrics"][k], 4)
                       if k in ra["metrics"] and k in rb["metrics"] else None}
                   for k in METRICS if k in ra["metrics"] or k in rb["metrics"]}
        before = {i["id"]: i for i in ra.get("items", [])}
        changed = []
        for item in rb.get("items", []):
            old = before.get(item["id"])
            moved = {k: [old[k], item[k]] for k in METRICS if old and k in old and k in item and old[k] != item[k]}
            if moved:
                changed.append({"id": item["id"], **moved})
        return {"object": "eval.comparison", "a": a, "b": b, "same_dataset": ra["dataset"] == rb["dataset"],
                "metrics": metrics, "changed_items": changed}

    @staticmethod
    def _public_run(r: Any, with_items: bool) -> dict[str, Any]:
        out = {"object": "eval.run", "id": r.id, "dataset": r.dataset, "dataset_version": r.dataset_version,
               "config": r.config, "metrics": r.metrics, "items_count": len(r.items), "team_id": r.team_id,
               "created_by": r.created_by, "created_at": r.created_at.isoformat()}
        if with_items:
            out["items"] = r.items
        return out


class _Row:
    """A written row's values read like a fetched row's."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__.update(values)
