"""OpenAI tool calling for the `local` llama.cpp provider, through JSON-schema-constrained output.

A small local model has no tool-calling training Keel can rely on, so the provider does not ask it to follow a
format: it describes the tools in the system message and constrains sampling with a grammar built from one JSON
Schema, `{"tool": NAME, "arguments": {…that tool's parameters…}}` for each tool the request allows, plus
`{"answer": TEXT}` when `tool_choice` is `auto`. Whatever the model samples is therefore a valid call of a
named tool with arguments its schema accepts (or an answer), which `parse_output` turns into OpenAI's
`tool_calls`. Earlier calls in the conversation are shown to the model in the same JSON shape.

Example:
    >>> schema = output_schema(normalise_tools([{"type": "function", "function": {"name": "f"}}]), "required")
    >>> parse_output('{"tool": "f", "arguments": {}}')[1][0]["function"]
    {'name': 'f', 'arguments': '{}'}
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from keel.core.errors import BadRequest

ANSWER = {"type": "object", "additionalProperties": False, "required": ["answer"],
          "properties": {"answer": {"type": "string"}}}
LOOSE_BOUNDS = {"maxLength": 64, "maxItems": 8, "minLength": 8, "minItems": 4}  # larger ones left to validation
FIX = 'send tools as [{"type": "function", "function": {"name": …, "description": …, "parameters": {…}}}]'


def active(tools: list[dict[str, Any]] | None, tool_choice: Any) -> bool:
    """Whether this request's output is constrained to tool calls (tools given, `tool_choice` not `none`)."""
    return bool(tools) and tool_choice != "none"


def normalise_tools(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """name → {description, parameters} of OpenAI `tools`; a malformed entry is the caller's 400."""
    out: dict[str, dict[str, Any]] = {}
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise BadRequest(f"tools[{i}] is not a function tool with a name", fix=FIX)
        params = fn.get("parameters") or {"type": "object"}
        if not isinstance(params, dict):
            raise BadRequest(f"tools[{i}].function.parameters must be a JSON Schema object", fix=FIX)
        out[fn["name"]] = {"description": str(fn.get("description") or ""), "parameters": params}
    return out


def chosen(tools: dict[str, dict[str, Any]], tool_choice: Any) -> tuple[list[str], bool]:
    """(the tools the output may call, whether a plain answer is allowed) for `tool_choice`."""
    if tool_choice in (None, "auto"):
        return list(tools), True
    if tool_choice == "required":
        return list(tools), False
    name = ((tool_choice or {}).get("function") or {}).get("name") if isinstance(tool_choice, dict) else None
    if name is None:
        raise BadRequest(f"tool_choice {str(tool_choice)[:100]!r} is not none, auto, required or a function",
                         fix='send "auto", "required", "none" or {"type": "function", "function": {"name": …}}')
    if name not in tools:
        raise BadRequest(f"tool_choice names {name!r}, which is not in tools ({', '.join(tools)})",
                         fix="name one of the request's tools")
    return [name], False


def output_schema(tools: dict[str, dict[str, Any]], tool_choice: Any) -> dict[str, Any]:
    """The JSON Schema every output of this request matches: a call of an allowed tool, or an answer."""
    names, may_answer = chosen(tools, tool_choice)
    alternatives = [{"type": "object", "additionalProperties": False, "required": ["tool", "arguments"],
                     "properties": {"tool": {"const": n}, "arguments": loosened(tools[n]["parameters"])}}
                    for n in names]
    if may_answer:
        alternatives.append(ANSWER)
    return alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}


def loosened(schema: Any) -> Any:
    """`schema` without the large length bounds (`maxLength: 2000`) that llama.cpp's grammar spells out one
    optional character at a time, past what it will parse; the caller still validates the full schema."""
    if isinstance(schema, dict):
        return {k: loosened(v) for k, v in schema.items()
                if not (k in LOOSE_BOUNDS and isinstance(v, int) and v > LOOSE_BOUNDS[k])}
    if isinstance(schema, list):
        return [loosened(v) for v in schema]
    return schema


def prompt_messages(messages: list[dict[str, Any]], tools: dict[str, dict[str, Any]],
                    tool_choice: Any) -> list[dict[str, Any]]:
    """The conversation as the model reads it: the tools described in the system message, the assistant's
    earlier calls written as the JSON it produces."""
    names, may_answer = chosen(tools, tool_choice)
    listing = "\n".join(f"- {n}: {tools[n]['description']} Arguments (JSON Schema): "
                        f"{json.dumps(tools[n]['parameters'], separators=(',', ':'))}" for n in names)
    how = ('Reply with one JSON object: {"tool": NAME, "arguments": {...}} to call a tool'
           + (', or {"answer": TEXT} to answer the user.' if may_answer else "."))
    guide = f"You can call these tools:\n{listing}\n{how}"
    out: list[dict[str, Any]] = []
    for m in messages:
        calls = m.get("tool_calls") if m.get("role") == "assistant" else None
        if calls:
            written = [json.dumps({"tool": (c.get("function") or {}).get("name"),
                                   "arguments": _args((c.get("function") or {}).get("arguments"))})
                       for c in calls if isinstance(c, dict)]
            out.append({"role": "assistant", "content": "\n".join(written)})
        else:
            out.append(m)
    if out and out[0].get("role") == "system" and isinstance(out[0].get("content"), str):
        out[0] = dict(out[0], content=f"{out[0]['content']}\n\n{guide}")
    else:
        out.insert(0, {"role": "system", "content": guide})
    return out


def _args(raw: Any) -> Any:
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    return raw if raw is not None else {}


def parse_output(text: str) -> tuple[str | None, list[dict[str, Any]] | None]:
    """(content, tool_calls) from the constrained output; text that is not a whole object (the generation was
    cut by max_tokens) stays content."""
    try:
        obj = json.loads(text)
    except ValueError:
        return text, None
    if isinstance(obj, dict) and isinstance(obj.get("tool"), str):
        args = json.dumps(obj.get("arguments") or {}, ensure_ascii=False)
        return None, [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                       "function": {"name": obj["tool"], "arguments": args}}]
    if isinstance(obj, dict) and isinstance(obj.get("answer"), str):
        return obj["answer"], None
    return text, None
