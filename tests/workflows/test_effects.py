"""Workflow side effects against the real world's edge: the loopback receiver subprocess and a real SMTP server.

DNS is the one thing faked (a name that resolves to a private address), by replacing the running
loop's `getaddrinfo` — the resolver Keel calls — for the names a test invents.
"""

from __future__ import annotations

import asyncio
import email
import pickle
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest
from aiosmtpd.controller import Controller

from keel import __version__
from keel.core.errors import BadRequest
from keel.workflows.effects import EffectFailed, EffectUnavailable, Egress, EgressDenied, Mailer, message_id
from tests.conftest import free_port
from tests.fakes.receiver import company
from tests.workflows.conftest import receiver

SECRET = "Bearer sk-secret-do-not-leak"


@pytest.fixture(scope="module")
def receiver_root() -> Iterator[str]:
    with receiver() as url:
        yield url


@pytest.fixture
def rcv(receiver_root: str) -> str:
    """The receiver's root URL, its counters reset."""
    httpx.post(receiver_root + "/_reset").raise_for_status()
    return receiver_root


def stats(root: str) -> dict[str, Any]:
    return httpx.get(root + "/_stats").json()


def allow(root: str) -> list[str]:
    return [root.removeprefix("http://")]


def run(fn: Callable[[Egress], Awaitable[Any]], **kw: Any) -> Any:
    """Run `fn(egress)` in a fresh loop with a fresh `Egress`, closed afterwards."""
    async def main() -> Any:
        egress = Egress(**kw)
        try:
            return await fn(egress)
        finally:
            await egress.close()
    return asyncio.run(main())


def fake_dns(answers: dict[str, list[str]]) -> None:
    """Make the running loop resolve the invented names in `answers` to the given addresses."""
    loop = asyncio.get_running_loop()
    real = loop.getaddrinfo

    async def getaddrinfo(host: Any, port: Any, *, family: int = 0, type: int = 0, proto: int = 0,
                          flags: int = 0) -> list[Any]:
        name = str(host).lower().rstrip(".")  # like DNS: case-insensitive, the root dot optional
        if name in answers:
            return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", (a, port, 0, 0)) if ":" in a
                    else (socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in answers[name]]
        return await real(host, port, family=family, type=type, proto=proto, flags=flags)

    loop.getaddrinfo = getaddrinfo  # type: ignore[method-assign]


def failure(fn: Callable[[Egress], Awaitable[Any]], kind: type[Exception] = EffectFailed, **kw: Any) -> Any:
    with pytest.raises(kind) as info:
        run(fn, **kw)
    return info.value


def test_allow_listed_loopback_target_gets_idempotency_key(rcv: str) -> None:
    """An exactly listed loopback target is reached, with the Idempotency-Key and a JSON body."""
    out = run(lambda e: e.request("POST", rcv + "/leads", body={"email": "a@b.c"}, allow_hosts=allow(rcv),
                                  idempotency_key="run_1:create"))
    assert out["status"] == 200
    assert out["headers"]["content-type"] == "application/json"
    assert out["body"] == {"ok": True, "applied": True, "key": "run_1:create"}
    seen = stats(rcv)["requests"][0]
    assert (seen["key"], seen["body"], seen["content_type"]) == ("run_1:create", {"email": "a@b.c"},
                                                                 "application/json")


def test_bodies_are_encoded_by_type(rcv: str) -> None:
    """str bodies go as UTF-8 text, None as no body, and webhook() always posts JSON."""
    async def go(e: Egress) -> None:
        await e.request("PUT", rcv + "/t", body="héllo", allow_hosts=allow(rcv))
        await e.request("DELETE", rcv + "/n", allow_hosts=allow(rcv))
        await e.webhook(rcv + "/hook", "just a string", allow_hosts=allow(rcv), idempotency_key="k-hook")
    run(go)
    text, empty, hook = stats(rcv)["requests"]
    assert (text["body"], text["content_type"]) == ("héllo", "text/plain; charset=utf-8")
    assert (empty["method"], empty["body"]) == ("DELETE", None)
    assert (hook["body"], hook["content_type"], hook["key"]) == ("just a string", "application/json", "k-hook")


