"""Structured JSON logs with the request id, and a scrubber so secrets never reach a log line."""

from __future__ import annotations

import contextvars
import logging
import re
import sys
import threading
from typing import Any

import orjson

# Keel's own id of the request being served (the ledger's key), and the id the client sent for its own
# correlation (`X-Client-Request-Id`, or a client's `X-Request-Id`), if it sent a valid one.
request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("keel_request_id", default=None)
client_request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("keel_client_request_id",
                                                                                    default=None)

_BEARER = re.compile(r"(?i)(bearer\s+|sk-keel-)[A-Za-z0-9_\-\.]{6,}")
_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class _Redactor:
    """Known secret values (vault entries, master key) replaced by `***` in every record."""

    def __init__(self) -> None:
        self._values: set[str] = set()
        self._lock = threading.Lock()

    def add(self, value: str) -> None:
        if value and len(value) >= 4:
            with self._lock:
                self._values = self._values | {value}

    def scrub(self, text: str) -> str:
        for v in self._values:
            if v in text:
                text = text.replace(v, "***")
        return _BEARER.sub(lambda m: m.group(1) + "***", text)


redactor = _Redactor()


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id, extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = getattr(record, "request_id", None) or request_id_var.get()
        if rid:
            out["request_id"] = rid
        if crid := client_request_id_var.get():
            out["client_request_id"] = crid
        for k, v in record.__dict__.items():
            if k not in _RESERVED and k not in ("request_id", "color_message") and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        line = orjson.dumps(out, default=str).decode()
        return redactor.scrub(line)


_configured = False


def configure_logging(level: str = "info") -> None:
    """Route Keel's and uvicorn's loggers through one JSON handler on stderr."""
    global _configured
    root = logging.getLogger()
    if not _configured:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JSONFormatter())
        root.handlers[:] = [handler]
        for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
            lg = logging.getLogger(name)
            lg.handlers[:] = []
            lg.propagate = True
        logging.getLogger("uvicorn.access").disabled = True  # Keel logs its own access line
        logging.getLogger("alembic").setLevel(logging.WARNING)
        _configured = True
    root.setLevel(level.upper())
