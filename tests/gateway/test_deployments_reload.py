"""Stored deployments are re-read in the background: a request never waits on that read (it ran on the
event loop, blocking every request in flight, once every few seconds), another replica's change is seen
within the reload interval, and an unchanged table keeps the same objects so resolutions stay cached."""

import asyncio
import threading

import pytest
import sqlalchemy as sa

from conftest import eventually_async
from keel.core.db import Store
from keel.core.settings import DeploymentConfig, Settings
from keel.gateway.deployments import Deployments
from keel.gateway.admission import Lookups
from keel.gateway.protocol import ProviderContext

pytestmark = pytest.mark.store


def test_deployments_are_reread_off_the_request_path(tmp_path, db_url):
    store = Store.open(db_url)
    store.upgrade()
    settings = Settings(data_dir=tmp_path / "data", database_url=db_url, embedded_models=False,
                        models=[DeploymentConfig(alias="static", provider="openai_compatible", model="m",
                                                 base_url="http://127.0.0.1:9/v1")])
    ctx = ProviderContext(get_secret=lambda name: None)
    here = Deployments(store, settings, ctx)
    there = Deployments(store, settings, ctx)  # another replica on the same store
    here.RELOAD_EVERY_S = 0.2
    lookups = Lookups(here, settings)
    reads: list[str] = []

    def on_execute(conn, cursor, statement, *args):
        if "FROM deployments" in statement:
            reads.append(threading.current_thread().name)

    sa.event.listen(store.engine, "before_cursor_execute", on_execute)

    async def main() -> None:
        loop_thread = threading.current_thread().name
        await here.start()
        first = lookups.deployments("static", "chat")
        version = here.version

        def reread_thrice() -> bool:  # requests go on while the table is re-read
            assert lookups.deployments("static", "chat") is first  # unchanged: the cached resolution, every time
            return len(reads) >= 3
        await eventually_async(reread_thrice, timeout=10, retry=())  # the table was re-read meanwhile …
        assert loop_thread not in reads, "the event loop read the deployments table"  # … never on the loop
        assert here.version == version

        await asyncio.to_thread(there.add, DeploymentConfig(alias="new", provider="openai_compatible", model="m",
                                                            base_url="http://127.0.0.1:9/v1"))
        await eventually_async(lambda: lookups.deployments("new", "chat"), timeout=2.0)  # another replica's, seen
        assert here.version == version + 1
        assert loop_thread not in reads
        await here.close()
        await there.close()

    asyncio.run(main())
    store.dispose()


def test_a_read_that_began_earlier_never_overwrites_a_later_one(tmp_path, db_url):
    """The watcher's read (a worker thread) may finish after an admin change was applied; what it saw
    is older and must not bring back the table as it was."""
    store = Store.open(db_url)
    store.upgrade()
    settings = Settings(data_dir=tmp_path / "data", database_url=db_url, embedded_models=False)
    ctx = ProviderContext(get_secret=lambda name: None)
    here = Deployments(store, settings, ctx)
    early = here._read()  # the watcher's read, before the change
    here.add(DeploymentConfig(alias="new", provider="openai_compatible", model="m", base_url="http://127.0.0.1:9/v1"))
    assert here.for_alias("new")
    here._apply(*early)  # … lands after it
    assert here.for_alias("new"), "an older read undid a newer change"
    store.dispose()