def test_requests_name_keel_as_their_user_agent_unless_the_step_names_its_own(rcv: str) -> None:
    """Services that refuse anonymous clients (a User-Agent is expected of every client) see Keel's name."""
    async def go(e: Egress) -> None:
        await e.request("GET", rcv + "/a", allow_hosts=allow(rcv))
        await e.request("GET", rcv + "/b", headers={"user-agent": "acme-sync/2"}, allow_hosts=allow(rcv))
        await e.webhook(rcv + "/c", {"a": 1}, allow_hosts=allow(rcv), idempotency_key="k-ua")
    run(go)
    assert [r["user_agent"] for r in stats(rcv)["requests"]] == [f"keel/{__version__}", "acme-sync/2",
                                                                 f"keel/{__version__}"]


def test_receiver_dedupes_by_idempotency_key(rcv: str) -> None:
    """The receiver applies a key once: a failed try is not applied, its retry is, a repeat is counted."""
    async def go(e: Egress) -> list[Any]:
        url, hosts = rcv + "/orders?fail=500&fail_times=1", allow(rcv)
        with pytest.raises(EffectFailed):
            await e.request("POST", url, body={"n": 1}, allow_hosts=hosts, idempotency_key="k1")
        first = await e.request("POST", url, body={"n": 1}, allow_hosts=hosts, idempotency_key="k1")
        again = await e.request("POST", url, body={"n": 1}, allow_hosts=hosts, idempotency_key="k1")
        other = await e.request("POST", rcv + "/orders", allow_hosts=hosts, idempotency_key="k2")
        return [first["body"]["applied"], again["body"]["applied"], other["body"]["applied"]]
    assert run(go) == [True, False, True]
    got = stats(rcv)
    assert (got["raw"], got["applied"], got["repeats"], got["by_key"]) == (4, 2, 1, {"k1": 3, "k2": 1})
    httpx.post(rcv + "/_reset")
    assert stats(rcv) == {"raw": 0, "applied": 0, "repeats": 0, "by_key": {}, "requests": []}


def test_receiver_enrich_is_deterministic(rcv: str) -> None:
    """The enrichment endpoint answers the same fake company for the same domain, and is counted."""
    out = run(lambda e: e.request("GET", rcv + "/enrich?domain=acme.io", allow_hosts=allow(rcv)))
    assert out["body"] == company("acme.io")
    assert set(out["body"]) == {"domain", "name", "employees", "industry"}
    assert stats(rcv)["raw"] == 1


def test_host_not_in_allow_list_is_denied(rcv: str) -> None:
    """Only a listed host (and port) is reached; wildcards match subdomains only, never an IP address."""
    port = int(rcv.rsplit(":", 1)[1])
    cases = [(rcv + "/x", ["example.com"]), (rcv + "/x", [f"127.0.0.1:{port + 1}"]), (rcv + "/x", []),
             (rcv + "/x", ["*.example.com"]), ("http://example.com/", ["*.example.com"]),
             ("http://evil-example.com/", ["*.example.com"]), ("https://api.example.com/", ["api.example.com:80"])]
    for url, hosts in cases:
        err = failure(lambda e, u=url, h=hosts: e.request("GET", u, allow_hosts=h), EgressDenied)
        assert err.status == 403 and "allow_hosts" in err.detail and err.fix
    assert stats(rcv)["raw"] == 0
    with pytest.raises(BadRequest):  # an entry that is not a host is an error, not a silent no-match
        run(lambda e: e.request("GET", rcv, allow_hosts=["*.10.0.0.1"]))


def test_only_http_and_https() -> None:
    """file:, ftp: and relative URLs are refused before anything is sent."""
    for url in ("file:///etc/passwd", "ftp://example.com/x", "/relative"):
        failure(lambda e, u=url: e.request("GET", u, allow_hosts=["example.com"]), BadRequest)


