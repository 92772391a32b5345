"""Workflow spec parsing, validation with exact locations, and the sandboxed template renderer."""

from __future__ import annotations

import textwrap

import jinja2
import pytest
import yaml

from keel.core.errors import ValidationFailed
from keel.workflows.errors import SpecError, TemplateError
from keel.workflows.spec import (
    WorkflowSpec,
    parse_duration,
    parse_spec,
    secret_refs,
    validate_inputs,
)
from keel.workflows.templates import render, template_refs, truthy

FULL = """\
name: lead-intake
description: Qualify a lead and push it to the CRM
inputs:
  type: object
  required: [company]
  properties:
    company: {type: string}
    amount: {type: number}
vars:
  threshold: 1000
allow_hosts: [crm.example.com, hooks.example.com:8443]
triggers:
  - {type: webhook, secret: crm-hook}
  - {type: schedule, cron: "0 9 * * 1-5", inputs: {company: Acme}}
steps:
  - id: docs
    type: retrieve
    collections: [playbooks]
    query: "{{ inputs.company }}"
  - id: enrich
    type: llm
    prompt: "Describe {{ inputs.company }} using {{ steps.docs.output | tojson }}"
    system: You are terse.
    output_schema: {type: object, properties: {size: {type: string}}}
    retries: {max_attempts: 3, backoff_s: 2}
    timeout_s: 30s
  - id: faq
    type: answer
    collections: [faq]
    question: "What do we sell to {{ inputs.company }}?"
  - id: big
    type: condition
    if: inputs.amount > vars.threshold
    then: review
  - id: shape
    type: transform
    output: {company: "{{ inputs.company }}", size: "{{ steps.enrich.output.size }}", n: 3}
  - id: review
    type: approval
    approvers: [reviewer]
    show: {summary: "{{ steps.enrich.output }}", amount: "{{ inputs.amount }}"}
    editable: [amount]
    on_timeout: escalate
    escalate_to: [admin]
    timeout_s: 2d
    instructions: Check the amount
  - id: push
    type: http
    method: post
    url: "https://crm.example.com/leads/{{ inputs.company }}"
    headers: {Authorization: "Bearer {{ secrets.crm_token }}"}
    body: {lead: "{{ steps.shape.output }}"}
    expect_status: [200, 201]
  - id: tell
    type: notify
    webhook: https://hooks.example.com:8443/x
    email: "sales@example.com"
    body: "New lead {{ inputs.company }}"
  - id: pause
    type: wait
    seconds: 5m
  - id: sub
    type: workflow
    name: follow-up
    inputs: {company: "{{ inputs.company }}"}
  - id: save
    type: record
    table: leads
    data: {company: "{{ inputs.company }}"}
    key: "{{ inputs.company }}"
    when: "{{ steps.review.output.decision == 'approved' }}"
"""


def spec_errors(text: str, **kw: object) -> list[dict]:
    with pytest.raises(SpecError) as info:
        parse_spec(textwrap.dedent(text), **kw)  # type: ignore[arg-type]
    assert info.value.ids["errors"] == info.value.errors
    return info.value.errors


def one_error(text: str, **kw: object) -> dict:
    errors = spec_errors(text, **kw)
    assert len(errors) == 1, errors
    return errors[0]


def steps_yaml(body: str, head: str = "name: t\nallow_hosts: [ok.example.com]\n") -> str:
    return head + "steps:\n" + textwrap.indent(textwrap.dedent(body), "  ")


