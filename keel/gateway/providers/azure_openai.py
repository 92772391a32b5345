"""Azure OpenAI: the OpenAI wire format at `{endpoint}/openai/deployments/{deployment}/chat/completions
?api-version=…`, authenticated with an `api-key` header or a Microsoft Entra bearer token, both from the vault.

Options: `azure_deployment` (default: the deployment's `model`), `api_version` (default `API_VERSION`),
`auth` (`api_key`, the default, or `entra`), `token_refresh_s` (Entra tokens expire: the vault is read again
this often, default 300 s, so whoever rotates the token there is picked up without a restart).

>>> p = AzureOpenAIProvider(DeploymentConfig(alias="gpt", provider="azure_openai", model="gpt-4o-prod",
...     base_url="https://corp.openai.azure.com", credential="azure-key"), ProviderContext(get_secret=vault.get))
"""

from __future__ import annotations

import time
from typing import ClassVar
from urllib.parse import quote, urlencode

from keel.core.errors import ConfigError
from keel.core.settings import DeploymentConfig
from keel.gateway.protocol import ProviderContext
from keel.gateway.providers.openai_compatible import OpenAICompatibleProvider

API_VERSION = "2024-10-21"  # the GA data-plane version with tools, JSON schema and stream usage
AUTH_MODES = ("api_key", "entra")


class AzureOpenAIProvider(OpenAICompatibleProvider):
    """Azure OpenAI's deployment-scoped chat completions and embeddings; OpenAI shapes in and out."""

    name: ClassVar[str] = "azure_openai"
    default_base_url: ClassVar[str] = ""

    def __init__(self, config: DeploymentConfig, ctx: ProviderContext) -> None:
        super().__init__(config, ctx)  # runs check_options: what follows may trust the options
        options = config.options
        self.auth = options.get("auth", "api_key")
        azure_deployment = options.get("azure_deployment") or config.model
        query = urlencode({"api-version": str(options.get("api_version") or API_VERSION)})
        root = f"{self.base_url.removesuffix('/openai')}/openai/deployments/{quote(azure_deployment, safe='')}"
        self.chat_url = f"{root}/chat/completions?{query}"
        self.embed_url = f"{root}/embeddings?{query}"
        self.refresh_s = float(options.get("token_refresh_s", 300)) if self.auth == "entra" else 0.0
        self._read_at = 0.0

    @classmethod
    def check_options(cls, config: DeploymentConfig) -> None:
        """The endpoint, `options.auth`, the Azure deployment name, `options.api_version` and `token_refresh_s`."""
        options = config.options
        if not (config.base_url or cls.default_base_url):
            raise ConfigError("base_url: azure_openai needs base_url, the resource's endpoint",
                              fix="set base_url: https://<resource>.openai.azure.com", field="base_url")
        auth = options.get("auth", "api_key")
        if auth not in AUTH_MODES:
            raise ConfigError(f"options.auth: {str(auth)[:100]!r} is not one of {', '.join(AUTH_MODES)}",
                              fix="use auth: api_key (an api-key header) or auth: entra (a bearer token)",
                              field="options.auth")
        azure_deployment = options.get("azure_deployment") or config.model
        if not isinstance(azure_deployment, str) or not azure_deployment:
            raise ConfigError("model: azure_openai needs the Azure deployment name",
                              fix="set model (or options.azure_deployment) to the name of the Azure deployment",
                              field="options.azure_deployment" if "azure_deployment" in options else "model")
        version = options.get("api_version")
        if version is not None and (not isinstance(version, str) or not version.strip()):
            raise ConfigError("options.api_version: must be an API version such as " + API_VERSION,
                              fix=f"set options.api_version: {API_VERSION}, or leave it out",
                              field="options.api_version")
        refresh = options.get("token_refresh_s", 300)
        if isinstance(refresh, bool) or not isinstance(refresh, (int, float)) or not 0 < refresh <= 86400:
            raise ConfigError(f"options.token_refresh_s: {str(refresh)[:100]!r} is not a number of seconds in "
                              "(0, 86400]", fix="set options.token_refresh_s to seconds between token reads, "
                              "or leave it out for 300", field="options.token_refresh_s")
        super().check_options(config)

    def auth_headers(self, secret: str | None) -> dict[str, str]:
        if not secret:
            return {}
        return {"Authorization": f"Bearer {secret}"} if self.auth == "entra" else {"api-key": secret}

    def _request_headers(self) -> dict[str, str]:
        if self.refresh_s:
            now = time.monotonic()
            if now - self._read_at >= self.refresh_s:
                self._headers, self._read_at = None, now  # read the token from the vault again
        return super()._request_headers()
