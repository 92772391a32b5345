"""Side effects of workflow steps: outbound HTTP (`http`, webhooks) and email (`notify`).

Every call carries an idempotency key (run id + step id) so the receiving system can drop a retry's
duplicate. Outbound HTTP only reaches hosts a workflow lists in `allow_hosts`, and never a private,
loopback or link-local address unless that exact address (or `localhost`) is listed; the address is
checked when the connection is made, so a name cannot be re-pointed between check and connect.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import re
import smtplib
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import replace
from email.message import EmailMessage
from email.utils import formatdate
from typing import Any

import orjson
from yarl import URL

from keel.core.errors import BadRequest, KeelError
from keel.core.http1 import FRAMING, TOKEN, VALUE, Client, Response, WireError
from keel.core.outbound import USER_AGENT, Outbound

log = logging.getLogger("keel.workflows.effects")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
KEPT_HEADERS = ("content-type", "location", "etag", "retry-after")
FORBIDDEN_HEADERS = FRAMING  # what Keel's HTTP client writes itself
NAT64 = ipaddress.ip_network("64:ff9b::/96")
ALLOW_FIX = "add the host (or host:port) to the step's allow_hosts"


class EgressDenied(KeelError):
    """A workflow step tried to reach a host that is not allowed (not listed, or a non-public address)."""

    code, status, title = "workflow_egress_denied", 403, "Egress denied"


class EffectFailed(KeelError):
    """A side effect did not succeed, and trying again with the same key will not help (a 4xx, a refused
    recipient, no SMTP host); the retryable kind is its subclass `EffectUnavailable`."""

    code, status, title = "workflow_effect_failed", 502, "Workflow side effect failed"


class EffectUnavailable(EffectFailed):
    """A side effect's receiving system could not take it now (a timeout, a connection error, a 429 or 5xx,
    an SMTP 4xx): another try with the same key may succeed, after `retry_after` seconds where it said."""

    retryable = True


def _norm_host(host: str) -> str:
    """A (yarl-IDNA-encoded) host lower-cased, without the trailing dot of a fully qualified name."""
    return host.lower().rstrip(".")


def _as_ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _parse_entry(entry: str) -> tuple[str, int | None, bool]:
    """An `allow_hosts` entry as (host, port or None, wildcard)."""
    raw = entry.strip().lower()
    wildcard = raw.startswith("*.")
    body = raw[2:] if wildcard else raw
    if body.count(":") > 1 and not body.startswith("["):  # a bare IPv6 address, no port
        ip = _as_ip(body)
        if ip is None or wildcard:
            raise BadRequest(f"allow_hosts entry {entry!r} is not a host or host:port", fix=ALLOW_FIX)
        return str(ip), None, False
    try:
        url = URL(f"http://{body}")
        ok = bool(url.raw_host) and url.path in ("", "/") and not url.query_string and not url.fragment \
            and url.user is None
    except ValueError:
        ok = False
    if not ok or "*" in body or (wildcard and _as_ip(url.raw_host or "") is not None):
        raise BadRequest(f"allow_hosts entry {entry!r} is not a host, host:port or *.domain", fix=ALLOW_FIX)
    host = _norm_host(url.raw_host or "")
    ip = _as_ip(host)
    return (str(ip) if ip else host), url.explicit_port, wildcard


def _allowed(host: str, port: int, allow_hosts: Sequence[str]) -> bool:
    """Whether `host:port` matches an entry; a wildcard matches subdomains only, and never an IP address."""
    is_ip = _as_ip(host) is not None
    for e_host, e_port, wildcard in [_parse_entry(entry) for entry in allow_hosts]:
        if e_port is not None and e_port != port:
            continue
        if (host.endswith("." + e_host) and not is_ip) if wildcard else host == e_host:
            return True
    return False


def _embedded_v4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for (mapped, 6to4, NAT64), if any."""
    if isinstance(ip, ipaddress.IPv4Address):
        return None
    if ip in NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.ipv4_mapped or ip.sixtofour


