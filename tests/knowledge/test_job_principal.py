"""The principal an ingest job is stored with: written by `Principal.to_dict`, read back by the worker with
`Principal.from_dict` — rows written before `key_name` was stored (by jobs' own copy of the format) load too."""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa

from keel.core.db import Store
from keel.identity.principal import Principal, Scopes
from keel.knowledge.jobs import Upload, Worker, create_job
from keel.knowledge.parts import Embedder, KnowledgeConfig
from keel.knowledge.tables import jobs
from tests.knowledge.index_rows import add_collection, opened_index

pytestmark = pytest.mark.store

WRITER = Principal(key_id="key_w", role="builder", team_id="team_a", user_id="usr_1", key_name="ingest-bot",
                   scopes=Scopes(collections=("docs",)))


@pytest.fixture
def world(db_url, tmp_path):
    with opened_index(db_url, tmp_path / "data") as (store, index):
        yield store, index, add_collection(store, index, "docs", 8)


def stored(store: Store, job_id: str) -> dict:
    with store.engine.connect() as conn:
        return conn.execute(sa.select(jobs.c.principal).where(jobs.c.id == job_id)).scalar_one()


def test_a_job_stores_its_principal_whole(world) -> None:
    """Regression guard: jobs wrote the principal with a copy of its format that dropped `key_name`."""
    store, _index, c = world
    job_id = create_job(store, WRITER, c, [Upload("a.md", b"# A\n\nhello")], max_file_bytes=1000)
    assert stored(store, job_id) == WRITER.to_dict()
    assert Principal.from_dict(stored(store, job_id)) == WRITER


def test_the_worker_loads_a_job_row_written_in_the_old_format(world, tmp_path) -> None:
    """A row written before `key_name` was stored (no such key) is still processed, not failed."""
    store, index, c = world
    job_id = create_job(store, WRITER, c, [Upload("empty.md", b"")], max_file_bytes=1000)  # rejected at upload
    old = {"key_id": "key_w", "role": "builder", "team_id": "team_a", "user_id": "usr_1",
           "scopes": {"models": None, "collections": ["docs"], "agents": None}}
    with store.engine.begin() as conn:
        conn.execute(jobs.update().where(jobs.c.id == job_id).values(principal=old))
    assert Principal.from_dict(stored(store, job_id)) == Principal(
        key_id="key_w", role="builder", team_id="team_a", user_id="usr_1", scopes=Scopes(collections=("docs",)))
    worker = Worker(store, index, KnowledgeConfig(data_dir=tmp_path, max_file_bytes=1000),
                    Embedder(gateway=None), progress=lambda files, chunks: None)  # type: ignore[arg-type]  # unused
    asyncio.run(worker.process(job_id))  # InvalidPrincipal here would fail the job as an internal error
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(jobs.c.status).where(jobs.c.id == job_id)).scalar_one() == "failed"
