"""Request bodies of the OpenAI-compatible API (extra fields pass through to providers)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionBody(BaseModel):
    """`POST /v1/chat/completions`. `metadata` (use_case, task_id, …) is recorded in the ledger;
    `keel` holds Keel-only options such as `{"context_overflow": "trim"}`. Neither is forwarded."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    keel: dict[str, Any] | None = None


class EmbeddingsBody(BaseModel):
    """`POST /v1/embeddings`."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    metadata: dict[str, Any] | None = None
    user: str | None = None


class DeploymentPatch(BaseModel):
    model_config = ConfigDict(extra="allow")
