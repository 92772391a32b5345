"""The policy file schema (`policy.yaml`), parsed and validated with field-level errors and line numbers.

Actions only ever tighten as layers combine (base guards → risk tier → classification → use case):
the strictest wins, so a caller-chosen `metadata.use_case` can add controls but never remove one.
"""

from __future__ import annotations

from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from keel.core import yamlsafe
from keel.core.errors import BadRequest

Action = Literal["allow", "redact", "review", "block"]
InjectionAction = Literal["allow", "review", "block"]
ContextAction = Literal["allow", "quote", "drop", "block"]
ContextDataAction = Literal["allow", "redact", "block"]
Risk = Literal["low", "medium", "high"]

STRICTNESS = {"allow": 0, "redact": 1, "quote": 1, "drop": 2, "review": 2, "block": 3}
GUARD_NAMES = ("pii", "secrets", "injection")


class PolicyInvalid(BadRequest):
    """A policy file does not parse or validate; `errors` lists each field, line and message."""

    code, title = "policy_invalid", "Invalid policy"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputGuards(_Strict):
    """Guards on what the caller sends (all messages except tool outputs)."""

    pii: Action | None = None
    secrets: Action | None = None
    injection: InjectionAction | None = Field(default=None, description="user messages only")


class OutputGuards(_Strict):
    """Guards on what the model answers, before the caller (or a reviewer) sees it."""

    pii: Action | None = None
    secrets: Action | None = None


class ContextGuards(_Strict):
    """Guards on retrieved passages and tool outputs: `quote` marks them inert data, `drop` removes them."""

    injection: ContextAction | None = None
    pii: ContextDataAction | None = None
    secrets: ContextDataAction | None = None


class GuardSet(_Strict):
    input: InputGuards = Field(default_factory=InputGuards)
    output: OutputGuards = Field(default_factory=OutputGuards)
    context: ContextGuards = Field(default_factory=ContextGuards)


class DataRule(_Strict):
    """Data at `classification` *or higher* may only go to deployments matched here."""

    name: str = Field(min_length=1, max_length=100)
    classification: str
    providers: list[str] = Field(default_factory=list, description="provider names, e.g. local, local_embed")
    deployments: list[str] = Field(default_factory=list, description="deployment id or alias globs, e.g. eu-gpt/*")
    description: str = ""


class Retention(_Strict):
    """Days to keep stored prompts/outputs (review items); `null` keeps them, 0 stores none after decision."""

    prompts_days: int | None = Field(default=None, ge=0)
    outputs_days: int | None = Field(default=None, ge=0)


class RiskTier(_Strict):
    guards: GuardSet = Field(default_factory=GuardSet)
    review: bool = Field(default=False, description="hold every output for a human reviewer")
    retention: Retention = Field(default_factory=Retention)


class UseCase(_Strict):
    risk: Risk
    guards: GuardSet = Field(default_factory=GuardSet)
    review: bool = False
    description: str = ""
    injection: "InjectionSettings | None" = Field(default=None, description="injection thresholds for this use case, "
                                                                           "over the policy's")


class PiiSettings(_Strict):
    entities: list[Literal["email", "phone", "credit_card", "iban", "ssn", "ip_address"]] = Field(
        default_factory=lambda: ["email", "phone", "credit_card", "iban", "ssn", "ip_address"])
    restore: bool = Field(default=True, description="put redacted values back into the response for the caller")


class InjectionSettings(_Strict):
    threshold: float | None = Field(default=None, gt=0, lt=1, description="default: the model's validated threshold")
    direct: float | None = Field(default=None, gt=0, lt=1, description="threshold for user messages (the direct "
                                                                      "channel); default: `threshold`, else the model's")
    indirect: float | None = Field(default=None, gt=0, lt=1, description="threshold for retrieved passages and tool "
                                                                          "outputs; default: `threshold`, else the model's")

    def thresholds(self) -> dict[str, float]:
        """The per-channel thresholds this sets (a channel it leaves alone is absent)."""
        out = {c: self.threshold for c in ("direct", "indirect")} if self.threshold is not None else {}
        out.update({c: v for c, v in (("direct", self.direct), ("indirect", self.indirect)) if v is not None})
        return out


class ReviewSettings(_Strict):
    webhook_url: str | None = Field(default=None, description="notified of every decision")
    caller_webhook_prefixes: list[str] = Field(
        default_factory=list, description="URL prefixes a caller may name in metadata.review_webhook")
    timeout_s: float = Field(default=5.0, gt=0, le=60)


class TraceSettings(_Strict):
    """What trace spans may carry beyond ids, models, counts and timings."""

    content: bool = Field(default=False, description="record prompt and completion text in spans, as the "
                                                      "guards left it (redacted, never restored)")
    max_classification: str | None = Field(default=None, description="record content only for calls classified "
                                                                      "at or below this level; default: any level")


