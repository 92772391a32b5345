"""Request bodies of the OpenAI-compatible API, checked in full before any provider sees them: a body
that passes here cannot make a provider fail (extra top-level fields pass through to providers).

The nested shapes (content parts, tools, schemas, metadata) are checked by the plain functions below,
which both `ChatCompletionBody` and the hot path's `fast_chat_body` call, so the two cannot disagree.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import jsonschema
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

MAX_TOKENS = 2**31 - 1  # what llama.cpp and the usual upstreams can take
INT64 = 2**63
ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
METADATA_KEYS, METADATA_KEY_LEN, METADATA_VALUE_LEN = 64, 64, 2048
KEEL_OPTIONS = {"context_overflow": ("trim", "error"), "cache": ("exact", "semantic", "off", "force")}
PART_FIELDS = {"text": "text", "image_url": "image_url", "input_audio": "input_audio", "file": "file",
               "refusal": "refusal"}


# -- checks shared by both validators (each raises ValueError naming what is wrong) ---------------------

def _str(value: Any, what: str, *, empty: bool = True) -> None:
    if type(value) is not str or (not empty and not value):
        raise ValueError(f"{what} must be a {'' if empty else 'non-empty '}string")


def _opt_str(obj: dict[str, Any], key: str, what: str) -> None:
    if obj.get(key) is not None:
        _str(obj[key], f"{what}.{key}")


def check_part(part: Any, where: str = "part") -> None:
    """One content part: `{"type": "text", "text": …}`, `image_url`, `input_audio`, `file` or `refusal`."""
    if type(part) is not dict:
        raise ValueError(f"{where} must be an object with a `type`")
    kind = part.get("type")
    if type(kind) is not str or kind not in PART_FIELDS:
        raise ValueError(f"{where}.type must be one of {', '.join(PART_FIELDS)}")
    value = part.get(PART_FIELDS[kind])
    if kind in ("text", "refusal"):
        _str(value, f"{where}.{kind}")
        return
    if type(value) is not dict:
        raise ValueError(f"{where}.{kind} must be an object")
    if kind == "image_url":
        _str(value.get("url"), f"{where}.image_url.url", empty=False)
        if value.get("detail") is not None and value["detail"] not in ("auto", "low", "high"):
            raise ValueError(f"{where}.image_url.detail must be auto, low or high")
    elif kind == "input_audio":
        _str(value.get("data"), f"{where}.input_audio.data", empty=False)
        _str(value.get("format"), f"{where}.input_audio.format", empty=False)
    else:
        for key in ("file_data", "file_id", "filename"):
            _opt_str(value, key, f"{where}.file")
        if value.get("file_data") is None and value.get("file_id") is None:
            raise ValueError(f"{where}.file needs `file_data` or `file_id`")


def check_content(content: Any) -> None:
    """Message content: a string, null, or a list of content parts."""
    if content is None or type(content) is str:
        return
    if type(content) is not list:
        raise ValueError("content must be a string or a list of content parts")
    for i, part in enumerate(content):
        check_part(part, f"content[{i}]")


def check_tool_calls(calls: Any) -> None:
    """An assistant message's `tool_calls`: `[{"id", "type": "function", "function": {"name", "arguments"}}]`."""
    if calls is None:
        return
    if type(calls) is not list:
        raise ValueError("tool_calls must be a list")
    for i, call in enumerate(calls):
        where = f"tool_calls[{i}]"
        if type(call) is not dict:
            raise ValueError(f"{where} must be an object")
        _str(call.get("id"), f"{where}.id", empty=False)
        if call.get("type", "function") != "function":
            raise ValueError(f"{where}.type must be function")
        fn = call.get("function")
        if type(fn) is not dict:
            raise ValueError(f"{where}.function must be an object")
        _str(fn.get("name"), f"{where}.function.name", empty=False)
        if type(fn.get("arguments")) not in (str, dict):
            raise ValueError(f"{where}.function.arguments must be a JSON string")


def check_schema(schema: Any, where: str) -> None:
    """A JSON Schema, checked against its meta-schema (the `$schema` it names, else draft 2020-12)."""
    if type(schema) is not dict:
        raise ValueError(f"{where} must be a JSON Schema object")
    try:
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        cls.check_schema(schema)
    except jsonschema.exceptions.SchemaError as exc:
        path = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        raise ValueError(f"{where} is not a valid JSON Schema at {path}: {exc.message[:200]}") from None
    except RecursionError:
        raise ValueError(f"{where} is nested too deeply") from None


