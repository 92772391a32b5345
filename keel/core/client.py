"""The CLI's HTTP client for commands that act on a running Keel (stdlib only, no extra deps)."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from keel.core.errors import KeelError, Unavailable

DEFAULT_URL = "http://127.0.0.1:8080"


class RemoteError(KeelError):
    """An error the server answered with; carries its problem code and status."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        super().__init__(problem.get("detail") or problem.get("title") or f"HTTP {status}", fix=problem.get("fix"))
        self.status = status
        self.code = problem.get("code", "http_error")


@dataclass
class Client:
    url: str = DEFAULT_URL
    key: str | None = None
    timeout: float = 300.0

    @classmethod
    def from_env(cls, url: str | None = None, key: str | None = None) -> "Client":
        return cls(url=(url or os.environ.get("KEEL_URL") or DEFAULT_URL).rstrip("/"),
                   key=key or os.environ.get("KEEL_API_KEY"))

    def request(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
                content_type: str = "application/json") -> Any:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", content_type)
        if self.key:
            req.add_header("Authorization", f"Bearer {self.key}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as exc:
            text = exc.read()
            try:
                problem = json.loads(text)
            except ValueError:
                problem = {"detail": text.decode(errors="replace")[:200]}
            raise RemoteError(exc.code, problem if isinstance(problem, dict) else {}) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            raise Unavailable(f"cannot reach Keel at {self.url}: {reason}",
                              fix="start it with `keel up`, or pass --url / KEEL_URL") from None
        return json.loads(payload) if payload else None

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, body if body is not None else {})
