"""One error tree. Every error a user can cause is a `KeelError` with a stable code.

The API renders them as `application/problem+json`; the CLI as one red line. The message
names what was wrong, the ids involved, and how to fix it.
"""

from __future__ import annotations

from typing import Any


class KeelError(Exception):
    """Base of every error shown to the user."""

    code = "keel_error"
    status = 500
    title = "Keel error"
    retryable = False  # may the same request succeed if tried again (on the same or another deployment)?
    retry_after: float | None = None  # seconds the failing service asked to wait, where it said (a retryable error)

    def __init__(self, detail: str, *, fix: str | None = None, headers: dict[str, str] | None = None,
                 retry_after: float | None = None, **ids: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.fix = fix
        self.retry_after = retry_after
        self.ids = {k: v for k, v in ids.items() if v is not None}
        self.headers = headers or {}

    def to_problem(self, request_id: str | None = None) -> dict[str, Any]:
        """The RFC 9457 problem body, with an OpenAI-style `error` object so SDKs show the message."""
        body: dict[str, Any] = {
            "type": f"https://keel.dev/problems/{self.code}",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "code": self.code,
        }
        if self.fix:
            body["fix"] = self.fix
        body.update(self.ids)
        if request_id:
            body["request_id"] = request_id
        # SDKs show only `error.message`, so it carries the fix too.
        message = f"{self.detail} — {self.fix}" if self.fix else self.detail
        body["error"] = {"message": message, "type": self.code, "code": self.code}
        return body


class BadRequest(KeelError):
    """The request is wrong in a way the caller can fix."""

    code, status, title = "bad_request", 400, "Bad request"


class MalformedJSON(BadRequest):
    """The body is not valid JSON."""

    code, title = "malformed_json", "Malformed JSON"


class ValidationFailed(KeelError):
    """The body is JSON but fields are missing or have the wrong type."""

    code, status, title = "validation_error", 422, "Validation failed"


class PayloadTooLarge(KeelError):
    """The body is larger than the configured limit."""

    code, status, title = "payload_too_large", 413, "Payload too large"


class HeadersTooLarge(KeelError):
    """The request's line and headers are over the size or count limit; the connection closes."""

    code, status, title = "headers_too_large", 431, "Request header fields too large"


class NotFound(KeelError):
    """The route or the named object does not exist (or the caller may not see it)."""

    code, status, title = "not_found", 404, "Not found"


class MethodNotAllowed(KeelError):
    """The route exists but not with this HTTP method."""

    code, status, title = "method_not_allowed", 405, "Method not allowed"


class Conflict(KeelError):
    """The object already exists or is in a state that forbids the change."""

    code, status, title = "conflict", 409, "Conflict"


class Unauthorized(KeelError):
    """No API key, an unknown key, an expired or a revoked key."""

    code, status, title = "unauthorized", 401, "Unauthorized"


class Forbidden(KeelError):
    """The key is valid but lacks the role or scope for this action."""

    code, status, title = "forbidden", 403, "Forbidden"


class NotSupported(BadRequest):
    """The chosen model or provider cannot do what the request asks (tools, JSON mode, …)."""

    code, title = "not_supported", "Not supported"


class InputRejected(BadRequest):
    """A model could not take the request's content (its chat template, tokenizer or grammar refused it):
    the caller's to fix, never retried and never held against the deployment."""

    code, title = "input_rejected", "Input rejected by the model"


class ContextOverflow(BadRequest):
    """The prompt plus `max_tokens` does not fit the model's context window."""

    code, title = "context_length_exceeded", "Context window exceeded"


class RateLimited(KeelError):
    """A requests- or tokens-per-minute limit is reached."""

    code, status, title = "rate_limited", 429, "Rate limit reached"
    failover = False  # see DeploymentRateLimited


class DeploymentRateLimited(RateLimited):
    """A deployment's own `rpm`/`tpm` (upstream protection) is reached: the router tries the alias's other
    deployments before answering 429."""

    failover = True


class BudgetExceeded(KeelError):
    """The worst-case cost of the request does not fit the remaining budget."""

    code, status, title = "budget_exceeded", 402, "Budget exceeded"


class UpstreamError(KeelError):
    """A provider failed (5xx, a broken connection, a malformed answer); its status and message are kept.
    Counted against the deployment's health; worth another try."""

    code, status, title = "upstream_error", 502, "Upstream error"
    retryable = True


class UpstreamTimeout(UpstreamError):
    """A provider did not answer within the deployment's timeout."""

    code, status, title = "upstream_timeout", 504, "Upstream timeout"


class UpstreamRateLimited(UpstreamError):
    """A provider answered 429: worth another try after its retry-after, or on another deployment."""

    code, status, title = "upstream_rate_limited", 429, "Upstream rate limited"


class UpstreamRefused(UpstreamError):
    """A provider refused Keel's request for a reason that is not the caller's (its credential, a missing
    endpoint): the same deployment will refuse again, another may serve it."""

    retryable = False


class UpstreamRejected(UpstreamError):
    """A provider rejected the request itself (HTTP 400, 404, 409, 413, 422): the caller's to fix, answered
    with the upstream's status, never retried and never held against the deployment."""

    code, status, title = "upstream_rejected", 400, "Rejected by the upstream"
    retryable = False

    def __init__(self, detail: str, *, status: int = 400, **kw: Any) -> None:
        super().__init__(detail, **kw)
        self.status = status


class Unavailable(KeelError):
    """A dependency (database, model, circuit) is not available right now."""

    code, status, title = "unavailable", 503, "Service unavailable"


class StoreUnavailable(Unavailable):
    """The database cannot be reached or dropped the connection (a restart, a failover): answered at once with
    a 503 and a Retry-After, and the same process serves again as soon as the database is back."""

    code, title = "store_unavailable", "Store unavailable"
    retryable = True


class ConfigError(KeelError):
    """Settings or a config file are invalid; raised at start, before the port is bound."""

    code, status, title = "config_error", 500, "Invalid configuration"


class InternalError(KeelError):
    """A bug in Keel; the detail never carries internals, the log has the trace."""

    code, status, title = "internal_error", 500, "Internal error"