def check_response_format(fmt: Any) -> None:
    """`{"type": "text" | "json_object"}` or `{"type": "json_schema", "json_schema": {"name", "schema", …}}`."""
    if fmt is None:
        return
    if type(fmt) is not dict or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise ValueError("type must be text, json_object or json_schema")
    if fmt["type"] != "json_schema":
        return
    spec = fmt.get("json_schema")
    if type(spec) is not dict:
        raise ValueError("json_schema must be an object with `name` and `schema`")
    if type(spec.get("name")) is not str or not FUNCTION_NAME.fullmatch(spec["name"]):
        raise ValueError("json_schema.name must be 1-64 letters, digits, _ or -")
    if spec.get("strict") is not None and type(spec["strict"]) is not bool:
        raise ValueError("json_schema.strict must be true or false")
    _opt_str(spec, "description", "json_schema")
    check_schema(spec.get("schema"), "json_schema.schema")


def check_tools(tools: Any) -> None:
    """`[{"type": "function", "function": {"name", "description"?, "parameters"?: JSON Schema, "strict"?}}]`."""
    if tools is None:
        return
    if type(tools) is not list:
        raise ValueError("tools must be a list")
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if type(tool) is not dict or tool.get("type", "function") != "function":
            raise ValueError(f"{where} must be {{\"type\": \"function\", \"function\": {{…}}}}")
        fn = tool.get("function")
        if type(fn) is not dict:
            raise ValueError(f"{where}.function must be an object")
        if type(fn.get("name")) is not str or not FUNCTION_NAME.fullmatch(fn["name"]):
            raise ValueError(f"{where}.function.name must be 1-64 letters, digits, _ or -")
        _opt_str(fn, "description", f"{where}.function")
        if fn.get("strict") is not None and type(fn["strict"]) is not bool:
            raise ValueError(f"{where}.function.strict must be true or false")
        if fn.get("parameters") is not None:
            check_schema(fn["parameters"], f"{where}.function.parameters")


def check_tool_choice(choice: Any) -> None:
    """`none`, `auto`, `required`, or `{"type": "function", "function": {"name": …}}`."""
    if choice is None or choice in ("none", "auto", "required"):
        return
    if (type(choice) is dict and choice.get("type") == "function" and type(choice.get("function")) is dict
            and type(choice["function"].get("name")) is str and choice["function"]["name"]):
        return
    raise ValueError('tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": …}}')


def check_metadata(meta: Any) -> None:
    """Up to 64 string keys (at most 64 characters) with string values (at most 2048 characters)."""
    if meta is None:
        return
    if type(meta) is not dict:
        raise ValueError("metadata must be an object of strings")
    if len(meta) > METADATA_KEYS:
        raise ValueError(f"metadata may hold at most {METADATA_KEYS} keys")
    for key, value in meta.items():
        if len(key) > METADATA_KEY_LEN:
            raise ValueError(f"metadata key {key[:20]!r}… is longer than {METADATA_KEY_LEN} characters")
        if type(value) is not str:
            raise ValueError(f"metadata.{key[:64]} must be a string")
        if len(value) > METADATA_VALUE_LEN:
            raise ValueError(f"metadata.{key} is longer than {METADATA_VALUE_LEN} characters")


def check_keel(options: Any) -> None:
    """Keel-only options: `context_overflow` (trim, error) and `cache` (exact, semantic, off, force)."""
    if options is None:
        return
    if type(options) is not dict:
        raise ValueError("keel must be an object")
    for key, allowed in KEEL_OPTIONS.items():
        if options.get(key) is not None and options[key] not in allowed:
            raise ValueError(f"keel.{key} must be one of {', '.join(allowed)}")


def check_stream_options(opts: Any) -> None:
    if opts is not None and (type(opts) is not dict or type(opts.get("include_usage")) not in (type(None), bool)):
        raise ValueError("stream_options must be {\"include_usage\": true|false}")


def check_logit_bias(bias: Any) -> None:
    if bias is None:
        return
    if type(bias) is not dict or not all(
            k.isdigit() and type(v) in (int, float) and -100 <= v <= 100 for k, v in bias.items()):
        raise ValueError("logit_bias maps token ids to numbers from -100 to 100")


# -- the bodies ------------------------------------------------------------------------------------------

FIELD_CHECKS: dict[str, Any] = {
    "logit_bias": check_logit_bias, "tools": check_tools, "tool_choice": check_tool_choice,
    "response_format": check_response_format, "metadata": check_metadata, "keel": check_keel,
    "stream_options": check_stream_options,
}


