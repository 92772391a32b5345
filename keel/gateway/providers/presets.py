"""Named presets of the OpenAI-compatible kind: `provider: groq` (or vllm, ollama, tgi, mistral, together,
fireworks, deepseek, openrouter) is `openai_compatible` with that server's default base URL, auth header and
known quirks (fields it refuses dropped or renamed), so a deployment needs only a model and a credential.

The quirks are one small table, `PRESETS`; each row becomes a provider class registered like any other.

>>> cfg = DeploymentConfig(alias="fast", provider="groq", model="llama-3.1-8b-instant", credential="groq")
>>> registry.get("groq")(cfg, ctx).chat_url
'https://api.groq.com/openai/v1/chat/completions'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from keel.core.errors import NotSupported
from keel.gateway.protocol import ChatRequest
from keel.gateway.providers.openai_compatible import OpenAICompatibleProvider

NO_EXTRAS = ("logit_bias", "logprobs", "top_logprobs", "store", "metadata", "service_tier", "prediction",
             "modalities", "audio", "reasoning_effort", "user")  # OpenAI-only fields strict servers refuse


@dataclass(frozen=True)
class Preset:
    """One server's defaults and quirks. `drop`: body fields removed before sending (the server refuses or
    mishandles them); `rename`: fields it spells otherwise; `single_choice`: `n` > 1 is refused up front."""

    base_url: str
    auth_header: str = "Authorization"  # the credential goes here as `Bearer <key>`; an unset credential sends none
    drop: tuple[str, ...] = ()
    rename: dict[str, str] = field(default_factory=dict)
    can_embed: bool = False
    single_choice: bool = False
    headers: dict[str, str] = field(default_factory=dict)  # sent on every request, under options.headers


PRESETS: dict[str, Preset] = {
    # Local servers: no key by default (set `credential` when the server was started with one).
    "vllm": Preset("http://localhost:8000/v1", can_embed=True),
    "ollama": Preset("http://localhost:11434/v1", drop=("tool_choice", "logit_bias", "user", "parallel_tool_calls"),
                     rename={"max_completion_tokens": "max_tokens"}, can_embed=True, single_choice=True),
    "tgi": Preset("http://localhost:8080/v1", drop=NO_EXTRAS + ("parallel_tool_calls",),
                  rename={"max_completion_tokens": "max_tokens"}, single_choice=True),
    # Hosted APIs.
    "mistral": Preset(  # refuses unknown fields; sends usage on its last chunk without stream_options
        "https://api.mistral.ai/v1", drop=NO_EXTRAS + ("stream_options", "parallel_tool_calls"),
        rename={"seed": "random_seed", "max_completion_tokens": "max_tokens"}, can_embed=True),
    "groq": Preset("https://api.groq.com/openai/v1", drop=("logit_bias", "logprobs", "top_logprobs", "store",
                                                             "metadata", "prediction", "modalities", "audio"),
                   single_choice=True),
    "together": Preset("https://api.together.xyz/v1", drop=("store", "metadata", "prediction", "service_tier"),
                       can_embed=True),
    "fireworks": Preset("https://api.fireworks.ai/inference/v1", drop=("store", "metadata", "prediction",
                                                                        "service_tier"), can_embed=True),
    "deepseek": Preset("https://api.deepseek.com/v1", drop=NO_EXTRAS,
                       rename={"max_completion_tokens": "max_tokens"}, single_choice=True),
    "openrouter": Preset("https://openrouter.ai/api/v1", drop=("store", "service_tier"),
                         headers={"X-Title": "Keel"}),
}


class PresetProvider(OpenAICompatibleProvider):
    """`openai_compatible` with a preset's base URL, auth header and quirks applied to each body."""

    preset: ClassVar[Preset]

    def auth_headers(self, secret: str | None) -> dict[str, str]:
        if not secret:
            return dict(self.preset.headers)
        value = f"Bearer {secret}" if self.preset.auth_header == "Authorization" else secret
        return {**self.preset.headers, self.preset.auth_header: value}

    def _body(self, req: ChatRequest, stream: bool) -> dict[str, Any]:
        if self.preset.single_choice and (req.body.get("n") or 1) > 1:
            raise NotSupported(f"deployment {self.deployment} ({self.name}) returns one choice only",
                               fix="send n=1 and repeat the request", deployment=self.deployment)
        body = super()._body(req, stream)
        for key in self.preset.drop:
            body.pop(key, None)
        for old, new in self.preset.rename.items():
            if old in body:
                body[new] = body.pop(old)
        return body


def preset_class(name: str) -> type[PresetProvider]:
    """The provider class for preset `name`: its flags are class attributes, as the registry expects."""
    preset = PRESETS[name]
    return type(f"{name.title()}Provider", (PresetProvider,), {
        "name": name, "preset": preset, "default_base_url": preset.base_url, "can_embed": preset.can_embed,
        "__doc__": f"The `{name}` preset of `openai_compatible` (default base URL {preset.base_url})."})


VLLM = preset_class("vllm")
OLLAMA = preset_class("ollama")
TGI = preset_class("tgi")
MISTRAL = preset_class("mistral")
GROQ = preset_class("groq")
TOGETHER = preset_class("together")
FIREWORKS = preset_class("fireworks")
DEEPSEEK = preset_class("deepseek")
OPENROUTER = preset_class("openrouter")
