"""The two governance stages on the gateway's path: policy (where data may go) and guards (what is in it).

Both implement the gateway's `Stage` protocol; the app factory puts them in front of the router.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

from keel.core.errors import KeelError
from keel.core.settings import DeploymentConfig
from keel.gateway.cache.stage import merge_tool_calls
from keel.gateway.pipeline import Call, Next
from keel.gateway.protocol import ChatDelta
from keel.governance import guards as guard_registry
from keel.governance.audit import AuditLog
from keel.governance.events import GuardEventLog
from keel.governance.guards.base import Guard, Placeholders
from keel.governance.guards.runner import CallGuards, GuardBlocked
from keel.governance.guards.verdicts import CleanVerdicts
from keel.governance.policy.engine import Decision, PolicyEngine
from keel.governance.policy.loader import PolicySource
from keel.governance.reviews import ReviewPending, ReviewQueue
from keel.governance.teams import TeamClassifications
from keel.observe.spans import TracedGuard
from keel.observe.tracing import annotate

log = logging.getLogger("keel.governance")
_TYPED = ("tools", "tool_choice", "response_format", "stop")  # ChatRequest's own fields, sent on top of the body
_NOT_DATA = frozenset({"messages", "model", "keel", *_TYPED})  # guarded apart, routing, or never sent


async def audit_call(audit: AuditLog, action: str, call: Call, **details: Any) -> None:
    """Record `action` for `call` in the audit log, off the event loop."""
    await asyncio.to_thread(audit.record, action, call.principal.key_id, call.principal.team_id,
                            request_id=call.request_id, **details)


class PolicyGuards:
    """The guard instances the current policy version configures, rebuilt when the policy changes."""

    def __init__(self) -> None:
        self._built: tuple[int, dict[str, Guard]] | None = None
        self._by_use_case: dict[str, dict[str, Guard]] = {}
        self.verdicts = CleanVerdicts()  # the clean scans of these guard objects: new ones start a new set

    def for_engine(self, engine: PolicyEngine, use_case: str | None = None) -> dict[str, Guard]:
        """The guards for calls under `engine`'s policy; a use case that sets its own injection thresholds
        gets an injection guard with them (over the policy's, channel by channel)."""
        p = engine.policy
        if self._built is None or self._built[0] != engine.version:
            self._by_use_case = {}
            self.verdicts = CleanVerdicts()
            self._built = (engine.version, {  # each scan a span when the call is traced
                "pii": TracedGuard(guard_registry.build("pii", entities=p.pii.entities)),
                "secrets": TracedGuard(guard_registry.build("secrets")),
                "injection": TracedGuard(guard_registry.build("injection", thresholds=p.injection.thresholds())),
            })
        uc = p.use_cases.get(use_case) if use_case else None
        if uc is None or uc.injection is None:
            return self._built[1]
        if use_case not in self._by_use_case:
            thresholds = {**p.injection.thresholds(), **uc.injection.thresholds()}
            self._by_use_case[use_case] = {**self._built[1], "injection": TracedGuard(
                guard_registry.build("injection", thresholds=thresholds))}
        return self._by_use_case[use_case]


class PolicyStage:
    """Classifies the call and refuses it with 403 `policy_denied` (naming the rule) when no deployment
    of the requested model may receive its data; the router's `allow` hook (`Governance.allow`) then
    keeps every try, fallbacks included, on deployments the same decision allows."""

    changes_answer = True  # the tripwire refuses an answer served where the policy forbids it

    def __init__(self, policy: PolicySource, teams: TeamClassifications,
                 candidates: Callable[[str], list[DeploymentConfig]], audit: AuditLog) -> None:
        self.policy = policy
        self.teams = teams
        self.candidates = candidates
        self.audit = audit

    async def handle(self, call: Call, nxt: Next) -> Any:
        engine = self.policy.engine
        collections = call.annotations.get("collections") or []
        decision = engine.decide(team=await self.teams.get(call.principal.team_id),
                                 explicit=call.metadata.get("classification"), collections=collections,
                                 use_case=call.metadata.get("use_case"))
        call.annotations["policy_decision"] = decision
        call.metadata["keel_policy"] = {"version": decision.policy_version, "classification": decision.classification,
                                        "risk": decision.risk}
        traces = engine.policy.traces
        call.annotations["trace_content"] = traces.content and (
            traces.max_classification is None
            or engine.rank(decision.classification) <= engine.rank(traces.max_classification))
        annotate({"keel.policy.version": decision.policy_version, "keel.classification": decision.classification,
                  "keel.risk": decision.risk, "keel.use_case": decision.use_case})
        candidates = self.candidates(call.alias)
        if candidates and decision.rules and not engine.allowed(decision, candidates):
            err = engine.deny(decision, call.alias, candidates)
            await audit_call(self.audit, "policy.deny", call, rule=err.ids["rule"], model=call.alias,
                                       classification=decision.classification, because=decision.reasons,
                                       policy_version=decision.policy_version)
            raise err
        sensitive = self._sensitive(engine, collections) if collections else None
        if sensitive:
            await audit_call(self.audit, "data.access", call, collections=sensitive, model=call.alias,
                                       classification=decision.classification,
                                       policy_version=decision.policy_version)
        if not decision.rules:
            call.release_answer(self)  # no rule: the tripwire below has nothing to refuse
        result = await nxt(call)
        self._tripwire(call, decision)
        return result

    @staticmethod
    def _sensitive(engine: Any, collections: list[dict[str, Any]]) -> list[Any]:
        """The ids of the collections classified confidential or above (the top level if there is none)."""
        levels = engine.policy.classifications
        audited_from = engine.rank("confidential" if "confidential" in levels else levels[-1])
        return [c.get("id") for c in collections
                if c.get("classification") in levels and engine.rank(c["classification"]) >= audited_from]

    def _tripwire(self, call: Call, decision: Decision) -> None:
        """Defence in depth: a router that ignored the filter is caught, logged and audited."""
        cfg = call.deployment
        if cfg is None or not decision.rules:
            return
        rule = self.policy.engine.forbidding_rule(decision, cfg)
        if rule is not None:
            log.error("call served by a deployment the policy forbids",
                      extra={"deployment": cfg.deployment_id(), "rule": rule.name})
            self.audit(action="policy.violation", actor=call.principal.key_id, team_id=call.principal.team_id,
                       request_id=call.request_id, deployment=cfg.deployment_id(), rule=rule.name)
            raise self.policy.engine.deny(decision, call.alias, [cfg])


class GuardStage:
    """Runs the guards the decision names on the messages, passages, tool outputs and the answer;
    holds answers for review (202) and records every finding as type + span."""

    changes_answer = True  # output guards redact, block or hold the answer

    def __init__(self, policy: PolicySource, guards: PolicyGuards, secret: bytes, reviews: ReviewQueue,
                 events: GuardEventLog, audit: AuditLog) -> None:
        self.policy = policy
        self.guards = guards
        self.secret = secret  # the placeholders' HMAC key; placeholders never outlive one process
        self.reviews = reviews
        self.events = events
        self.audit = audit

    async def handle(self, call: Call, nxt: Next) -> Any:
        if call.kind != "chat" or call.chat is None:
            return await nxt(call)
        decision: Decision = call.annotations.get("policy_decision") or self.policy.engine.decide(
            explicit=call.metadata.get("classification"), use_case=call.metadata.get("use_case"))
        if not decision.review and not any(decision.guards.values()):
            call.release_answer(self)  # no guard on any side and no review: nothing to scan, hold or record
            return await nxt(call)
        engine = self.policy.engine
        guards = self.guards.for_engine(engine, decision.use_case)
        cg = CallGuards(guards, decision.guards, Placeholders(self.secret, call.principal.key_id),
                        engine.policy.pii.restore, self.guards.verdicts, _verdict_scope(call))
        try:
            messages = cg.guard_messages(call.chat.messages, call.annotations.get("passages") or [])
            self._guard_request_fields(call, cg)
        except GuardBlocked as exc:
            await self._blocked(call, cg, decision, exc)
            raise
        if messages != call.chat.messages:
            call.chat.messages = messages
            call.chat.body["messages"] = messages
        held = decision.review or bool(cg.review_reasons)
        if call.stream:
            inner = await nxt(call)
            if held or "review" in decision.guards.get("output", {}).values():
                return self._buffered_stream(call, cg, decision, inner)
            if not decision.guards.get("output") and not cg.placeholders.values:
                self._record(call, cg, decision)
                return inner
            return self._guarded_stream(call, cg, decision, inner)
        result = await nxt(call)
        call.usage = result.usage
        try:
            content = cg.guard_output(result.content)
            tool_calls = cg.guard_tool_calls(result.tool_calls)
        except GuardBlocked as exc:
            await self._blocked(call, cg, decision, exc)
            raise
        if held or cg.review_reasons:
            await self._hold(call, cg, decision, content, result.finish_reason, tool_calls)
        call.annotations["output_guarded"] = content  # what traces may show: the caller's values not put back
        result.content = cg.restore(content)
        result.tool_calls = cg.restore_tool_calls(tool_calls)
        self._record(call, cg, decision)
        return result

    @staticmethod
    def _guard_request_fields(call: Call, cg: CallGuards) -> None:
        """Every other string that leaves for the upstream — tools (names, descriptions, parameter schemas),
        tool_choice, response_format, stop, keys Keel does not know — guarded as the caller's input."""
        chat = call.chat
        assert chat is not None
        for key in _TYPED:
            value = getattr(chat, key)
            if value is not None:
                guarded = cg.guard_value(value, key)
                if guarded is not value:
                    setattr(chat, key, guarded)
                    if key in chat.body:
                        chat.body[key] = guarded
        rest = cg.guard_value(chat.body, "", skip=_NOT_DATA)
        if rest is not chat.body:
            chat.body = rest

    # -- streams ----------------------------------------------------------------------------
    async def _guarded_stream(self, call: Call, cg: CallGuards, decision: Decision,
                              inner: AsyncIterator[Any]) -> AsyncIterator[Any]:
        sf = cg.stream_filter()
        tf = cg.tool_call_filter()
        try:
            async for delta in inner:
                text = sf.feed(delta.content) if delta.content else delta.content
                calls = tf.feed(delta.tool_calls) if delta.tool_calls else delta.tool_calls
                if delta.finish_reason is not None:
                    text = (text or "") + sf.finish()
                    calls = (calls or []) + tf.finish() or None
                if text != delta.content or calls is not delta.tool_calls:
                    delta = replace(delta, content=text, tool_calls=calls)
                yield delta
            tail, calls = sf.finish(), tf.finish()
            if tail or calls:
                yield ChatDelta(content=tail or None, tool_calls=calls or None)
        except GuardBlocked as exc:
            await self._blocked(call, cg, decision, exc)
            raise
        except KeelError:
            tail = sf.finish()  # the upstream failed mid-stream: release the guarded tail, then the error
            if tail:
                yield ChatDelta(content=tail)
            raise
        finally:
            await _aclose(inner)
            self._record(call, cg, decision)

    async def _buffered_stream(self, call: Call, cg: CallGuards, decision: Decision,
                               inner: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """Reads the whole answer first; if it must be reviewed, answers 202 before the first byte (the
        route turns the error into a status), else releases it as one delta."""
        parts: list[str] = []
        calls: dict[int, dict[str, Any]] = {}
        finish = "stop"
        try:
            async for delta in inner:
                if delta.content:
                    parts.append(delta.content)
                if delta.tool_calls:
                    merge_tool_calls(calls, delta.tool_calls)
                if delta.usage is not None:
                    call.usage = delta.usage
                if delta.finish_reason:
                    finish = delta.finish_reason
        finally:
            await _aclose(inner)
        try:
            content = cg.guard_output("".join(parts))
            tool_calls = cg.guard_tool_calls([calls[i] for i in sorted(calls)] or None)
        except GuardBlocked as exc:
            await self._blocked(call, cg, decision, exc)
            raise
        if decision.review or cg.review_reasons:
            await self._hold(call, cg, decision, content, finish, tool_calls)
        self._record(call, cg, decision)
        restored = cg.restore_tool_calls(tool_calls)
        yield ChatDelta(role="assistant", content=cg.restore(content) or "", finish_reason=finish, usage=call.usage,
                        tool_calls=[{"index": i, **tc} for i, tc in enumerate(restored)] if restored else None)

    # -- outcomes ---------------------------------------------------------------------------
    async def _hold(self, call: Call, cg: CallGuards, decision: Decision, content: str | None,
                    finish_reason: str, tool_calls: Any) -> None:
        reasons = (["policy: review required for risk tier " + decision.risk] if decision.review else [])
        reasons += cg.review_reasons
        hook = call.metadata.get("review_webhook")
        prefixes = self.policy.engine.policy.reviews.caller_webhook_prefixes
        webhook = hook if isinstance(hook, str) and any(hook.startswith(p) for p in prefixes) else None
        retention = decision.retention
        days = min([d for d in (retention.prompts_days, retention.outputs_days) if d is not None], default=None)
        row = await asyncio.to_thread(
            self.reviews.create, request_id=call.request_id, principal=call.principal, alias=call.alias,
            deployment=call.deployment.deployment_id() if call.deployment else None, use_case=decision.use_case,
            classification=decision.classification, reasons=reasons,
            messages=call.chat.messages if call.chat else [],
            output={"role": "assistant", "content": content, "finish_reason": finish_reason,
                    "tool_calls": tool_calls}, policy_version=decision.policy_version, webhook_url=webhook,
            retain_days=days)
        self._record(call, cg, decision)
        await audit_call(self.audit, "review.hold", call, review_id=row["id"], reasons=reasons[:20],
                                   policy_version=decision.policy_version)
        raise ReviewPending(f"the answer to request {call.request_id} is held for human review as {row['id']}",
                            fix=f"poll GET /v1/reviews/{row['id']}" + (" or wait for the webhook" if webhook else ""),
                            review_id=row["id"], review_status="pending", poll=f"/v1/reviews/{row['id']}",
                            headers={"location": f"/v1/reviews/{row['id']}"})

    async def _blocked(self, call: Call, cg: CallGuards, decision: Decision, exc: GuardBlocked) -> None:
        self._record(call, cg, decision)
        await audit_call(self.audit, "guard.block", call, side=exc.ids.get("side"), findings=exc.ids.get("findings"),
                                   policy_version=decision.policy_version)

    def _record(self, call: Call, cg: CallGuards, decision: Decision) -> None:
        if not cg.events:
            return
        events = [e.to_dict() for e in cg.events]
        cg.events = []
        call.annotations.setdefault("guard_events", []).extend(events)
        counts: dict[str, int] = call.metadata.setdefault("keel_guards", {})
        for e in events:
            key = f"{e['guard']}.{e['type']}"
            counts[key] = counts.get(key, 0) + 1
        self.events.record(call.request_id, call.principal.key_id, call.principal.team_id,
                               decision.policy_version, events)


def _verdict_scope(call: Call) -> str:
    """Whose clean verdicts a call reuses: its team's, or its key's without a team (shared wider, the time a
    skipped scan saves would tell one team whether another sent a given text)."""
    p = call.principal
    return f"team:{p.team_id}" if p.team_id else f"key:{p.key_id}"


async def _aclose(it: Any) -> None:
    close = getattr(it, "aclose", None)
    if close is not None:
        await close()
