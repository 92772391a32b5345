"""Whole-message clean verdicts (keel/governance/guards/runner.py): a conversation sent again on every call costs
one verdict lookup per earlier message, not one per text and guard, and still goes out exactly as guarding it from
scratch would send it; a message with findings, another team's call, or a call with passages is judged afresh."""

from __future__ import annotations

import pytest

from keel.governance import guards
from keel.governance.guards.base import Placeholders
from keel.governance.guards.runner import CallGuards, GuardBlocked
from keel.governance.guards.verdicts import CleanVerdicts
from tests.governance.conftest import EVIL, agent_conversation

ACTIONS = {"input": {"pii": "redact", "secrets": "block", "injection": "block"},
           "context": {"injection": "quote", "pii": "redact"}}
GUARDS = {n: guards.build(n) for n in ("pii", "secrets", "injection")}


def guarded(verdicts: CleanVerdicts | None, msgs: list[dict], scope: str = "team:a",
            passages: list[dict] | None = None) -> tuple[list[dict], CallGuards]:
    cg = CallGuards(GUARDS, ACTIONS, Placeholders(b"k" * 32, "key_1"), True, verdicts, scope)
    return cg.guard_messages(msgs, passages or []), cg


def test_an_earlier_message_costs_one_lookup_and_the_same_messages_go_out():
    verdicts = CleanVerdicts()
    for steps in range(1, 9):  # one model call per step, each sending the whole conversation again
        msgs = agent_conversation(steps, evil_at=2)
        hits = verdicts.hits
        out, cg = guarded(verdicts, msgs)
        fresh, fresh_cg = guarded(None, msgs)
        assert out == fresh
        assert [e.to_dict() for e in cg.events] == [e.to_dict() for e in fresh_cg.events]
        # each wholly clean message of the previous call is one hit: the system message and each earlier tool call
        # and clean tool output (the user's message with an address is redacted, and the injected tool output
        # quoted, on every call: theirs stay text-level hits, at most one per guard)
        pairs = steps - 1
        clean_earlier = (1 + 2 * pairs - (1 if pairs > 2 else 0)) if pairs else 0
        assert clean_earlier <= verdicts.hits - hits <= clean_earlier + 2 * len(GUARDS)


def test_findings_are_found_on_every_call():
    verdicts = CleanVerdicts()
    msgs = agent_conversation(3, evil_at=1)
    for _ in range(3):
        out, cg = guarded(verdicts, msgs)
        assert "ada@example.com" not in out[1]["content"]
        assert out[5]["content"].startswith("<untrusted-data") and "IBAN" in out[5]["content"]  # quoted, redacted
        assert {e.location for e in cg.events} >= {"messages[1]", "messages[5]"}
    with pytest.raises(GuardBlocked):  # a direct injection by the user is blocked however often it was sent
        guarded(verdicts, [{"role": "user", "content": EVIL}])
    with pytest.raises(GuardBlocked):
        guarded(verdicts, [{"role": "user", "content": EVIL}])


def test_verdicts_are_not_shared_across_scopes_or_with_passages():
    verdicts = CleanVerdicts()
    msgs = agent_conversation(2)
    guarded(verdicts, msgs, scope="team:a")
    within = verdicts.hits  # texts repeated inside the one call (the tool's name)
    guarded(verdicts, msgs, scope="team:b")  # another team: nothing of team a's is reused
    assert verdicts.hits == 2 * within
    passage = {"id": "p1", "text": "Record each item"}
    out, _ = guarded(verdicts, msgs, scope="team:a", passages=[passage])
    fresh, _ = guarded(None, msgs, scope="team:a", passages=[passage])
    assert out == fresh


def test_a_message_that_is_not_json_is_judged_text_by_text():
    verdicts = CleanVerdicts()
    odd = [{"role": "user", "content": "hello", 1: "not a JSON key"}]
    out, _ = guarded(verdicts, odd)
    assert out == guarded(None, odd)[0]
