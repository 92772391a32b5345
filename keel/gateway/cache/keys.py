"""What the cache may do with one chat call, and the keys it files answers under.

The mode comes from the alias (`aliases.<alias>.cache.mode`) unless the request overrides it with
`"keel": {"cache": "exact" | "semantic" | "off" | "force"}`:

- `exact` answers only a byte-for-byte equal normalised request, and only at `temperature == 0`.
- `semantic` answers a request whose last user turn means the same (cosine similarity of its
  embedding ≥ the alias's threshold) *and* whose context is equal: system prompt, earlier turns,
  response_format, stop and max_tokens (hashed into a "partition"). Never used with tools.
- `force` uses the alias's mode (exact when the alias has none) at any temperature; a forced
  exact cache also stores and answers tool calls. A forced request with tools on a semantic alias
  falls back to exact, because a semantic match cannot tell which tool result fits.
- `off` skips the cache for this request.

Every key includes the caller's scope — its team, or its key when it has no team — so no
answer ever crosses a team boundary, exact or semantic.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import orjson

from keel.core.errors import BadRequest
from keel.core.settings import CacheConfig, Settings
from keel.gateway.protocol import ChatRequest
from keel.identity.principal import Principal

REQUEST_MODES = ("exact", "semantic", "off", "force")
# Body fields that never change the answer (or are keyed through the typed fields instead).
_NOT_KEYED = {"model", "messages", "stream", "stream_options", "keel", "metadata", "user", "max_tokens",
              "max_completion_tokens", "temperature", "top_p", "stop", "seed", "tools", "tool_choice",
              "response_format"}
_DEFAULT = CacheConfig()


@dataclass(frozen=True)
class Plan:
    """How the cache treats one call: `mode` is "exact" or "semantic"."""

    mode: str
    forced: bool
    ttl_s: float
    threshold: float
    embedding_alias: str

    @property
    def storable_finishes(self) -> frozenset[str]:
        return frozenset({"stop", "length", "tool_calls"} if self.forced else {"stop", "length"})


def plan_for(alias: str, req: ChatRequest, settings: Settings) -> Plan | None:
    """The cache plan for a chat request, or None when the cache must not touch it."""
    alias_cfg = settings.aliases.get(alias)
    cfg = alias_cfg.cache if alias_cfg is not None else _DEFAULT
    wanted = (req.body.get("keel") or {}).get("cache") if isinstance(req.body.get("keel"), dict) else None
    if wanted is not None and wanted not in REQUEST_MODES:
        raise BadRequest(f"unknown cache option {wanted!r} in `keel.cache`",
                         fix=f"use one of: {', '.join(REQUEST_MODES)}, or leave it out", model=alias)
    forced = wanted == "force"
    if wanted == "off" or (wanted is None and cfg.mode == "off"):
        return None
    mode = wanted if wanted in ("exact", "semantic") else (cfg.mode if cfg.mode != "off" else "exact")
    if req.tools:
        if not forced:
            return None
        mode = "exact"
    if mode == "exact" and not forced and (req.temperature is None or req.temperature != 0):
        return None
    return Plan(mode=mode, forced=forced, ttl_s=cfg.ttl_s, threshold=cfg.similarity_threshold,
                embedding_alias=cfg.embedding_alias)


def scope_of(p: Principal) -> str:
    """The boundary no cached answer crosses: the team, or the key when it has no team."""
    return f"team:{p.team_id}" if p.team_id else f"key:{p.key_id}"


def _digest(doc: Any) -> str:
    return hashlib.sha256(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def normalise_message(m: dict[str, Any]) -> dict[str, Any]:
    """A message without null fields, a single text part written as a plain string."""
    out = _drop_none(m)
    content = out.get("content")
    if (isinstance(content, list) and len(content) == 1 and isinstance(content[0], dict)
            and content[0].get("type") == "text" and isinstance(content[0].get("text"), str)):
        out["content"] = content[0]["text"]
    return out


def _num(x: float | None) -> float | None:
    return None if x is None else float(x)


def _extras(req: ChatRequest) -> dict[str, Any]:
    return _drop_none({k: v for k, v in req.body.items() if k not in _NOT_KEYED})


def exact_key(scope: str, alias: str, req: ChatRequest) -> str:
    """sha256 of the canonical JSON of everything that shapes the answer, plus scope and alias."""
    return _digest({
        "scope": scope, "alias": alias, "messages": [normalise_message(m) for m in req.messages],
        **_drop_none({"tools": req.tools, "tool_choice": req.tool_choice, "response_format": req.response_format,
                      "temperature": _num(req.temperature), "top_p": _num(req.top_p), "max_tokens": req.max_tokens,
                      "stop": req.stop or None, "seed": req.seed}),
        "extra": _extras(req),
    })


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p["text"] for p in content
                         if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str))
    return ""


def semantic_key(alias: str, req: ChatRequest) -> tuple[str, str] | None:
    """(partition hash, last user turn's text), or None when the last message is not a user's text.

    The partition holds everything but the last user turn that shapes the answer: the system
    prompt, earlier turns, response_format, stop, max_tokens. Only answers in the same partition
    (and scope) are compared by meaning.
    """
    messages = req.messages
    if not messages or messages[-1].get("role") != "user":
        return None
    text = _text(messages[-1].get("content")).strip()
    if not text:
        return None
    partition = _digest({
        "alias": alias, "context": [normalise_message(m) for m in messages[:-1]],
        **_drop_none({"response_format": req.response_format, "max_tokens": req.max_tokens,
                      "stop": req.stop or None}),
        "extra": {k: v for k, v in _extras(req).items() if k in ("n", "logit_bias", "logprobs", "top_logprobs")},
    })
    return partition[:64], text