def test_name_resolving_to_private_address_is_refused(rcv: str) -> None:
    """A listed name that resolves to loopback/private is refused; any bad address in the answer suffices."""
    async def go(e: Egress, url: str, hosts: list[str]) -> Any:
        fake_dns({"svc.corp.test": ["127.0.0.1"], "mixed.corp.test": ["93.184.216.34", "10.1.2.3"],
                  "xn--bcher-kva.corp.test": ["192.168.1.1"]})
        return await e.request("GET", url, allow_hosts=hosts)
    port = rcv.rsplit(":", 1)[1]
    for url, hosts, why in [(f"http://svc.corp.test:{port}/", ["svc.corp.test"], "loopback"),
                            (f"http://svc.corp.test:{port}/", ["*.corp.test"], "loopback"),
                            ("http://mixed.corp.test/", ["mixed.corp.test"], "10.1.2.3 (private)"),
                            ("http://BÜCHER.corp.test./", ["bücher.corp.test"], "192.168.1.1 (private)")]:
        err = failure(lambda e, u=url, h=hosts: go(e, u, h), EgressDenied)
        assert why in err.detail and "allow_hosts" in (err.fix or "")
    assert stats(rcv)["raw"] == 0
    # Listing the exact loopback target (or localhost) opts in.
    assert run(lambda e: go(e, f"http://localhost:{port}/", [f"localhost:{port}"]))["status"] == 200


def test_name_is_checked_again_on_each_new_connection(rcv: str) -> None:
    """No DNS cache: once `localhost` points elsewhere, the next connection is refused (DNS rebinding)."""
    port = int(rcv.rsplit(":", 1)[1])

    async def go(e: Egress) -> None:
        assert (await e.request("GET", f"http://localhost:{port}/a", allow_hosts=["localhost"]))["status"] == 200
        fake_dns({"localhost": ["10.0.0.5"]})
        with pytest.raises(EgressDenied, match="10.0.0.5"):
            await e.request("GET", f"http://localhost:{port + 1}/b", allow_hosts=["localhost"])
    run(go)
    assert stats(rcv)["raw"] == 1


def test_metadata_address_is_always_refused() -> None:
    """169.254.169.254 (cloud credentials) is refused by name, and even as an exactly listed IP literal."""
    failure(lambda e: e.request("GET", "http://169.254.169.254/latest/meta-data/", allow_hosts=["example.com"]),
            EgressDenied)
    err = failure(lambda e: e.request("GET", "http://169.254.169.254/latest/meta-data/",
                                      allow_hosts=["169.254.169.254"]), EgressDenied)
    assert "link-local" in err.detail

    async def by_name(e: Egress) -> Any:
        fake_dns({"meta.corp.test": ["169.254.169.254"]})
        return await e.request("GET", "http://meta.corp.test/", allow_hosts=["meta.corp.test"])
    assert "link-local" in failure(by_name, EgressDenied).detail


def test_ipv4_mapped_ipv6_is_refused() -> None:
    """IPv4 hidden in IPv6 (::ffff:127.0.0.1, NAT64) is judged as the IPv4 address it stands for."""
    async def by_name(e: Egress) -> Any:
        fake_dns({"v6.corp.test": ["::ffff:127.0.0.1"], "nat.corp.test": ["64:ff9b::a00:1"]})
        for host in ("v6.corp.test", "nat.corp.test"):
            with pytest.raises(EgressDenied, match="IPv4 in IPv6"):
                await e.request("GET", f"http://{host}/", allow_hosts=[host])
    run(by_name)
    err = failure(lambda e: e.request("GET", "http://[::ffff:169.254.169.254]/",
                                      allow_hosts=["[::ffff:169.254.169.254]"]), EgressDenied)
    assert "link-local, IPv4 in IPv6" in err.detail


def test_redirects_are_returned_not_followed(rcv: str) -> None:
    """A 3xx is the result (status + location): following it could leave the allow-list."""
    out = run(lambda e: e.request("GET", rcv + "/r?redirect=http://169.254.169.254/", allow_hosts=allow(rcv)))
    assert (out["status"], out["headers"]["location"]) == (302, "http://169.254.169.254/")
    assert stats(rcv)["raw"] == 1