def test_full_spec_parses_with_defaults_and_lines() -> None:
    """Every step type parses; defaults are filled and durations become seconds."""
    spec = parse_spec(FULL)
    assert [s.type for s in spec.steps] == ["retrieve", "llm", "answer", "condition", "transform", "approval",
                                            "http", "notify", "wait", "workflow", "record"]
    assert [s.line for s in spec.steps] == [16, 20, 27, 31, 35, 38, 47, 54, 59, 62, 66]
    enrich = spec.step("enrich")
    assert (enrich.retries, enrich.backoff_s, enrich.timeout_s) == (3, 2.0, 30.0)
    assert enrich.config["model"] == "local-chat" and enrich.config["max_tokens"] == 256
    assert spec.step("docs").config["top_k"] == 5 and spec.step("docs").retries == 1
    assert spec.step("big").config["if"] == "{{ inputs.amount > vars.threshold }}"
    review = spec.step("review").config
    assert review["timeout_s"] == review["escalation_timeout_s"] == 172800.0
    assert spec.step("push").config["method"] == "POST"
    assert spec.step("tell").config["subject"] == "Keel workflow notification"
    assert spec.step("pause").config == {"seconds": 300.0, "until": None, "description": None}
    assert spec.index("save") == 10 and spec.allow_hosts == ("crm.example.com", "hooks.example.com:8443")
    assert [t.type for t in spec.triggers] == ["webhook", "schedule"]
    assert spec.triggers[1].config == {"cron": "0 9 * * 1-5", "inputs": {"company": "Acme"}}
    with pytest.raises(KeyError):
        spec.step("nope")


def test_to_dict_round_trips() -> None:
    """to_dict is valid spec input and parses back to the same normalised spec."""
    data = parse_spec(FULL).to_dict()
    again = parse_spec(yaml.safe_dump(data, sort_keys=False))
    assert again.to_dict() == data
    assert data["steps"][1]["retries"] == {"max_attempts": 3, "backoff_s": 2.0}


def test_approval_defaults() -> None:
    """An approval step gets reviewer/admin approvers, a 7-day timeout and reject on timeout."""
    spec = parse_spec(steps_yaml("- {id: ok, type: approval}\n"))
    c = spec.step("ok").config
    assert c["approvers"] == ["reviewer", "admin"] and c["on_timeout"] == "reject"
    assert c["timeout_s"] == c["escalation_timeout_s"] == 7 * 86400.0 and c["escalate_to"] is None


def test_yaml_syntax_error_is_located() -> None:
    """A YAML syntax error gives one error with the parser's line and column."""
    err = one_error("name: t\nsteps:\n  - id: a\n    type: [llm\n")
    assert err["field"] == "(root)" and err["line"] == 5 and err["message"].startswith("invalid YAML")


def test_top_level_must_be_mapping() -> None:
    """A list or scalar document is refused with a clear message."""
    assert "must be a mapping" in one_error("- a\n- b\n")["message"]


def test_unknown_step_type() -> None:
    """An unknown step type names the field, its line and the known types."""
    err = one_error(steps_yaml("- id: a\n  type: sql\n"))
    assert (err["line"], err["column"], err["field"]) == (5, 11, "steps[0].type")
    assert "unknown step type 'sql'" in err["message"] and "llm" in err["message"]


def test_duplicate_id() -> None:
    """A repeated step id is reported at the second definition, naming the first line."""
    err = one_error(steps_yaml("- {id: a, type: transform, output: 1}\n- {id: a, type: transform, output: 2}\n"))
    assert (err["line"], err["field"]) == (5, "steps[1].id")
    assert err["message"] == "duplicate step id 'a' (first defined on line 4)"


def test_missing_required_field_points_at_step() -> None:
    """A missing required field is located at its step and named in the field path."""
    err = one_error(steps_yaml("- id: a\n  type: llm\n  max_tokens: 10\n"))
    assert (err["line"], err["column"], err["field"]) == (4, 5, "steps[0].prompt")
    assert err["message"] == "missing required field 'prompt'"


def test_unknown_key_lists_allowed() -> None:
    """An unknown step key is located at the key and the message lists the allowed keys."""
    err = one_error(steps_yaml("- id: a\n  type: retrieve\n  collections: [x]\n  query: q\n  topk: 3\n"))
    assert (err["line"], err["column"], err["field"]) == (8, 5, "steps[0].topk")
    assert "unknown key 'topk'" in err["message"] and "top_k" in err["message"]