class Message(BaseModel):
    """One chat message; extra fields pass through."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, v: Any) -> Any:
        check_content(v)
        return v

    @field_validator("tool_calls", mode="before")
    @classmethod
    def _tool_calls(cls, v: Any) -> Any:
        check_tool_calls(v)
        return v


class ChatCompletionBody(BaseModel):
    """`POST /v1/chat/completions`. `metadata` (use_case, task_id, …: strings) is recorded in the ledger;
    `keel` holds Keel-only options such as `{"context_overflow": "trim"}`. Neither is forwarded."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1, max_length=256)
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    n: int | None = Field(default=None, ge=1, le=128)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    logit_bias: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-INT64, lt=INT64)
    user: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    stream: bool | None = None
    stream_options: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    keel: dict[str, Any] | None = None

    @field_validator(*FIELD_CHECKS, mode="before")
    @classmethod
    def _checked(cls, v: Any, info: ValidationInfo) -> Any:
        FIELD_CHECKS[info.field_name](v)  # the same checks the hot parser runs
        return v


class EmbeddingsBody(BaseModel):
    """`POST /v1/embeddings`."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1, max_length=256)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1, le=65536)
    metadata: dict[str, Any] | None = None
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _input(cls, v: Any) -> Any:
        if type(v) is list and len(v) > 2048:
            raise ValueError("input may hold at most 2048 items")
        return v

    @field_validator("metadata", mode="before")
    @classmethod
    def _metadata(cls, v: Any) -> Any:
        check_metadata(v)
        return v


# -- the hot path's parser -------------------------------------------------------------------------------

_INT, _FLOAT, _BOOL, _CHECK = 0, 1, 2, 3
_FIELDS: dict[str, tuple[int, Any, Any]] = {
    "max_tokens": (_INT, 1, MAX_TOKENS), "max_completion_tokens": (_INT, 1, MAX_TOKENS), "n": (_INT, 1, 128),
    "seed": (_INT, -INT64, INT64 - 1), "top_logprobs": (_INT, 0, 20),
    "temperature": (_FLOAT, 0, 2), "top_p": (_FLOAT, 0, 1), "presence_penalty": (_FLOAT, -2, 2),
    "frequency_penalty": (_FLOAT, -2, 2),
    "stream": (_BOOL, None, None), "logprobs": (_BOOL, None, None), "parallel_tool_calls": (_BOOL, None, None),
    **{key: (_CHECK, check, None) for key, check in FIELD_CHECKS.items()},
}


def _fast_message(m: Any) -> bool:
    """Is this message one `Message` accepts? (Raises ValueError or TypeError for some that are not.)"""
    if type(m) is not dict or m.get("role") not in ROLES:
        return False
    content = m.get("content")
    if content is not None and type(content) is not str:
        check_content(content)
    if len(m) > (2 if "content" in m else 1):  # more than role and content
        check_tool_calls(m.get("tool_calls"))
        for key in ("name", "tool_call_id"):
            if m.get(key) is not None and type(m[key]) is not str:
                return False
    return True


def fast_chat_body(data: Any) -> dict[str, Any] | None:
    """The decoded JSON of a request body of the common shape, with every field already of its declared
    type, as `ChatCompletionBody` would dump it (top-level and message None values left out); None for
    anything else, which `ChatCompletionBody` then validates (with its lax coercions and its messages).
    It accepts only what `ChatCompletionBody` accepts (a property test holds it to that)."""
    if type(data) is not dict:
        return None
    model, messages = data.get("model"), data.get("messages")
    if type(model) is not str or not 0 < len(model) <= 256 or type(messages) is not list or not messages:
        return None
    out = {}
    try:
        for m in messages:
            if not _fast_message(m):
                return None
        for key, v in data.items():
            if v is None:
                continue
            out[key] = v
            spec = _FIELDS.get(key)
            if spec is None:
                continue
            kind, low, high = spec
            if kind == _INT:
                if type(v) is not int or not low <= v <= high:
                    return None
            elif kind == _FLOAT:
                if type(v) is int:
                    v = out[key] = float(v)
                if type(v) is not float or not low <= v <= high:
                    return None
            elif kind == _BOOL:
                if type(v) is not bool:
                    return None
            else:
                low(v)
    except (ValueError, TypeError, AttributeError):
        return None
    if any(None in m.values() for m in messages):
        out["messages"] = [{k: v for k, v in m.items() if v is not None} for m in messages]
    stop, user = out.get("stop"), out.get("user")
    if stop is not None and type(stop) is not str and not (type(stop) is list and all(type(x) is str for x in stop)):
        return None
    if user is not None and type(user) is not str:
        return None
    return out
