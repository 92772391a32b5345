"""Collections and documents written straight into a chunk index with their catalogue rows, for the tests that drive
a `ChunkIndex` without the ingestion pipeline (the conformance suite, the search-statistics scope tests)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa

from keel.core.db import Store
from keel.knowledge.acl import Collection
from keel.knowledge.index import ChunkIn, open_index, transaction
from keel.knowledge.tables import collections, document_acl, documents


@contextmanager
def opened_index(db_url: str, data_dir: Path) -> Iterator[tuple[Store, object]]:
    """A migrated store at `db_url` and its chunk index under `data_dir`, open for the block; closed after."""
    store = Store.open(db_url)
    store.upgrade()
    index = open_index(store, data_dir)
    index.open()
    try:
        yield store, index
    finally:
        index.close()
        store.dispose()


def add_collection(store: Store, index, name: str, dims: int) -> Collection:  # noqa: ANN001
    """Collection `col_<name>` of team_a, in the catalogue and the index."""
    c = Collection(id=f"col_{name}", name=name, classification="internal", owner_team_id="team_a",
                   embedding_model="local-embed", dims=dims)
    with transaction(store) as tx:
        tx.conn.execute(collections.insert().values(
            id=c.id, name=name, classification="internal", owner_team_id="team_a", embedding_model="local-embed",
            dims=dims, meta={}, created_at=sa.func.now(), updated_at=sa.func.now()))
        index.create_collection(tx, c)
    return c


def put_document(store: Store, index, c: Collection, doc_id: str, items: list[ChunkIn], *,  # noqa: ANN001
                 source: str | None = None, fmt: str | None = None, restricted_to: str | None = None,
                 fail: bool = False) -> None:
    """Write (or rewrite) document `doc_id` with `items` in one transaction: its row, its ACL as given (readable by
    team `restricted_to` only, else by the collection's readers), its chunks; `fail` rolls it all back."""
    source = source or doc_id
    with transaction(store) as tx:
        exists = tx.conn.execute(sa.select(documents.c.id).where(documents.c.id == doc_id)).first()
        values = dict(collection_id=c.id, source=source, title=source, format=fmt or source.rsplit(".", 1)[-1],
                      content_hash="h", size_bytes=1, chunk_count=len(items), restricted=restricted_to is not None,
                      meta={}, created_at=sa.func.now(), updated_at=sa.func.now())
        if exists:
            tx.conn.execute(documents.update().where(documents.c.id == doc_id).values(**values))
            tx.conn.execute(document_acl.delete().where(document_acl.c.document_id == doc_id))
        else:
            tx.conn.execute(documents.insert().values(id=doc_id, **values))
        if restricted_to:
            tx.conn.execute(document_acl.insert().values(document_id=doc_id, kind="team", value=restricted_to))
        index.write_document(tx, c, doc_id, items)
        if fail:
            raise RuntimeError("roll back")
