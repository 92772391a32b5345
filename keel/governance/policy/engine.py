"""Policy decisions: a call's classification, the deployments it may reach, and its guard actions.

    >>> from keel.governance.policy.model import DEFAULT_POLICY, parse_policy
    >>> engine = PolicyEngine(parse_policy(DEFAULT_POLICY), version=1)
    >>> engine.decide(team="internal", explicit="restricted").classification
    'restricted'
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

from keel.core.errors import BadRequest, Forbidden
from keel.core.settings import DeploymentConfig
from keel.governance.policy.model import STRICTNESS, DataRule, GuardSet, Policy, Retention


class PolicyDenied(Forbidden):
    """The policy forbids this data to reach any deployment behind the requested model."""

    code, title = "policy_denied", "Denied by policy"


@dataclass
class Decision:
    """What the policy says about one call; recorded with the policy version that made it."""

    policy_version: int
    classification: str
    reasons: list[str]
    use_case: str | None
    risk: str
    guards: dict[str, dict[str, str]]
    review: bool
    retention: Retention
    rules: list[DataRule] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"policy_version": self.policy_version, "classification": self.classification,
                "because": self.reasons, "use_case": self.use_case, "risk": self.risk, "review": self.review,
                "rules": [r.name for r in self.rules], "guards": self.guards}


def _stricter(a: str | None, b: str | None) -> str | None:
    if a is None:
        return b
    if b is None:
        return a
    return a if STRICTNESS[a] >= STRICTNESS[b] else b


def _merge(into: dict[str, dict[str, str]], layer: GuardSet) -> None:
    for side in ("input", "output", "context"):
        for name, action in getattr(layer, side).model_dump().items():
            merged = _stricter(into[side].get(name), action)
            if merged is not None:
                into[side][name] = merged


class PolicyEngine:
    """Evaluates one validated policy version. Instances are immutable; reloads swap the engine."""

    def __init__(self, policy: Policy, version: int) -> None:
        self.policy = policy
        self.version = version
        self._rank = {c: i for i, c in enumerate(policy.classifications)}
        # What follows from (classification, use case) alone: guards, risk, review, retention, rules. The
        # engine is immutable, so it is worked out once per pair; decisions share it and never change it.
        self._derived: dict[tuple[str, str | None], tuple[Any, ...]] = {}

    def rank(self, classification: str) -> int:
        return self._rank[classification]

    def check_classification(self, value: Any, where: str) -> str:
        if not isinstance(value, str):
            raise BadRequest(f"{where} must be a string, not {type(value).__name__}",
                             fix=f"use one of: {', '.join(self.policy.classifications)}")
        if value not in self._rank:
            raise BadRequest(f"{where} {value[:200]!r} is not a classification of policy version {self.version}",
                             fix=f"use one of: {', '.join(self.policy.classifications)}", classification=value[:200])
        return value

    def decide(self, *, team: str | None = None, explicit: Any = None,
               collections: list[dict[str, Any]] | None = None, use_case: str | None = None) -> Decision:
        """The highest of team default, explicit `metadata.classification` and every collection used."""
        if use_case is not None and not isinstance(use_case, str):
            raise BadRequest(f"metadata.use_case must be a string, not {type(use_case).__name__}",
                             fix="name a use case of the policy, e.g. \"metadata\": {\"use_case\": \"support-reply\"}")
        candidates = [(self.policy.default_classification, "policy default")]
        if team:
            candidates.append((team if team in self._rank else self.policy.default_classification,
                               f"team default {team}"))
        if explicit is not None:
            candidates.append((self.check_classification(explicit, "metadata.classification"),
                               "metadata.classification"))
        for col in collections or []:
            c = col.get("classification")
            if c is not None:
                label = self.check_classification(c, f"collection {col.get('id')}")
                candidates.append((label, f"collection {col.get('id')}"))
        top = max(self._rank[c] for c, _ in candidates)
        level = self.policy.classifications[top]
        reasons = [why for c, why in candidates if self._rank[c] == top]
        derived = self._derived.get((level, use_case))
        if derived is None:
            if len(self._derived) > 10_000:  # use cases are free text from callers: bound the memo
                self._derived.clear()
            derived = self._derived[(level, use_case)] = self._derive(level, use_case, top)
        uc_name, risk, guards, review, retention, rules = derived
        return Decision(self.version, level, reasons, uc_name, risk, guards, review, retention, rules)

    def _derive(self, level: str, use_case: str | None, top: int) -> tuple[Any, ...]:
        uc = self.policy.use_cases.get(use_case or "")
        risk = uc.risk if uc else self.policy.default_risk
        tier = self.policy.risk_tiers.get(risk)  # type: ignore[call-overload]
        guards: dict[str, dict[str, str]] = {"input": {}, "output": {}, "context": {}}
        _merge(guards, self.policy.guards)
        if tier:
            _merge(guards, tier.guards)
        if level in self.policy.classification_guards:
            _merge(guards, self.policy.classification_guards[level])
        if uc:
            _merge(guards, uc.guards)
        rules = [r for r in self.policy.data_rules if self._rank[r.classification] <= top]
        return (use_case if uc else None, risk, guards, bool((tier and tier.review) or (uc and uc.review)),
                tier.retention if tier else Retention(), rules)

    @staticmethod
    def rule_allows(rule: DataRule, cfg: DeploymentConfig) -> bool:
        if cfg.provider in rule.providers:
            return True
        did = cfg.deployment_id()
        return any(fnmatch.fnmatchcase(did, p) or fnmatch.fnmatchcase(cfg.alias, p) for p in rule.deployments)

    def forbidding_rule(self, decision: Decision, cfg: DeploymentConfig) -> DataRule | None:
        """The first rule that keeps this call's data away from `cfg`, or None if it may go there."""
        for rule in decision.rules:
            if not self.rule_allows(rule, cfg):
                return rule
        return None

    def allowed(self, decision: Decision, candidates: list[DeploymentConfig]) -> list[DeploymentConfig]:
        """The candidates this call may reach — what the router must choose from, fallbacks included."""
        return [c for c in candidates if self.forbidding_rule(decision, c) is None]

    def deny(self, decision: Decision, alias: str, candidates: list[DeploymentConfig]) -> PolicyDenied:
        rule = self.forbidding_rule(decision, candidates[0])
        assert rule is not None
        where = ", ".join(rule.providers + rule.deployments) or "nowhere"
        return PolicyDenied(
            f"policy rule {rule.name!r} (version {self.version}) forbids {decision.classification} data "
            f"({'; '.join(decision.reasons)}) from reaching model {alias!r}: its deployments "
            f"{', '.join(c.deployment_id() for c in candidates)} are not allowed; allowed: {where}",
            fix=f"use a model served by {where}, or lower the data's classification if it is wrong",
            rule=rule.name, policy_version=self.version, classification=decision.classification, model=alias)

    def explain(self, decision: Decision, alias: str, candidates: list[DeploymentConfig]) -> dict[str, Any]:
        """`keel policy test`: would the call be allowed, where could it go, and why."""
        verdicts = []
        for c in candidates:
            rule = self.forbidding_rule(decision, c)
            verdicts.append({"deployment": c.deployment_id(), "provider": c.provider, "allowed": rule is None,
                             "denied_by": rule.name if rule else None})
        allowed = any(v["allowed"] for v in verdicts)
        out = {"allowed": allowed, "model": alias, "deployments": verdicts, **decision.summary()}
        if candidates and not allowed:
            out["denial"] = self.deny(decision, alias, candidates).detail
        if not candidates:
            out["allowed"] = False
            out["denial"] = f"model {alias!r} has no deployments"
        return out