def test_unknown_top_level_key() -> None:
    """Unknown top-level keys are errors."""
    err = one_error("name: t\nstep: []\nsteps: [{id: a, type: transform, output: 1}]\n")
    assert (err["line"], err["field"]) == (2, "step")


def test_template_syntax_error() -> None:
    """Invalid Jinja is reported at the template with the Jinja message."""
    err = one_error(steps_yaml("- id: a\n  type: llm\n  prompt: 'Hi {{ inputs.x '\n"))
    assert (err["line"], err["column"], err["field"]) == (6, 13, "steps[0].prompt")
    assert err["message"].startswith("template syntax error:")


def test_reference_to_unknown_step() -> None:
    """`steps.X` naming no step is an error."""
    err = one_error(steps_yaml("- id: a\n  type: transform\n  output: {x: '{{ steps.ghost.output }}'}\n"))
    assert (err["line"], err["field"], err["message"]) == (6, "steps[0].output.x", "unknown step 'ghost'")


def test_reference_to_later_step() -> None:
    """A step may only read the output of steps before it."""
    err = one_error(steps_yaml("""\
        - id: a
          type: llm
          prompt: "{{ steps.b.output }}"
        - id: b
          type: transform
          output: 1
        """))
    assert (err["line"], err["field"]) == (6, "steps[0].prompt")
    assert err["message"] == "step 'b' has not run yet at this point"


def test_condition_jump_backwards_is_cycle() -> None:
    """A condition jumping to itself or an earlier step is a cycle; an unknown target is reported."""
    errors = spec_errors(steps_yaml("""\
        - id: a
          type: transform
          output: 1
        - id: check
          type: condition
          if: "{{ true }}"
          then: a
          else: nowhere
        """))
    assert [(e["line"], e["field"]) for e in errors] == [(10, "steps[1].then"), (11, "steps[1].else")]
    assert errors[0]["message"].startswith("cycle:") and errors[1]["message"] == "unknown step 'nowhere'"


def test_subworkflow_cycle_via_resolver() -> None:
    """a → b → a through sub-workflow steps is refused; so is an unknown or self-referencing workflow."""
    b = parse_spec("name: b\nsteps: [{id: call, type: workflow, name: a}]\n")
    store: dict[str, WorkflowSpec] = {"b": b}
    err = one_error(steps_yaml("- {id: run_b, type: workflow, name: b}\n", head="name: a\n"),
                    resolve_workflow=store.get)
    assert (err["line"], err["field"], err["message"]) == (3, "steps[0].name", "cycle: a → b → a")
    assert one_error("name: a\nsteps: [{id: s, type: workflow, name: zz}]\n",
                     resolve_workflow=store.get)["message"] == "unknown workflow 'zz'"
    assert one_error("name: a\nsteps: [{id: s, type: workflow, name: a}]\n")["message"] == "cycle: a → a"


def test_disallowed_hosts() -> None:
    """Static URLs in http.url and notify.webhook must be on allow_hosts; a templated host is left to run time."""
    head = "name: t\nvars: {host: x}\nallow_hosts: [ok.example.com, api.example.com:8443]\n"
    errors = spec_errors(steps_yaml("""\
        - {id: a, type: http, url: "https://evil.com/x?q={{ vars.host }}"}
        - {id: b, type: notify, webhook: "https://api.example.com:9000/hook"}
        - {id: c, type: http, url: "https://{{ vars.host }}/x"}
        - {id: d, type: http, url: "http://ok.example.com:81/{{ vars.host }}"}
        - {id: e, type: notify, webhook: "https://api.example.com:8443/x"}
        - {id: f, type: notify, webhook: "ftp://ok.example.com/x"}
        """, head=head))
    assert [(e["line"], e["field"], e["message"]) for e in errors] == [
        (5, "steps[0].url", "host 'evil.com' is not in allow_hosts (add it to allow_hosts)"),
        (6, "steps[1].webhook", "host 'api.example.com:9000' is not in allow_hosts (add it to allow_hosts)"),
        (10, "steps[5].webhook", "'ftp://ok.example.com/x' must be an http:// or https:// URL with a host")]