def test_status_and_connection_failures_say_if_retryable(rcv: str) -> None:
    """5xx, 429, connect errors and timeouts are retryable; other 4xx and unexpected statuses are not."""
    hosts = allow(rcv)
    cases = [("?fail=500", True, 500), ("?fail=503", True, 503), ("?fail=429", True, 429),
             ("?fail=400", False, 400), ("?fail=404", False, 404)]
    for query, retryable, status in cases:
        err = failure(lambda e, q=query: e.request("POST", rcv + "/s" + q, allow_hosts=hosts))
        assert (err.retryable, err.ids["upstream_status"], err.status) == (retryable, status, 502)
        assert isinstance(err, EffectUnavailable) is retryable and err.code == "workflow_effect_failed"
        assert err.detail.startswith(f"POST {rcv}/s answered {status}") and "fail=" not in err.detail
    assert failure(lambda e: e.request("GET", rcv + "/s?fail=429", allow_hosts=hosts)).retry_after == 1.0
    err = failure(lambda e: e.request("GET", rcv + "/s", allow_hosts=hosts, expect_status=[201]))
    assert not err.retryable and "expected 201" in err.detail
    assert run(lambda e: e.request("GET", rcv + "/s?fail=404", allow_hosts=hosts,
                                   expect_status=[200, 404]))["status"] == 404
    closed = free_port()
    err = failure(lambda e: e.request("GET", f"http://127.0.0.1:{closed}/", allow_hosts=[f"127.0.0.1:{closed}"]))
    assert type(err) is EffectUnavailable and "connection error" in err.detail
    err = failure(lambda e: e.request("GET", rcv + "/slow?delay_ms=3000", allow_hosts=hosts, timeout_s=0.3))
    assert type(err) is EffectUnavailable and "timed out after 0.3 s" in err.detail


def test_effect_errors_survive_pickling_with_their_class_and_retry_after() -> None:
    """Regression guard: DBOS pickles a step's error to replay it on recovery; an EffectFailed that needed a
    `retryable=` keyword could not be unpickled, so a recovered run failed with a TypeError instead."""
    for err in (EffectUnavailable("POST /s answered 429", retry_after=1.5, upstream_status=429),
                EffectFailed("POST /s answered 400", fix="fix the request", upstream_status=400)):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and (back.retryable, back.retry_after) == (err.retryable, err.retry_after)
        assert back.to_problem() == err.to_problem()


def test_oversized_response_is_refused(rcv: str) -> None:
    """A response over max_response_bytes fails for good instead of filling memory."""
    err = failure(lambda e: e.request("GET", rcv + "/big?pad=5000", allow_hosts=allow(rcv)),
                  max_response_bytes=1000)
    assert not err.retryable and "larger than 1000 bytes" in err.detail
    assert run(lambda e: e.request("GET", rcv + "/small?pad=10", allow_hosts=allow(rcv)),
               max_response_bytes=1000)["body"]["pad"] == "x" * 10


def test_header_injection_is_refused(rcv: str) -> None:
    """CR/LF in a header name or value, or a header the HTTP client writes itself (Host, framing, the connection's
    and the body encoding's), never reaches the wire."""
    for headers in ({"X-Note": "a\r\nX-Injected: 1"}, {"X-Note": "a\nb"}, {"X-A\r\nX-B": "1"}, {"Host": "internal"},
                    {"Transfer-Encoding": "chunked"}, {"Upgrade": "h2c"}, {"Accept-Encoding": "br"}, {"TE": "trailers"},
                    {"Transfer_Encoding": "chunked"}, {"X-Note": "a\x0bb"}):
        failure(lambda e, h=headers: e.request("POST", rcv + "/h", headers=h, allow_hosts=allow(rcv)), BadRequest)
    failure(lambda e: e.request("POST", rcv + "/h", allow_hosts=allow(rcv), idempotency_key="k\r\nX: 1"),
            BadRequest)
    assert stats(rcv)["raw"] == 0


def test_errors_never_contain_header_values(rcv: str, caplog: pytest.LogCaptureFixture) -> None:
    """Whatever goes wrong, the message, fix, problem body and logs never carry a header value."""
    caplog.set_level("DEBUG")
    headers = {"Authorization": SECRET}
    closed = free_port()
    calls: list[tuple[str, list[str], dict[str, Any]]] = [
        (rcv + "/e?fail=500", allow(rcv), {}), (rcv + "/e?fail=400", allow(rcv), {}),
        (rcv + "/e?delay_ms=2000", allow(rcv), {"timeout_s": 0.2}), (rcv + "/e?pad=500", allow(rcv), {}),
        (f"http://127.0.0.1:{closed}/", [f"127.0.0.1:{closed}"], {}), ("http://example.com/", ["other.com"], {}),
        (rcv + "/e", allow(rcv), {"expect_status": [204]})]
    for url, hosts, kw in calls:
        with pytest.raises((EffectFailed, EgressDenied)) as info:
            run(lambda e, u=url, h=hosts, k=kw: e.request("POST", u, headers=headers, allow_hosts=h, **k),
                max_response_bytes=100)
        text = str(info.value) + str(info.value.fix) + orjson.dumps(info.value.to_problem()).decode()
        assert "sk-secret" not in text
    with pytest.raises(BadRequest) as info:
        run(lambda e: e.request("POST", rcv, headers={"Authorization": SECRET + "\r\nX: 1"}, allow_hosts=allow(rcv)))
    assert "sk-secret" not in str(info.value) + str(info.value.fix)
    assert "sk-secret" not in caplog.text


