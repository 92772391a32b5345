"""The early answer (a chat answer sent to the client before the path's bookkeeping) is the pipeline's
decision, not each stage's memory: a stage that may change or refuse an answer holds it unless it says
otherwise, so a new stage that forgets the contract cannot leak the answer it was about to change.

Each test runs the real gateway (`keel.gateway.service.build`: limits, the test's stage, budgets, cache,
router, provider) against a loopback fake upstream."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from keel.core.db import Store
from keel.core.errors import Forbidden
from keel.core.settings import DeploymentConfig, Settings
from keel.gateway import service as gateway_service
from keel.gateway.pipeline import Call, Gateway, Next, Stage
from keel.gateway.protocol import ChatRequest, ChatResult
from keel.identity.principal import Principal
from keel.identity.vault import Vault, load_master_key
from keel.observe import service as observe_service
from tests.fakes.openai_upstream import FakeOpenAI

pytestmark = pytest.mark.store


@pytest.fixture(scope="module")
def fake():
    with FakeOpenAI() as upstream:
        yield upstream


@pytest.fixture
def build(db_url, tmp_path, fake):
    stores: list[Store] = []

    def make(*stages: Stage) -> Gateway:
        settings = Settings(data_dir=tmp_path, embedded_models=False, models=[DeploymentConfig(
            alias="fake", provider="openai_compatible", model="m", base_url=fake.url)])
        store = Store.open(db_url)
        store.upgrade()
        stores.append(store)
        vault = Vault(store, load_master_key("test-master-key", tmp_path))
        return gateway_service.build(settings, store, gateway_service.deployments(settings, store, vault),
                                     observe_service.build(settings, store), stages=list(stages))

    yield make
    for store in stores:
        store.dispose()


def run(gateway: Gateway, stage: Any) -> tuple[list[str | None], ChatResult | BaseException]:
    """One non-streaming call with an early-answer hook; (what the hook sent, what the path returned)."""
    sent: list[str | None] = []
    call = Call(request_id=uuid.uuid4().hex, principal=Principal(key_id="k1", role="admin"), kind="chat",
                alias="fake", chat=ChatRequest(model="fake", messages=[{"role": "user", "content": "hi"}]))

    def answer(result: ChatResult) -> None:
        sent.append(result.content)
        stage.sent_before_return = stage.returned is False

    call.answer = answer

    async def main() -> ChatResult | BaseException:
        try:
            return await gateway.chat(call)
        except Forbidden as exc:
            return exc
        finally:
            await gateway.deployments.close()

    return sent, asyncio.run(main())


class Rewrites:
    """A stage that changes every answer after the rest of the path returned it, and knows nothing of
    `call.answer` or any declaration: the stage a newcomer writes first."""

    def __init__(self) -> None:
        self.returned = False
        self.sent_before_return: bool | None = None

    async def handle(self, call: Call, nxt: Next) -> Any:
        result = await nxt(call)
        result.content = "[rewritten]"
        self.returned = True
        return result


class Refuses(Rewrites):
    """A stage that refuses every answer once it has seen it, equally unaware of the contract."""

    async def handle(self, call: Call, nxt: Next) -> Any:
        await nxt(call)
        self.returned = True
        raise Forbidden("the answer was refused", fix="none: this is a test")


class Counts(Rewrites):
    """A stage that only counts: it declares that it never changes an answer, so the answer may leave
    before its own work after `nxt` is done."""

    changes_answer = False

    async def handle(self, call: Call, nxt: Next) -> Any:
        result = await nxt(call)
        self.returned = True
        return result


def test_a_stage_that_forgets_the_contract_cannot_leak_the_answer_it_changes(build):
    stage = Rewrites()
    sent, result = run(build(stage), stage)
    assert isinstance(result, ChatResult) and result.content == "[rewritten]"
    assert sent == ["[rewritten]"]  # sent once, and only once the stage had changed it
    assert stage.sent_before_return is False


def test_a_stage_that_forgets_the_contract_cannot_leak_the_answer_it_refuses(build):
    stage = Refuses()
    sent, result = run(build(stage), stage)
    assert isinstance(result, Forbidden)
    assert sent == []  # the upstream answered, and none of it reached the client


def test_a_stage_that_declares_it_keeps_answers_lets_them_leave_early(build):
    stage = Counts()
    sent, result = run(build(stage), stage)
    assert isinstance(result, ChatResult) and sent == [result.content] and result.content
    assert stage.sent_before_return is True  # the answer left before the stage's work after `nxt`