def test_secrets_only_in_headers() -> None:
    """`secrets` works in http headers and nowhere else."""
    err = one_error(steps_yaml("""\
        - id: a
          type: http
          url: https://ok.example.com/
          headers: {X-Key: "{{ secrets.key }}"}
          body: {key: "{{ secrets.key }}"}
        """))
    assert (err["line"], err["field"]) == (8, "steps[0].body.key")
    assert err["message"] == "secrets may only be used in http headers"


def test_secrets_must_be_named_literally() -> None:
    """Guards the definition-time secret check: a secret chosen by a template (`secrets[inputs.x]`) could not
    be checked before the run, so it is refused; literal names are listed with their field and use."""
    err = one_error(steps_yaml("""\
        - id: a
          type: http
          url: https://ok.example.com/
          headers: {X-Key: "{{ secrets[vars.which] }}"}
        """).replace("steps:", "vars: {which: k}\nsteps:"))
    assert err["field"] == "steps[0].headers.X-Key" and "literally" in err["message"]
    spec = parse_spec(steps_yaml("""\
        - id: a
          type: http
          url: https://ok.example.com/
          headers: {X-Key: "{{ secrets.one }}-{{ secrets['two'] }}"}
        """))
    assert secret_refs(spec) == [("one", "steps[0].headers.X-Key", "http_header"),
                                 ("two", "steps[0].headers.X-Key", "http_header")]


def test_unknown_root_and_unknown_input() -> None:
    """Templates may only use inputs, vars, steps and run; inputs must be in the schema's properties."""
    errors = spec_errors(steps_yaml("- {id: a, type: llm, prompt: '{{ env.HOME }} {{ inputs.nope }}'}\n",
                                    head="name: t\ninputs: {type: object, properties: {company: {}}}\n"))
    messages = sorted(e["message"] for e in errors)
    assert messages[0].startswith("unknown input 'nope'") and messages[1].startswith("unknown variable 'env'")


def test_bad_cron() -> None:
    """Schedule triggers need a valid cron expression (five fields, or six with seconds)."""
    err = one_error("name: t\ntriggers:\n  - {type: schedule, cron: '61 * * * *'}\n"
                    "steps: [{id: a, type: transform, output: 1}]\n")
    assert (err["line"], err["field"]) == (3, "triggers[0].cron") and "cron" in err["message"]
    err = one_error("name: t\ntriggers: [{type: poll}]\nsteps: [{id: a, type: transform, output: 1}]\n")
    assert err["field"] == "triggers[0].type" and "unknown trigger type" in err["message"]


def test_bad_json_schema() -> None:
    """An invalid inputs schema or output_schema is located at the offending node."""
    errors = spec_errors(steps_yaml("- {id: a, type: llm, prompt: hi, output_schema: {type: thing}}\n",
                                    head="name: t\ninputs:\n  type: object\n  properties:\n    n: {type: 12}\n"))
    assert [(e["line"], e["field"]) for e in errors] == [(5, "inputs.properties.n.type"),
                                                         (7, "steps[0].output_schema.type")]
    assert all(e["message"].startswith("invalid JSON Schema") for e in errors)


def test_bad_duration() -> None:
    """Durations accept seconds or s/m/h/d/w suffixes; anything else is a located error."""
    err = one_error(steps_yaml("- {id: a, type: wait, seconds: 5 minutes}\n"))
    assert (err["line"], err["field"]) == (4, "steps[0].seconds") and "invalid duration" in err["message"]
    assert [parse_duration(v) for v in (30, 1.5, "30s", "5m", "4h", "2d", "1w")] == \
        [30.0, 1.5, 30.0, 300.0, 14400.0, 172800.0, 604800.0]
    for bad in ("5x", -1, True, "", None, float("nan")):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_multiple_errors_reported_together() -> None:
    """All problems come back at once, sorted by line, and the detail says how many more."""
    with pytest.raises(SpecError) as info:
        parse_spec(steps_yaml("""\
            - {id: a, type: sql}
            - {id: b, type: llm}
            - {id: B, type: transform, output: 1}
            """, head="name: Bad Name\n"))
    lines = [e["line"] for e in info.value.errors]
    assert len(lines) == 4 and lines == sorted(lines)
    assert info.value.detail.startswith("line 1, column 7: name: ") and info.value.detail.endswith("(and 3 more)")
    body = info.value.to_problem()
    assert body["code"] == "workflow_spec_invalid" and body["status"] == 422 and len(body["errors"]) == 4
    assert "README" in body["fix"]


