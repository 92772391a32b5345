"""The policy's `traces` setting: content is off unless the policy file turns it on, and a
`max_classification` that names no classification is refused with its field and line."""

from __future__ import annotations

import pytest

from keel.governance.policy.model import PolicyInvalid, parse_policy


def test_content_is_off_by_default():
    assert parse_policy("name: p\n").traces.content is False


def test_traces_setting_parses():
    p = parse_policy("name: p\ntraces:\n  content: true\n  max_classification: internal\n")
    assert p.traces.content is True and p.traces.max_classification == "internal"


def test_an_unknown_max_classification_is_refused_with_its_line():
    with pytest.raises(PolicyInvalid) as err:
        parse_policy("name: p\ntraces:\n  content: true\n  max_classification: secretish\n")
    errors = err.value.ids["errors"]
    assert errors[0]["field"] == "traces.max_classification" and errors[0]["line"] == 4


def test_an_unknown_traces_field_is_refused():
    with pytest.raises(PolicyInvalid) as err:
        parse_policy("name: p\ntraces:\n  prompts: true\n")
    assert err.value.ids["errors"][0]["field"].startswith("traces")
