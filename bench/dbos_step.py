"""What one DBOS checkpoint costs on SQLite, against one plain write transaction, in one run.

An agent step is two DBOS steps (the model call, the tool call), so this is the floor under
`bench/agents.py`'s overhead that Keel cannot lower through DBOS' public API. Measured, alternating round by round
after a warm-up, in one process on uvloop with Keel's DBOS settings (`keel.workflows.durable`: WAL, synchronous
NORMAL):

(a) `dbos_step`: a workflow of N steps whose bodies do nothing (async, as Keel's are; `sync_step`: the same with a
    plain function, which DBOS runs with its checkpoint in one thread hop);
(b) `plain_txn`: N single-row inserts, each one SQLAlchemy write transaction run with `asyncio.to_thread` on a
    SQLite file with the same pragmas — roughly what a checkpoint needs at least.

Reported: CPU µs per step (p50 of the rounds; this process's CPU time, all threads) and the ratio dbos/plain.
Prints one JSON line.
    .venv/bin/python bench/dbos_step.py [--steps 200] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--steps", type=int, default=200, help="N, steps (or transactions) per round")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of each, alternating, after one warm-up")
    args = ap.parse_args()
    import sqlalchemy as sa
    import uvloop
    from dbos import DBOS

    from keel.workflows.durable import sqlite_tuning

    tmp = Path(tempfile.mkdtemp(prefix="keel-bench-dbos-"))
    url = f"sqlite:///{tmp / 'bench.dbos.sqlite'}"
    DBOS(config={"name": "bench", "system_database_url": url, **sqlite_tuning(url), "log_level": "WARNING",
                 "notification_listener_polling_interval_sec": 0.2, "scheduler_polling_interval_sec": 3600.0})
    plain_url = f"sqlite:///{tmp / 'plain.sqlite'}"
    engine = sa.create_engine(plain_url, **sqlite_tuning(plain_url)["db_engine_kwargs"])
    rows = sa.Table("rows", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True), sa.Column("v", sa.Text))
    rows.metadata.create_all(engine)
    insert = rows.insert()

    async def body(i: int) -> dict[str, int]:
        return {"i": i}

    def sync_body(i: int) -> dict[str, int]:
        return {"i": i}

    @DBOS.workflow(name="bench.steps")
    async def steps(n: int, sync: bool) -> int:
        for i in range(n):
            await DBOS.run_step_async({"name": f"s{i}"}, sync_body if sync else body, i)
        return n

    def write(i: int) -> None:
        with engine.begin() as conn:
            conn.execute(insert, {"v": f"row {i}"})

    async def plain(n: int) -> None:
        for i in range(n):
            await asyncio.to_thread(write, i)

    async def cpu_us(coro) -> float:  # noqa: ANN001
        c0 = time.process_time()
        await coro
        return (time.process_time() - c0) / args.steps * 1e6

    async def run() -> dict[str, object]:
        DBOS.launch()
        out: dict[str, list[float]] = {"dbos_step": [], "sync_step": [], "plain_txn": []}
        try:
            await steps(20, False), await steps(20, True), await plain(20)
            for _ in range(args.rounds):
                out["dbos_step"].append(await cpu_us(steps(args.steps, False)))
                out["sync_step"].append(await cpu_us(steps(args.steps, True)))
                out["plain_txn"].append(await cpu_us(plain(args.steps)))
        finally:
            DBOS.destroy()
        p50 = {k: statistics.median(v) for k, v in out.items()}
        return {**{f"{k}_cpu_us_p50": round(v, 1) for k, v in p50.items()},
                "dbos_over_plain": round(p50["dbos_step"] / p50["plain_txn"], 2),
                "rounds": {k: [round(x) for x in v] for k, v in out.items()},
                "steps": args.steps, "load_1m": round(os.getloadavg()[0], 2)}

    print(json.dumps(uvloop.run(run())))


if __name__ == "__main__":
    main()
