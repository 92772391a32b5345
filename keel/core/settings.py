"""One typed settings object: defaults < `keel.yaml` < `KEEL_*` environment variables.

A bad value fails at start with the field name and what is allowed, before any port is bound.
Every non-default value remembers where it came from, so the server can log its precedence.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from keel.core.errors import ConfigError

ENV_PREFIX = "KEEL_"


class DeploymentConfig(BaseModel):
    """One concrete model behind a public alias: which provider, which upstream model, what it costs."""

    model_config = ConfigDict(extra="forbid")

    alias: str = Field(min_length=1, description="public model name clients send, e.g. `local-chat`")
    provider: str = Field(description="`local`, `local_embed`, `openai_compatible`, `anthropic`, `azure_openai`, "
                          "`gemini`, `bedrock`, a preset (`vllm`, `ollama`, `groq`, …), or a plugin's name")
    model: str = Field(default="", description="the upstream model name")
    id: str | None = Field(default=None, description="deployment id; defaults to `alias/provider/model`")
    kind: Literal["chat", "embedding", "rerank"] = "chat"
    base_url: str | None = None
    credential: str | None = Field(default=None, description="name of a vault secret holding the API key")
    path: str | None = Field(default=None, description="GGUF / model file path for local providers")
    context_window: int = Field(default=8192, gt=0)
    input_price_per_1m: float = Field(default=0.0, ge=0)
    output_price_per_1m: float = Field(default=0.0, ge=0)
    timeout_s: float = Field(default=60.0, gt=0)
    max_retries: int = Field(default=0, ge=0, le=10)
    weight: float = Field(default=1.0, gt=0)
    rpm: int | None = Field(default=None, gt=0, description="requests/min this deployment may receive")
    tpm: int | None = Field(default=None, gt=0, description="tokens/min this deployment may receive")
    options: dict[str, Any] = Field(default_factory=dict)

    def deployment_id(self) -> str:
        return self.id or f"{self.alias}/{self.provider}/{self.model or 'default'}"


class CacheConfig(BaseModel):
    """Response cache for one alias (opt-in)."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["off", "exact", "semantic"] = "off"
    ttl_s: float = Field(default=3600, gt=0)
    similarity_threshold: float = Field(default=0.95, gt=0, le=1)
    embedding_alias: str = "local-embed"


class AliasConfig(BaseModel):
    """How an alias is routed: strategy, retries, fallbacks, circuit breaker, cache."""

    model_config = ConfigDict(extra="forbid")

    strategy: Literal["weighted", "least-busy", "lowest-latency"] = "weighted"
    fallbacks: list[str] = Field(default_factory=list, description="other aliases tried in order")
    retries: int = Field(default=2, ge=0, le=10, description="extra tries on retryable errors")
    backoff_ms: float = Field(default=50, ge=0)
    circuit_failures: int = Field(default=5, gt=0, description="consecutive failures that open the circuit")
    circuit_cooldown_s: float = Field(default=30, gt=0, description="open time before one trial request")
    cache: CacheConfig = Field(default_factory=CacheConfig)