class Policy(_Strict):
    name: str = "default"
    classifications: list[str] = Field(default_factory=lambda: ["public", "internal", "confidential", "restricted"],
                                       min_length=1, description="lowest to highest")
    default_classification: str = "internal"
    data_rules: list[DataRule] = Field(default_factory=list)
    guards: GuardSet = Field(default_factory=GuardSet)
    classification_guards: dict[str, GuardSet] = Field(default_factory=dict)
    risk_tiers: dict[Risk, RiskTier] = Field(default_factory=dict)
    default_risk: Risk = "low"
    use_cases: dict[str, UseCase] = Field(default_factory=dict)
    pii: PiiSettings = Field(default_factory=PiiSettings)
    injection: InjectionSettings = Field(default_factory=InjectionSettings)
    reviews: ReviewSettings = Field(default_factory=ReviewSettings)
    traces: TraceSettings = Field(default_factory=TraceSettings)

    def semantic_errors(self) -> list[tuple[tuple[Any, ...], str]]:
        """Cross-field checks pydantic cannot express, as (path, message)."""
        errs: list[tuple[tuple[Any, ...], str]] = []
        known = set(self.classifications)
        allowed = ", ".join(self.classifications)
        if len(known) != len(self.classifications):
            errs.append((("classifications",), "names must be unique"))
        if self.default_classification not in known:
            errs.append((("default_classification",), f"unknown classification; allowed: {allowed}"))
        seen: set[str] = set()
        for i, rule in enumerate(self.data_rules):
            if rule.classification not in known:
                errs.append((("data_rules", i, "classification"),
                             f"unknown classification {rule.classification!r}; allowed: {allowed}"))
            if rule.name in seen:
                errs.append((("data_rules", i, "name"), f"rule name {rule.name!r} is used twice"))
            seen.add(rule.name)
        mc = self.traces.max_classification
        if mc is not None and mc not in known:
            errs.append((("traces", "max_classification"), f"unknown classification; allowed: {allowed}"))
        for name in self.classification_guards:
            if name not in known:
                errs.append((("classification_guards", name), f"unknown classification; allowed: {allowed}"))
        for name, uc in self.use_cases.items():
            if uc.risk not in self.risk_tiers and uc.risk != "low":
                errs.append((("use_cases", name, "risk"), f"risk tier {uc.risk!r} is not defined in risk_tiers"))
        return errs


def _line_of(root: yaml.Node | None, path: tuple[Any, ...]) -> int | None:
    """1-based line of the YAML node at `path` (or its nearest existing parent)."""
    node, line = root, (root.start_mark.line + 1) if root is not None else None
    for part in path:
        nxt = None
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if str(k.value) == str(part):
                    nxt = v
                    break
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            nxt = node.value[part]
        if nxt is None:
            break
        node, line = nxt, nxt.start_mark.line + 1
    return line


def _field(path: tuple[Any, ...]) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(root)"


def parse_policy(text: str, source: str = "policy.yaml") -> Policy:
    """Parse and validate; raises `PolicyInvalid` whose `errors` name field, line and problem."""
    try:
        root = yamlsafe.compose(text)  # alias bombs and deep nesting are refused before anything walks them
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else None
        raise PolicyInvalid(f"{source}:{line or '?'}: not valid YAML: {getattr(exc, 'problem', exc)}",
                            fix="fix the YAML syntax", errors=[{"field": "(root)", "line": line,
                                                                 "message": "not valid YAML"}]) from None
    if not isinstance(data, dict):
        raise PolicyInvalid(f"{source}: a policy must be a mapping", fix="start with `name: …` and `data_rules:`",
                            errors=[{"field": "(root)", "line": 1, "message": "must be a mapping"}])
    problems: list[tuple[tuple[Any, ...], str]] = []
    policy: Policy | None = None
    try:
        policy = Policy.model_validate(data)
    except ValidationError as exc:
        for e in exc.errors():
            msg = e["msg"]
            if e["type"] == "extra_forbidden":
                msg = "unknown field"
            problems.append((tuple(e["loc"]), f"{msg} (got {e.get('input')!r})"[:300]))
    if policy is not None:
        problems += policy.semantic_errors()
    if problems:
        errors = [{"field": _field(p), "line": _line_of(root, p), "message": m} for p, m in problems]
        summary = "; ".join(f"{source}:{e['line']}: {e['field']}: {e['message']}" for e in errors[:8])
        raise PolicyInvalid(f"policy is invalid: {summary}", fix="correct the named fields", errors=errors)
    assert policy is not None
    return policy


DEFAULT_POLICY = """\
# Keel's built-in policy, used when no policy file is configured (KEEL_POLICY_FILE).
name: keel-default
classifications: [public, internal, confidential, restricted]   # lowest to highest
default_classification: internal
data_rules:
  - name: restricted-local-only
    classification: restricted          # this level and above
    providers: [local, local_embed]
    description: restricted data never leaves this machine
guards:
  input:   {pii: allow, secrets: redact, injection: allow}
  output:  {pii: allow, secrets: redact}
  context: {injection: quote}
risk_tiers:
  low:    {}
  medium: {guards: {input: {pii: redact, injection: block}}}
  high:   {guards: {input: {pii: redact, injection: block}, output: {pii: redact}}, review: true}
default_risk: low
"""