def test_validate_inputs_names_path() -> None:
    """Inputs that break the schema raise ValidationFailed naming the JSON path of each problem."""
    spec = parse_spec(FULL)
    validate_inputs(spec, {"company": "Acme", "amount": 5})
    with pytest.raises(ValidationFailed) as info:
        validate_inputs(spec, {"company": 7, "amount": "x"})
    assert "$.company" in info.value.detail and "(and 1 more)" in info.value.detail
    assert [e["path"] for e in info.value.ids["errors"]] == ["$.company", "$.amount"]


def test_render_keeps_native_types() -> None:
    """A lone `{{ expr }}` keeps its type; mixed text renders to str; non-strings pass through."""
    ctx = {"inputs": {"n": 3, "d": {"a": [1, 2]}}, "steps": {}}
    assert render("{{ inputs.n }}", ctx) == 3
    assert render(" {{ inputs.d }} ", ctx) == {"a": [1, 2]}
    assert render({"x": ["{{ inputs.n + 1 }}", True, None, 2.5]}, ctx) == {"x": [4, True, None, 2.5]}
    assert render("n={{ inputs.n }}", ctx) == "n=3"
    assert render("{{ inputs.d | tojson }}", ctx) == '{"a": [1, 2]}'
    assert render("x {{ {'é': inputs.n} | tojson }}", ctx) == 'x {"é": 3}'
    assert render("plain", ctx) == "plain"


def test_render_undefined_raises_template_error() -> None:
    """StrictUndefined: an unknown name fails with TemplateError naming the template."""
    for text in ("{{ inputs.missing }}", "x {{ nope }}", "{{ {'a': nope} }}"):
        with pytest.raises(TemplateError) as info:
            render(text, {"inputs": {}})
        assert text[:10] in info.value.detail
        assert "undefined" in info.value.detail or "no attribute 'missing'" in info.value.detail
        assert info.value.status == 422 and info.value.code == "workflow_template_error"


def test_sandbox_blocks_dunder_access() -> None:
    """The sandbox refuses attributes starting with `_`, in lone expressions and in text."""
    for text in ("{{ ''.__class__ }}", "{{ inputs.__class__.__mro__ }}", "a {{ ''.__class__.__mro__ }}"):
        with pytest.raises(TemplateError) as info:
            render(text, {"inputs": {}})
        assert "unsafe" in info.value.detail


def test_truthy_table() -> None:
    """`when`/`if` truthiness: falsy words and empties are false, everything else true."""
    for value in (None, False, 0, 0.0, "", "false", "FALSE", " no ", "0", "None", "null", [], {}):
        assert truthy(value) is False, value
    for value in (True, 1, -1, "yes", "true", "x", [0], {"a": 1}, 0.1):
        assert truthy(value) is True, value


def test_template_refs() -> None:
    """template_refs returns roots and the step ids a template reads; bad syntax raises."""
    text = "{{ steps.enrich.output.x }} {{ steps['docs'].output }} {{ inputs.company }}" \
           "{% for r in vars.rows %}{{ loop.index }}{{ r }}{% endfor %}{{ range(2) | list }}"
    assert template_refs(text) == {("steps", "enrich"), ("steps", "docs"), ("inputs",), ("vars",)}
    assert template_refs("{% set x = 1 %}{{ x }}{{ run.id }}") == {("run",)}
    with pytest.raises(jinja2.TemplateSyntaxError):
        template_refs("{{ x ")
