"""Mandates parse into what the loop enforces, and every mistake is reported with its line, column and field."""

from __future__ import annotations

import pytest

from keel.agents.errors import MandateError
from keel.agents.mandate import parse_mandate
from keel.agents.policy import check_call
from keel.agents.rules import host_allowed, parse_rule, recipient_allowed

SUPPORT = """\
name: support
model: cloud
goal: Help customers with orders.
collections: [handbook]
tools:
  retrieve: {}
  notify:
    allow_recipients: ["*@acme.example", boss@corp.example]
    max_calls_per_run: 1
  refund:
    endpoint: http://127.0.0.1:9/refund
    parameters:
      type: object
      required: [order_id, amount]
      properties:
        order_id: {type: string, pattern: "^o-[0-9]+$"}
        amount: {type: number}
        currency: {type: string}
    rules:
      - refund.amount <= 2000
      - currency in [EUR, USD]
approvals:
  - {tool: refund, when: amount > 500, approvers: [reviewer]}
"""


def decide(m, name, args, calls=0, today=0, approved=False):
    return check_call(m, name, args, calls_in_run=calls, calls_today=lambda: today, approved=approved)[0]


def test_a_mandate_parses_into_tools_rules_and_approvals():
    m = parse_mandate(SUPPORT)
    assert set(m.tools) == {"retrieve", "notify", "refund"}
    refund = m.tools["refund"]
    assert [r.text for r in refund.rules] == ["refund.amount <= 2000", "currency in [EUR, USD]"]
    assert refund.rules[0].path == ("amount",)
    assert refund.parameters["additionalProperties"] is False  # an endpoint gets only what its schema names
    assert m.approvals[0].when.text == "amount > 500" and m.approvals[0].approvers == ("reviewer",)


def test_every_mistake_is_located():
    """Each bad field is reported at once, with its line and column, so an author fixes them in one pass."""
    bad = """\
name: Bad Name
model: cloud
goal: x
tools:
  http: {allow_hosts: ["https://evil.example/x"]}
  refund:
    endpoint: ftp://x
    parameters: {type: string}
    rules: ["amount <<= 3", "currency in EUR"]
  notify: {allow_recipients: [nobody]}
  retrieve: {}
budgets: {steps: 0, wall_time: soon}
approvals:
  - {tool: transfer}
"""
    with pytest.raises(MandateError) as exc:
        parse_mandate(bad)
    errors = {e["field"]: e for e in exc.value.errors}
    assert errors["name"]["line"] == 1
    assert errors["tools.http.allow_hosts[0]"]["line"] == 5
    assert errors["tools.refund.endpoint"]["line"] == 7
    assert errors["tools.refund.parameters"]["line"] == 8
    assert errors["tools.refund.rules[0]"]["line"] == 9 and errors["tools.refund.rules[0]"]["column"] > 1
    assert "needs a list" in errors["tools.refund.rules[1]"]["message"]
    assert errors["tools.notify.allow_recipients[0]"]["line"] == 10
    assert "collections" in errors["tools.retrieve"]["message"]
    assert errors["budgets.steps"]["line"] == 12 and "budgets.wall_time" in errors
    assert "not in this mandate's tools" in errors["approvals[0].tool"]["message"]
    assert exc.value.status == 422 and exc.value.code == "agent_mandate_invalid"


def test_invalid_yaml_names_its_line():
    with pytest.raises(MandateError) as exc:
        parse_mandate("name: a\ntools: [\n")
    assert exc.value.errors[0]["line"] is not None and "invalid YAML" in exc.value.errors[0]["message"]


@pytest.mark.parametrize("name,args,rule", [
    ("transfer", {"to": "x"}, "tools"),
    ("refund", "{not json", "arguments"),
    ("refund", {"order_id": "o-1"}, "parameters"),
    ("refund", {"order_id": "o-1", "amount": 10, "currency": "EUR", "iban": "X"}, "parameters"),
    ("refund", {"order_id": "o-1", "amount": 2000.01, "currency": "EUR"}, "rules[0]: refund.amount <= 2000"),
    ("refund", {"order_id": "o-1", "amount": "5", "currency": "EUR"}, "parameters"),
    ("refund", {"order_id": "o-1", "amount": 5, "currency": "BTC"}, "rules[1]: currency in [EUR, USD]"),
    ("refund", {"order_id": "o-1", "amount": 5}, "rules[1]: currency in [EUR, USD]"),  # absent: refused
    ("retrieve", {"query": "x", "collections": ["payroll"]}, "collections"),
    ("notify", {"to": "attacker@evil.example", "subject": "s"}, "allow_recipients"),
    ("notify", {"to": "a@acme.example\r\nBcc: x@evil.example", "subject": "s"}, "allow_recipients"),
])
def test_calls_outside_the_mandate_are_refused_with_their_rule(name, args, rule):
    d = decide(parse_mandate(SUPPORT), name, args)
    assert not d.allowed and d.rule == rule