def refusal(ip: IPAddress, *, listed: bool = False, loopback_only: bool = False) -> str | None:
    """Why a connection to `ip` is refused, or None.

    Link-local (cloud metadata at 169.254.169.254), multicast and unspecified addresses are always
    refused. Loopback, private and reserved ones only where the operator listed that exact address
    (`listed`), or `localhost` (`loopback_only`: then only loopback addresses pass).
    """
    inner = _embedded_v4(ip)
    if inner is not None:
        why = refusal(inner, listed=listed, loopback_only=loopback_only)
        return f"{why}, IPv4 in IPv6" if why else None
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip.is_unspecified:
        return "unspecified"
    if listed or (loopback_only and ip.is_loopback):
        return None
    if ip.is_loopback:
        return "loopback"
    if ip.is_private:
        return "private"
    if ip.is_reserved or not ip.is_global:
        return "reserved"
    return None


def _denied_address(host: str, ip: IPAddress, why: str) -> EgressDenied:
    return EgressDenied(f"{host} resolves to {ip} ({why}); workflow steps may only reach public addresses",
                        fix=f"to reach an internal service on purpose, list its exact address "
                            f"(e.g. {ip}:PORT, or localhost:PORT) in allow_hosts", host=host)


async def checked_resolve(host: str, port: int) -> list[str]:
    """`host`'s addresses by `loop.getaddrinfo`, the whole answer refused if any address is not public.

    The client connects only to the addresses returned here, so the address checked is the one used. An IP
    literal is returned as it is: `Egress._target` has applied the address policy to it already.
    """
    if (literal := _as_ip(host)) is not None:
        return [str(literal)]
    name = _norm_host(host)
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_ADDRCONFIG)
    addresses: list[str] = []
    for _fam, _type, _proto, _canon, sockaddr in infos:
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        why = refusal(ip, loopback_only=name == "localhost")
        if why:
            raise _denied_address(name, ip, why)
        addresses.append(str(ip))
    if not addresses:
        raise OSError(f"{name} has no address")
    return addresses


def _check_headers(headers: dict[str, str]) -> None:
    """Refuse header injection and headers that would change where or how the request goes."""
    for name, value in headers.items():
        if not isinstance(name, str) or not TOKEN.fullmatch(name):
            raise BadRequest(f"header name {str(name)[:40]!r} is not a valid HTTP token",
                             fix="use letters, digits and '-' in header names")
        if not isinstance(value, str) or not VALUE.fullmatch(value):
            raise BadRequest(f"the value of header {name!r} has a control character such as CR, LF or NUL "
                             "(or is not a string)",
                             fix="remove line breaks and other control characters from header values")
        if name.lower().replace("_", "-") in FORBIDDEN_HEADERS:  # some proxies read "_" as "-"
            raise BadRequest(f"header {name!r} is set by Keel and may not be given", fix=f"remove {name!r}")


def _encode_body(body: Any, headers: dict[str, str]) -> bytes | None:
    """dict/list (any JSON value) → JSON; str → UTF-8 text; bytes as they are; None → no body."""
    has_type = any(k.lower() == "content-type" for k in headers)
    if body is None:
        return None
    if isinstance(body, bytes):
        data, ctype = body, "application/octet-stream"
    elif isinstance(body, str):
        data, ctype = body.encode(), "text/plain; charset=utf-8"
    else:
        try:
            data, ctype = orjson.dumps(body), "application/json"
        except TypeError as exc:
            raise BadRequest(f"the request body is not JSON-serialisable ({exc})") from None
    if not has_type:
        headers["Content-Type"] = ctype
    return data


