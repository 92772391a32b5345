"""A stand-in for Acme's back office, for the support agent example: customer lookup and refunds over HTTP.

    python examples/support_agent/acme.py [--port 8099]

`POST /customers/lookup {"customer_id": "c-42"}` answers the customer's record (or 404);
`POST /refunds {"order_id", "amount", "currency", "to_account"}` records the refund once per
`Idempotency-Key` (Keel sends run id + position, so a step replayed after a crash refunds once) and answers it;
`GET /refunds` lists the refunds made. Standard library only; it keeps its state in memory.
"""

from __future__ import annotations

import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CUSTOMERS = {
    "c-42": {"customer_id": "c-42", "name": "Ann Lee", "email": "ann@acme.example", "account": "ACME-123456",
             "orders": ["o-1234", "o-1235"]},
    "c-7": {"customer_id": "c-7", "name": "Bo Diaz", "email": "bo@acme.example", "account": "ACME-654321",
            "orders": ["o-77"]},
}


class BackOffice:
    """The refunds made, deduplicated by idempotency key."""

    def __init__(self) -> None:
        self.refunds: dict[str, dict[str, Any]] = {}
        self.raw = 0  # refund requests received, repeats included
        self.lock = threading.Lock()

    def refund(self, key: str, body: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            self.raw += 1
            if key not in self.refunds:
                self.refunds[key] = {"refund_id": f"r-{len(self.refunds) + 1}", "status": "refunded", **body}
            return self.refunds[key]


def handler(office: BackOffice) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, doc: Any) -> None:
            data = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path == "/refunds":
                self._send(200, {"refunds": list(office.refunds.values()), "raw": office.raw})
            else:
                self._send(404, {"error": "not found"})

        def do_POST(self) -> None:  # noqa: N802
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
            except ValueError:
                self._send(400, {"error": "the body is not JSON"})
                return
            if self.path == "/customers/lookup":
                found = CUSTOMERS.get(str(body.get("customer_id")))
                self._send(200 if found else 404, found or {"error": "no such customer"})
            elif self.path == "/refunds":
                key = self.headers.get("Idempotency-Key") or json.dumps(body, sort_keys=True)
                self._send(200, office.refund(key, body))
            else:
                self._send(404, {"error": "not found"})

        def log_message(self, *_args: Any) -> None:
            return None

    return Handler


def serve(port: int = 8099, host: str = "127.0.0.1") -> tuple[ThreadingHTTPServer, BackOffice]:
    """Start the back office on a thread; returns the server (its `server_address` has the port) and its state."""
    office = BackOffice()
    server = ThreadingHTTPServer((host, port), handler(office))
    threading.Thread(target=server.serve_forever, daemon=True, name="acme-back-office").start()
    return server, office


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--port", type=int, default=8099)
    args = ap.parse_args()
    srv, _ = serve(args.port)
    print(f"Acme back office on http://127.0.0.1:{args.port}", flush=True)
    threading.Event().wait()