class Settings(BaseModel):
    """Everything Keel reads at start. Field names map to `KEEL_<NAME>` env variables."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    data_dir: Path = Field(default=Path(".keel"), description="holds the SQLite database, key file, indexes")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; default SQLite in data_dir")
    database_statement_timeout_s: float = Field(
        default=30, ge=0, description="PostgreSQL: a statement running longer is cancelled and its request answers "
        "503 store_unavailable (0: no limit); migrations wait without it")
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    master_key: SecretStr | None = Field(default=None, description="vault key; default a 0600 key file in data_dir")
    bootstrap_admin_key: SecretStr | None = Field(
        default=None, description="use this value for the first admin key instead of a random one")
    max_body_bytes: int = Field(default=10 * 1024 * 1024, gt=0)
    max_header_bytes: int = Field(default=64 * 1024, ge=1024, description="a request's line and headers together; "
                                  "over it the server answers 431 and closes the connection")
    max_headers: int = Field(default=100, ge=10, le=100, description="header fields in one request; over it, 431 "
                             "(the HTTP server refuses more than 100 itself)")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_requests: bool = True
    auth_cache_ttl_s: float = Field(default=1.0, ge=0, description="seconds a verified key is trusted in memory")
    console_session_idle_s: float = Field(default=1800, gt=0, description="a console session unused this long ends")
    console_session_max_s: float = Field(default=43200, gt=0, description="a console session ends this long after "
                                         "sign-in, however active")
    console_failed_sign_ins_per_minute: float = Field(
        default=30, gt=0, description="failed console password sign-ins a process takes a minute, whatever the "
        "email (bursting to a minute's worth); beyond it password tries get 429 before any password check")
    trusted_proxies: list[str] = Field(
        default_factory=list, description="addresses or CIDR blocks of the reverse proxies in front of Keel: from "
        "these peers X-Forwarded-For names the client (console sign-in throttling); from any other it is ignored")
    demo: bool = Field(default=False, description="load demo data on start (`keel up` sets it)")
    embedded_models: bool = Field(default=True, description="register the bundled local-chat/local-embed models")
    models: list[DeploymentConfig] = Field(default_factory=list)
    aliases: dict[str, AliasConfig] = Field(default_factory=dict)
    redis_url: str | None = Field(default=None, description="optional: hot counters for rate limits")
    alert_webhook_url: str | None = Field(default=None, description="POSTed budget soft-limit alerts")
    budget_alert_percent: float = Field(default=80, gt=0, le=100)
    budget_idle_s: float = Field(default=5.0, ge=0, description="seconds a budget's free slice stays with a "
                                 "replica after its last request before going back to the store")
    policy_file: Path | None = Field(default=None, description="governance policy YAML, hot-reloaded; "
                                                                  "default: the built-in policy")
    policy_reload_interval_s: float = Field(default=2.0, gt=0)
    ledger_flush_interval_s: float = Field(default=0.2, gt=0)
    ledger_batch_size: int = Field(default=500, gt=0)
    drift_interval_s: float = Field(default=60, gt=0, description="how often the drift detectors run")
    drift_window: int = Field(default=50, ge=30, le=5000, description="recent observations per drift signal")
    drift_reference: int = Field(default=200, ge=30, le=5000, description="reference observations per drift signal")
    drift_webhook_url: str | None = Field(default=None, description="POSTed drift alerts (they are audited too)")
    local_threads: int = Field(default=0, ge=0, description="llama.cpp threads; 0 = half the cores")
    preload_models: bool = Field(default=False, description="load local models at start (`keel up` sets it)")
    trace_exporter: Literal["none", "otlp", "jsonl", "console"] = Field(
        default="none", description="where spans go: `otlp` (configured by the standard OTEL_EXPORTER_OTLP_* "
                                    "variables), `jsonl` (traces.jsonl in data_dir), `console`; none makes no spans")
    trace_detail: Literal["stages", "calls"] = Field(
        default="stages", description="`stages`: every stage, guard scan and key check is a span too; `calls`: "
                                      "the request, the model call, each provider attempt, retrieval, workflow steps")
    trace_queue_size: int = Field(default=2048, ge=1, le=1_000_000, description="finished spans that may wait for "
                                  "export; more are dropped and counted, never waited for")
    metrics_bind: str | None = Field(default=None, description="`host:port` serving GET /metrics without a key on a "
                                     "listener of its own; the API's /metrics always needs an admin or auditor key")
    workflows_dir: Path | None = Field(default=Path("workflows"),
                                       description="workflow specs (*.yaml) defined at start, if the folder exists")
    agents_dir: Path | None = Field(default=None, description="agent mandates (*.yaml) defined at start; a broken "
                                    "file stops the start. Unset: ./agents if it exists (a broken file is skipped)")
    mcp_commands: dict[str, list[str]] = Field(default_factory=dict, description="stdio MCP servers agent mandates "
                                               "may start, by name: `{billing: [python, -m, billing_mcp]}`; a mandate "
                                               "names one (`command: billing`), never a command line of its own")
    smtp_host: str | None = Field(default=None, description="SMTP server for workflow email; unset = Keel's outbox")
    smtp_port: int = Field(default=25, ge=1, le=65535)
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_starttls: bool = False
    smtp_sender: str = "keel@localhost"
    workflow_executor_id: str = Field(default="local", min_length=1, max_length=100,
                                      description="this process's stable identity for durable runs: each "
                                                  "replica on one PostgreSQL needs its own, kept across restarts")
    workflow_model_concurrency: int = Field(default=2, ge=1, description="model calls workflow runs make at once")
    role: Literal["all", "api", "worker"] = Field(
        default="all", description="what this process runs: `all` (API and background work, one process), `api` "
        "(requests only: runs and ingest jobs are queued for `keel worker`s) or `worker`; api/worker need PostgreSQL")
    worker_concurrency: int = Field(default=16, ge=1, description="workflow and agent runs one worker executes at once")
    worker_heartbeat_s: float = Field(default=2.0, gt=0, description="how often a worker records that it is alive")
    worker_takeover_s: float = Field(default=10.0, gt=0, description="a worker silent this long is dead: a live one "
                                     "takes over its unfinished runs (ingest jobs: their 15 s lease)")
    workflow_schedule_interval_s: float = Field(default=15.0, gt=0, description="how often cron triggers are checked")
    responses_retention_days: float = Field(default=30, ge=0, description="days a stored Responses API answer is "
                                            "kept (`GET /v1/responses/{id}`, `previous_response_id`); 0 = forever")
    workflow_webhook_tolerance_s: float = Field(default=300.0, gt=0, description="max age of a signed webhook")
    outbound_ca_bundle: Path | None = Field(default=None, description="PEM CA bundle trusted for outbound HTTPS "
                                            "(providers, webhooks, workflow steps) instead of the system's store")
    outbound_client_cert: Path | None = Field(default=None, description="PEM client certificate presented to "
                                              "upstreams that ask for one (its key inside, or outbound_client_key)")
    outbound_client_key: Path | None = Field(default=None, description="PEM key of outbound_client_cert")

    @field_validator("outbound_ca_bundle", "outbound_client_cert", "outbound_client_key")
    @classmethod
    def _existing_file(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_file():
            raise ValueError(f"{v} is not a file")
        return v

    @field_validator("agents_dir")
    @classmethod
    def _existing_dir(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_dir():
            raise ValueError(f"{v} is not a folder")
        return v

    @field_validator("mcp_commands")
    @classmethod
    def _commands(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for name, argv in v.items():
            if not re.match(r"^[a-zA-Z][a-zA-Z0-9_-]{0,63}$", name):
                raise ValueError(f"command name {name!r} must be letters, digits, '_' or '-'")
            if not argv or not all(a for a in argv):
                raise ValueError(f"command {name!r} must be a non-empty list of arguments, the program first")
        return v

    @field_validator("metrics_bind")
    @classmethod
    def _host_port(cls, v: str | None) -> str | None:
        if v is None or v == "":
            return None
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("must be `host:port`, e.g. `127.0.0.1:9464`")
        return v

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _proxy_list(cls, v: Any) -> Any:
        return [part.strip() for part in v.split(",") if part.strip()] if isinstance(v, str) else v  # "a, b"

    @field_validator("trusted_proxies")
    @classmethod
    def _proxy_networks(cls, v: list[str]) -> list[str]:
        import ipaddress

        for entry in v:
            try:
                ipaddress.ip_network(entry.strip(), strict=False)
            except ValueError:
                raise ValueError(f"{entry[:60]!r} is not an IP address or CIDR block, e.g. 10.0.0.0/8") from None
        return v

    @field_validator("database_url")
    @classmethod
    def _url_dialect(cls, v: str | None) -> str | None:
        if v is None or v == "":
            return None
        if not (v.startswith("sqlite") or v.startswith("postgresql")):
            raise ValueError("must start with `sqlite:///` or `postgresql+psycopg://`")
        if v.startswith("postgresql://") or v.startswith("postgres://"):
            v = "postgresql+psycopg://" + v.split("://", 1)[1]
        return v

    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'keel.db').resolve()}"


def _env_values(environ: dict[str, str]) -> dict[str, Any]:
    """`KEEL_FOO=bar` → `{"foo": "bar"}`; JSON/YAML-looking values (lists, maps) are parsed."""
    out: dict[str, Any] = {}
    fields = Settings.model_fields
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        name = key[len(ENV_PREFIX):].lower()
        if name not in fields:
            continue
        out[name] = yaml.safe_load(raw) if raw[:1] in "[{" else raw
    return out


def _describe(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"]) or "(root)"
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        allowed = ", ".join(sorted(Settings.model_fields))
        msg = f"unknown setting; allowed settings are: {allowed}"
    elif err["type"] == "literal_error":
        msg = f"{msg}"
    return f"{loc}: {msg} (got {err.get('input')!r})"


def load_settings(config_path: str | os.PathLike[str] | None = None,
                  environ: dict[str, str] | None = None, **overrides: Any) -> tuple[Settings, dict[str, str]]:
    """Build settings and a map `field -> source` ('file', 'env', 'cli') for every non-default.

    Raises `ConfigError` naming each bad field and what it allows.
    """
    environ = dict(os.environ if environ is None else environ)
    path = config_path or environ.get("KEEL_CONFIG")
    file_values: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist", fix="pass an existing file with --config or KEEL_CONFIG")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}", fix="fix the YAML syntax") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping of settings", fix="write `key: value` lines")
        file_values = loaded
    env_values = _env_values(environ)
    env_values.pop("config", None)
    cli_values = {k: v for k, v in overrides.items() if v is not None}
    merged = {**file_values, **env_values, **cli_values}
    try:
        settings = Settings(**merged)
    except ValidationError as exc:
        problems = "; ".join(_describe(e) for e in exc.errors())
        raise ConfigError(f"invalid settings: {problems}",
                          fix="correct the named fields in keel.yaml or the KEEL_* environment") from None
    sources = {k: "file" for k in file_values} | {k: "env" for k in env_values} | {k: "cli" for k in cli_values}
    return settings, sources