class Egress:
    """SSRF-safe outbound HTTP for workflow steps: a client from Keel's outbound stack (its CA bundle and client
    certificate, never a proxy), the allow-list, and IP checks at connect time.

    >>> egress = Egress()
    >>> out = await egress.request("POST", "https://crm.example.com/leads", body={"email": "a@b.c"},
    ...                            allow_hosts=["crm.example.com"], idempotency_key="run_1:create_lead")
    >>> out["status"], out["body"]
    """

    def __init__(self, *, timeout_s: float = 30.0, max_response_bytes: int = 1_000_000,
                 outbound: Outbound = Outbound()) -> None:
        self.timeout_s = timeout_s
        self.max_response_bytes = max_response_bytes
        # Never through an environment proxy: the proxy would resolve the name, so the connect-time address
        # check would see the proxy's address, not the target's; a step connects directly or not at all.
        self.outbound = replace(outbound, env_proxy=False)
        self._tls = self.outbound.ssl_context("workflow egress")  # a bad CA bundle or certificate fails at start
        self._client: Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _get_client(self) -> Client:
        loop = asyncio.get_running_loop()
        if self._client is None or self._client.closed or self._loop is not loop:
            # The client caches no DNS answer: every new connection is resolved, and so checked, again.
            self._client = self.outbound.client(limit=100, keepalive_s=30, tls=self._tls, resolver=checked_resolve)
            self._loop = loop
        return self._client

    def _target(self, url: str, allow_hosts: Sequence[str]) -> URL:
        """Parse `url` and apply the allow-list and, for an IP literal, the address policy."""
        try:
            target = URL(url)
        except (ValueError, TypeError):
            raise BadRequest(f"{str(url)[:200]!r} is not a valid URL") from None
        if target.scheme not in ("http", "https") or not target.raw_host:
            raise BadRequest(f"{target.scheme or 'a relative'} URL cannot be called by a workflow step; "
                             f"use an absolute http:// or https:// URL")
        host = _norm_host(target.raw_host)
        ip = _as_ip(host)
        if ip is not None:
            host = str(ip)
        port = target.port or (443 if target.scheme == "https" else 80)
        if not _allowed(host, port, allow_hosts):
            shown = f"[{host}]" if ip is not None and ip.version == 6 else host
            raise EgressDenied(f"{shown}:{port} is not in the step's allow_hosts "
                               f"({', '.join(allow_hosts) or 'empty'})",
                               fix=f"add {shown!r} (any port) or '{shown}:{port}' to allow_hosts", host=host)
        if ip is not None and (why := refusal(ip, listed=True)):
            raise _denied_address(host, ip, why)
        return target

    async def request(self, method: str, url: str, *, headers: dict[str, str] | None = None, body: Any = None,
                      allow_hosts: Sequence[str] = (), idempotency_key: str | None = None,
                      timeout_s: float | None = None, expect_status: Sequence[int] | None = None) -> dict[str, Any]:
        """Send one request; returns `{"status", "headers", "body"}` or raises a Keel error.

        Redirects are returned, not followed (a redirect could leave the allow-list). Without
        `expect_status`, 2xx and 3xx are results and the rest raise `EffectFailed`.
        """
        method = method.upper()
        if not TOKEN.fullmatch(method):
            raise BadRequest(f"{method[:20]!r} is not an HTTP method")
        if isinstance(allow_hosts, str):
            allow_hosts = [allow_hosts]
        target = self._target(url, allow_hosts)
        shown = f"{method} {target.with_user(None).with_query(None).with_fragment(None)}"
        out_headers = dict(headers or {})
        if idempotency_key is not None:
            out_headers = {k: v for k, v in out_headers.items() if k.lower() != "idempotency-key"}
            out_headers["Idempotency-Key"] = idempotency_key
        if not any(k.lower() == "user-agent" for k in out_headers):
            out_headers["User-Agent"] = USER_AGENT
        _check_headers(out_headers)
        data = _encode_body(body, out_headers)
        # Checked above (tokens, no CR/LF/NUL); UTF-8 so that a value outside Latin-1 is still sent.
        head = "".join(f"{name}: {value}\r\n" for name, value in out_headers.items()).encode()
        limit = timeout_s if timeout_s is not None else self.timeout_s
        started = time.monotonic()
        try:
            async with asyncio.timeout(limit):
                resp = await self._get_client().request(method, target, head=head, body=data or b"")
                try:
                    raw = await self._read(resp, shown)
                finally:
                    resp.close()
            result = {"status": resp.status, "body": _decode(resp, raw),
                      "headers": {h: resp.headers[h] for h in KEPT_HEADERS if h in resp.headers}}
        except TimeoutError:
            raise EffectUnavailable(f"{shown} timed out after {limit:g} s", method=method) from None
        except ValueError:
            raise BadRequest(f"{shown}: the host is not a canonical address") from None
        except (WireError, OSError) as exc:
            raise EffectUnavailable(f"{shown} failed: connection error ({exc})", method=method,
                                    fix="check that the service is up; the step is retried") from None
        status = result["status"]
        log.debug("workflow egress", extra={"method": method, "url": shown.split(" ", 1)[1], "status": status,
                                           "ms": round((time.monotonic() - started) * 1000, 1)})
        expected = status in expect_status if expect_status is not None else 200 <= status < 400
        if not expected:
            wanted = ", ".join(map(str, expect_status)) if expect_status is not None else "2xx or 3xx"
            answered = f"{shown} answered {status} (expected {wanted})"
            if status == 429 or status >= 500:
                raise EffectUnavailable(answered, retry_after=_retry_after(result["headers"].get("retry-after")),
                                        method=method, upstream_status=status, fix="the step is retried")
            raise EffectFailed(answered, method=method, upstream_status=status,
                               fix="fix the request or the receiving service; retrying will not help")
        return result

    async def _read(self, resp: Response, shown: str) -> bytes:
        """The body, at most `max_response_bytes` of it (the caller closes `resp`)."""
        cap = self.max_response_bytes
        too_large = EffectFailed(f"{shown}: response larger than {cap} bytes",
                                 fix="ask for less (paging, fields) or raise the step's response limit")
        length = resp.headers.get("content-length", "")
        if length.isdigit() and int(length) > cap:
            raise too_large
        buf = bytearray()
        while chunk := await resp.read_some():
            buf += chunk
            if len(buf) > cap:
                raise too_large
        return bytes(buf)

    async def webhook(self, url: str, payload: Any, *, allow_hosts: Sequence[str], idempotency_key: str,
                      timeout_s: float | None = None) -> dict[str, Any]:
        """POST `payload` as JSON (even a string) to `url`."""
        try:
            data = orjson.dumps(payload)
        except TypeError as exc:
            raise BadRequest(f"the webhook payload is not JSON-serialisable ({exc})") from None
        return await self.request("POST", url, headers={"Content-Type": "application/json"}, body=data,
                                  allow_hosts=allow_hosts, idempotency_key=idempotency_key, timeout_s=timeout_s)

    async def close(self) -> None:
        """Close the client; safe to call twice. A client of a finished event loop can only be dropped."""
        client, self._client = self._client, None
        if client is not None and not client.closed and self._loop is asyncio.get_running_loop():
            await client.close()