class Inbox:
    """aiosmtpd handler: keeps what it receives; refuses recipients that start with `bounce`."""

    def __init__(self) -> None:
        self.messages: list[email.message.Message] = []
        self.envelopes: list[Any] = []

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        if address.startswith("bounce"):
            return "550 no such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.envelopes.append(envelope)
        self.messages.append(email.message_from_bytes(envelope.content))
        return "250 Message accepted for delivery"


@pytest.fixture
def smtp() -> Iterator[tuple[Inbox, int]]:
    inbox, port = Inbox(), free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield inbox, port
    finally:
        controller.stop()


def test_mailer_delivers_with_message_id_from_key(smtp: tuple[Inbox, int]) -> None:
    """A sent mail carries a Message-ID derived from the idempotency key, so a duplicate can be dropped."""
    inbox, port = smtp
    mailer = Mailer("127.0.0.1", port, sender="Keel <keel@example.com>")
    out = asyncio.run(mailer.send("ops@example.com", "New lead: Acme", "Acme signed up.",
                                  idempotency_key="run_abc.notify"))
    assert out == {"to": "ops@example.com", "message_id": "<run_abc.notify@keel>", "status": "sent"}
    (msg,) = inbox.messages
    assert (msg["Message-ID"], msg["To"], msg["Subject"]) == ("<run_abc.notify@keel>", "ops@example.com",
                                                              "New lead: Acme")
    assert msg.get_payload().strip() == "Acme signed up."
    assert inbox.envelopes[0].mail_from == "keel@example.com"
    # A key that is no valid Message-ID part still gives a stable, valid, distinct one.
    assert message_id("run_1:notify") == message_id("run_1:notify") != message_id("run_1.notify")
    assert message_id("run_1:notify").startswith("<run_1.notify.")


def test_mailer_refuses_header_injection(smtp: tuple[Inbox, int]) -> None:
    """CR/LF in the recipient or subject, or more than one recipient, is refused and nothing is sent."""
    inbox, port = smtp
    mailer = Mailer("127.0.0.1", port)
    for to, subject in [("ops@example.com\r\nBcc: all@example.com", "hi"), ("ops@example.com", "hi\r\nBcc: x@y.z"),
                        ("ops@example.com", "hi\nthere"), ("a@example.com, b@example.com", "hi"),
                        ("Ops <ops@example.com>", "hi"), ("not-an-address", "hi")]:
        with pytest.raises(BadRequest):
            asyncio.run(mailer.send(to, subject, "body", idempotency_key="k"))
    assert inbox.messages == []


def test_mailer_failures_say_if_retryable(smtp: tuple[Inbox, int]) -> None:
    """A refused recipient (5xx) is final; an unreachable server is retryable; no host means not configured."""
    _inbox, port = smtp
    with pytest.raises(EffectFailed) as info:
        asyncio.run(Mailer("127.0.0.1", port).send("bounce@example.com", "s", "b", idempotency_key="k"))
    assert type(info.value) is EffectFailed and not info.value.retryable and "550" in info.value.detail
    with pytest.raises(EffectFailed) as info:
        asyncio.run(Mailer("127.0.0.1", free_port(), timeout_s=2).send("a@example.com", "s", "b",
                                                                         idempotency_key="k"))
    assert type(info.value) is EffectUnavailable and info.value.retryable
    assert Mailer(None).configured is False and Mailer("smtp.example.com").configured is True
    with pytest.raises(EffectFailed, match="no SMTP host"):
        asyncio.run(Mailer(None).send("a@example.com", "s", "b", idempotency_key="k"))