def test_calls_inside_the_mandate_pass_and_counts_and_approvals_apply():
    m = parse_mandate(SUPPORT)
    ok = {"order_id": "o-1", "amount": 20, "currency": "EUR"}
    assert decide(m, "refund", ok).allowed and decide(m, "refund", ok).approval is None
    big = dict(ok, amount=800)
    d = decide(m, "refund", big)
    assert d.allowed and d.approval is not None and d.approval_rule == "approvals[0]: refund when amount > 500"
    assert decide(m, "refund", big, approved=True).approval is None
    assert decide(m, "notify", {"to": "Ann@ACME.example", "subject": "hi"}).allowed
    assert decide(m, "notify", {"to": "boss@corp.example", "subject": "hi"}).allowed
    assert decide(m, "notify", {"to": "boss@corp.example", "subject": "hi"}, calls=1).rule == "max_calls_per_run"
    assert decide(m, "retrieve", {"query": "refunds"}).allowed


def test_rules_compare_without_evaluating_anything():
    assert parse_rule("a.b >= 3").holds({"a": {"b": 3}})
    assert not parse_rule("amount <= 5").holds({"amount": True})  # a boolean is not a number
    assert not parse_rule("amount <= 5").holds({"amount": float("nan")})
    assert parse_rule("to matches '[a-z]+@acme\\.example'").holds({"to": "ann@acme.example"})
    assert not parse_rule("to matches '[a-z]+@acme\\.example'").holds({"to": "ann@acme.example.evil.com"})
    assert parse_rule("kind not in [wire, crypto]").holds({"kind": "card"})
    with pytest.raises(ValueError):
        parse_rule("__import__('os').system('x') == 1")
    assert not parse_rule("to in [a]").holds({}) and parse_rule("to? in [a]").holds({})
    assert parse_rule("to? in [a]").holds({"to": None}) and not parse_rule("to? in [a]").holds({"to": "b"})
    assert parse_rule("to in [a, b]").holds({"to": ["a", "b"]}) and not parse_rule("to in [a]").holds({"to": ["a", "x"]})
    assert parse_rule("to not in [x]").holds({"to": ["a", "b"]}) and not parse_rule("to not in [x]").holds({"to": ["a", "x"]})
    assert parse_rule("to in [a]").holds({"to": []})  # an empty list has no element outside
    assert parse_rule("to matches 'a.*'").holds({"to": ["ab", "ac"]})
    assert not parse_rule("to matches 'a.*'").holds({"to": ["ab", "x"]})
    assert parse_rule("to not matches 'a.*'").holds({"to": "b"}) and not parse_rule("to not matches 'a.*'").holds({"to": "ab"})


def test_host_and_recipient_allow_lists():
    hosts = ("api.acme.example", "127.0.0.1:8080", "*.crm.example")
    assert host_allowed("https://api.acme.example/v1", hosts)
    assert host_allowed("http://127.0.0.1:8080/x", hosts)
    assert not host_allowed("http://127.0.0.1:8081/x", hosts)
    assert host_allowed("https://eu.crm.example/x", hosts) and not host_allowed("https://crm.example/x", hosts)
    assert not host_allowed("https://api.acme.example.evil.com/", hosts)
    assert not host_allowed("https://user@api.acme.example/", hosts)
    assert not host_allowed("file:///etc/passwd", hosts) and not host_allowed("gopher://api.acme.example", hosts)
    assert recipient_allowed("x@acme.example", ("*@acme.example",))
    assert not recipient_allowed("x@sub.acme.example", ("*@acme.example",))
    assert not recipient_allowed("x@acme.example, y@evil.example", ("*@acme.example",))


def test_an_approval_rule_may_look_at_the_run_s_spend():
    m = parse_mandate(SUPPORT.replace("  - {tool: refund, when: amount > 500, approvers: [reviewer]}",
                                      "  - {tool: refund, when: run.cost > 0.5}"))
    ok = {"order_id": "o-1", "amount": 20, "currency": "EUR"}
    cheap = check_call(m, "refund", ok, calls_in_run=0, calls_today=lambda: 0, run={"cost": 0.1})[0]
    dear = check_call(m, "refund", ok, calls_in_run=0, calls_today=lambda: 0, run={"cost": 0.6})[0]
    assert cheap.approval is None and dear.approval is not None and dear.approval_rule == "approvals[0]: refund when run.cost > 0.5"
    with pytest.raises(MandateError) as exc:
        parse_mandate(SUPPORT.replace("when: amount > 500", "when: run.wallet > 1"))
    assert exc.value.errors[0]["field"] == "approvals[0].when"


def test_the_example_support_agent_is_a_valid_mandate():
    from conftest import ROOT

    m = parse_mandate((ROOT / "examples" / "support_agent" / "support.yaml").read_text())
    big = {"order_id": "o-1", "amount": 800, "currency": "EUR", "to_account": "ACME-000001"}
    assert decide(m, "refund", dict(big, amount=400)).approval is None
    assert decide(m, "refund", big).approval is not None
    assert decide(m, "refund", dict(big, amount=2500)).rule == "rules[0]: refund.amount <= 2000"