def _content_type(value: str) -> tuple[str, str | None]:
    """A Content-Type's media type (lower case) and its charset parameter, if any."""
    media, *params = value.split(";")
    charset = None
    for param in params:
        key, _, val = param.partition("=")
        if key.strip().lower() == "charset":
            charset = val.strip().strip('"') or None
    return media.strip().lower(), charset


def _decode(resp: Response, raw: bytes) -> Any:
    """JSON when the content type says so and it parses, else text."""
    ctype, charset = _content_type(resp.headers.get("content-type", ""))
    if ctype == "application/json" or ctype.endswith("+json"):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    try:
        return raw.decode(charset or "utf-8", errors="replace")
    except LookupError:
        return raw.decode("utf-8", errors="replace")


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


ADDR_SPEC = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")
ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~-"
MESSAGE_ID_LEFT = re.compile(rf"[{ATEXT}]+(?:\.[{ATEXT}]+)*")


def message_id(idempotency_key: str) -> str:
    """`<key@keel>`. A key that is not a valid Message-ID part (`run_1:notify`) keeps its readable
    characters plus a short hash of the whole key, so distinct keys never share a Message-ID."""
    left = idempotency_key
    if not MESSAGE_ID_LEFT.fullmatch(left) or len(left) > 120:
        readable = re.sub(rf"[^{ATEXT}]+", ".", left).strip(".")[:80] or "k"
        left = f"{readable}.{hashlib.sha256(idempotency_key.encode()).hexdigest()[:12]}"
    return f"<{left}@keel>"


class Mailer:
    """SMTP email when configured; `None` host means the caller keeps mail in the outbox instead.

    >>> mailer = Mailer("smtp.example.com", 587, username="keel", password=secret, starttls=True)
    >>> await mailer.send("ops@example.com", "New lead", "Acme signed up", idempotency_key="run_1:notify")
    """

    def __init__(self, host: str | None, port: int = 25, *, username: str | None = None,
                 password: str | None = None, starttls: bool = False, sender: str = "keel@localhost",
                 timeout_s: float = 30.0) -> None:
        if any(c in sender for c in "\r\n"):
            raise BadRequest("the mail sender contains a line break", fix="set a plain sender address")
        self.host, self.port = host, port
        self.username, self._password = username, password
        self.starttls, self.sender, self.timeout_s = starttls, sender, timeout_s

    @property
    def configured(self) -> bool:
        return bool(self.host)

    async def send(self, to: str, subject: str, body: str, *, idempotency_key: str) -> dict[str, Any]:
        """Send one plain-text message to one address; returns `{"to", "message_id", "status": "sent"}`."""
        if not ADDR_SPEC.fullmatch(to or ""):
            raise BadRequest(f"{to[:100]!r} is not one email address" if "\r" not in to and "\n" not in to
                             else "the recipient contains a line break (header injection)",
                             fix="give exactly one address like name@example.com")
        if any(c in subject for c in "\r\n\0"):
            raise BadRequest("the subject contains a line break (header injection)",
                             fix="remove line breaks from the subject")
        if not self.configured:
            raise EffectFailed("no SMTP host is configured",
                               fix="configure SMTP, or read the message from the workflow outbox")
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = self.sender, to, subject
        msg["Date"] = formatdate(localtime=False, usegmt=True)
        msg["Message-ID"] = message_id(idempotency_key)
        msg.set_content(body)
        await asyncio.to_thread(self._deliver, msg, to)
        return {"to": to, "message_id": msg["Message-ID"], "status": "sent"}

    def _deliver(self, msg: EmailMessage, to: str) -> None:
        where = f"SMTP {self.host}:{self.port}"
        try:
            with smtplib.SMTP(self.host or "", self.port, timeout=self.timeout_s) as smtp:
                if self.starttls:
                    smtp.starttls(context=ssl.create_default_context())
                if self.username:
                    smtp.login(self.username, self._password or "")
                smtp.send_message(msg, to_addrs=[to])
        except smtplib.SMTPRecipientsRefused as exc:
            code = next(iter(exc.recipients.values()))[0] if exc.recipients else 550
            raise self._refused(where, code, f"refused the recipient {to}") from None
        except smtplib.SMTPResponseException as exc:
            raise self._refused(where, exc.smtp_code, "refused the message") from None
        except (smtplib.SMTPException, OSError) as exc:
            raise EffectUnavailable(f"{where} could not be reached ({type(exc).__name__})",
                                    fix="check the SMTP settings and that the server is up; the step is retried") \
                from None

    @staticmethod
    def _refused(where: str, code: int, what: str) -> EffectFailed:
        if 400 <= code < 500:  # transient
            return EffectUnavailable(f"{where} {what} ({code})", smtp_status=code, fix="the step is retried")
        return EffectFailed(f"{where} {what} ({code})", smtp_status=code, fix="check the address and the SMTP account")
