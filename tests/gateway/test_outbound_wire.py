"""Wire conformance of Keel's outbound HTTP stack (keel/core/http1.py through keel/core/outbound.py, as the
providers and workflow egress use it; aiohttp's client passed the same suite) against real loopback servers
that answer byte for byte as scripted: keep-alive and close, chunked bodies with trailers, interim 1xx
answers, HTTP/1.0 upstreams, gzip bodies, oversized heads, early closes, proxies from
HTTPS_PROXY/HTTP_PROXY/NO_PROXY, a custom CA bundle and a client certificate."""

from __future__ import annotations

import asyncio
import gzip
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest

from keel.core.errors import ConfigError, UpstreamError
from keel.core.outbound import Outbound
from keel.core.settings import DeploymentConfig, load_settings
from keel.gateway.protocol import ProviderContext
from keel.gateway.providers.openai_compatible import OpenAICompatibleProvider
from keel.workflows.effects import Egress
from tests.fakes.proxy import LoopbackProxy
from tests.fakes.tls import PKI, make_pki
from tests.gateway.conformance import chat_request, collect, expect_error

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
PROXY_VARS = ("http_proxy", "https_proxy", "no_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
              "ALL_PROXY")
ANSWER = orjson.dumps({"choices": [{"message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 3, "completion_tokens": 1}})
EVENTS = b"".join(b"data: %s\n\n" % orjson.dumps(doc) for doc in (
    {"choices": [{"delta": {"role": "assistant", "content": "hel"}}]},
    {"choices": [{"delta": {"content": "lo"}, "finish_reason": "stop"}]},
    {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}})) + b"data: [DONE]\n\n"


@pytest.fixture(autouse=True)
def no_proxy_from_the_runner(monkeypatch):
    """Each test starts with no proxy in the environment and sets the ones it means."""
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request's head and body (Content-Length framed); b"" when the client went away."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return b""
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    return head + await reader.readexactly(length)


def ok(body: bytes = ANSWER, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s" % (
        len(body), extra, body)


def chunked(body: bytes, size: int = 10, trailers: bytes = b"") -> bytes:
    pieces = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size]) for i in range(0, len(body), size))
    return pieces + b"0\r\n" + trailers + b"\r\n"


class Server:
    """A loopback server running `handler` per connection; counts connections and requests, keeps heads."""

    def __init__(self, answer: bytes | None = None, *, handler: Handler | None = None,
                 tls: ssl.SSLContext | None = None, close_after: bool = False, pieces: int = 0) -> None:
        self.answer, self.tls, self.close_after, self.pieces = answer, tls, close_after, pieces
        self.handler = handler or self._answer_each
        self.connections = 0
        self.requests: list[bytes] = []
        self.peers: list[Any] = []
        self.server: asyncio.Server | None = None

    async def _answer_each(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while request := await read_request(reader):
            self.requests.append(request)
            assert self.answer is not None
            step = self.pieces or len(self.answer)
            for i in range(0, len(self.answer), step):  # in pieces, as a slow network would deliver it
                writer.write(self.answer[i:i + step])
                await writer.drain()
                if self.pieces:
                    await asyncio.sleep(0.001)
            if self.close_after:
                return

    async def __aenter__(self) -> Server:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            self.peers.append(writer.get_extra_info("peercert"))
            try:
                await self.handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=self.tls)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{port}/v1"


def provider(url: str, outbound: Outbound = Outbound(), **options: Any) -> OpenAICompatibleProvider:
    config = DeploymentConfig(alias="gpt", provider="openai_compatible", model="m", base_url=url, timeout_s=5,
                              options=options)
    return OpenAICompatibleProvider(config, ProviderContext(get_secret={}.__getitem__, outbound=outbound))


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 30))  # type: ignore[arg-type]


async def chat_twice(srv: Server, **options: Any) -> None:
    p = provider(srv.url, **options)
    try:
        for _ in range(2):
            assert (await p.chat(chat_request())).content == "hi"
    finally:
        await p.close()


def test_keep_alive_reuses_one_connection():
    async def main() -> None:
        async with Server(ok()) as srv:
            p = provider(srv.url)
            for _ in range(10):
                assert (await p.chat(chat_request())).content == "hi"
            await p.close()
            assert srv.connections == 1 and len(srv.requests) == 10

    run(main())


@pytest.mark.parametrize("answer", [
    ok(extra=b"Connection: close\r\n"),
    ok(extra=b"Connection: Keep-Alive, Close\r\n"),
    b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + ANSWER,  # a body that ends with the connection
])
def test_an_answer_that_says_close_is_not_reused(answer):
    async def main() -> None:
        async with Server(answer, close_after=True) as srv:
            await chat_twice(srv)
            assert srv.connections == 2

    run(main())


FRAMINGS = {  # name: (answer, connections two calls take)
    "chunked": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(ANSWER), 1),
    "chunked-trailers": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n"
                         + chunked(ANSWER, trailers=b"X-Checksum: abc\r\nX-Other: 1\r\n"), 1),
    "100-continue": (b"HTTP/1.1 100 Continue\r\n\r\n" + ok(), 1),
    "103-early-hints": (b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
                        b"HTTP/1.1 102 Processing\r\n\r\n" + ok(), 1),
    "gzip": (ok(gzip.compress(ANSWER), b"Content-Encoding: gzip\r\n"), 1),
    "gzip-chunked": (b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + chunked(gzip.compress(ANSWER), 7), 1),
    "no-reason-phrase": (b"HTTP/1.1 200\r\ncontent-length:%d\r\n\r\n%s" % (len(ANSWER), ANSWER), 1),
}


@pytest.mark.parametrize("name", FRAMINGS)
def test_body_framings_interim_answers_and_encodings(name):
    answer, connections = FRAMINGS[name]

    async def main() -> None:
        async with Server(answer, pieces=7) as srv:
            await chat_twice(srv)
            assert srv.connections == connections and len(srv.requests) == 2

    run(main())


@pytest.mark.parametrize("answer", [
    b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + ANSWER,
    b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(ANSWER), ANSWER),
])
def test_an_http_1_0_upstream_is_read_and_its_connection_not_reused(answer):
    async def main() -> None:
        async with Server(answer, close_after=True) as srv:
            await chat_twice(srv)
            assert srv.connections == 2

    run(main())


def test_a_stream_in_gzip_chunks_with_trailers_arrives_whole_and_keeps_its_connection():
    answer = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Encoding: gzip\r\n"
              b"Transfer-Encoding: chunked\r\n\r\n" + chunked(gzip.compress(EVENTS), 5, b"X-Done: 1\r\n"))

    async def main() -> None:
        async with Server(answer, pieces=11) as srv:
            p = provider(srv.url)
            for _ in range(2):
                deltas = await collect(p.stream(chat_request(stream=True)))
                assert "".join(d.content or "" for d in deltas) == "hello"
                assert deltas[-1].usage.completion_tokens == 2
            await p.close()
            assert srv.connections == 1

    run(main())


def test_an_oversized_head_is_a_typed_upstream_error_sent_once():
    """Regression guard: a head past the client's limits is a malformed answer (retryable), not a crash."""
    answer = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 20000 + b"\r\n" + ok()[len(b"HTTP/1.1 200 OK\r\n"):]

    async def main() -> None:
        async with Server(answer) as srv:
            for stream in (False, True):
                p = provider(srv.url)
                req = chat_request(stream=stream)
                err = await expect_error(p.stream(req) if stream else p.chat(req))
                await p.close()
                assert type(err) is UpstreamError and err.retryable and err.status == 502
                assert "malformed upstream response" in err.detail
            assert len(srv.requests) == 2

    run(main())


@pytest.mark.parametrize("answer, text", [
    (b"", "connection error"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial", "connection error"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", "connection error"),
    (b"SMTP ready\r\n\r\n", "malformed upstream response"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", "malformed upstream response"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nabc", "malformed upstream response"),
])
def test_early_closes_and_garbage_are_retryable_upstream_errors(answer, text):
    async def main() -> None:
        async with Server(answer, close_after=True) as srv:
            p = provider(srv.url)
            err = await expect_error(p.chat(chat_request()))
            await p.close()
            assert type(err) is UpstreamError and err.retryable and text in err.detail
            assert len(srv.requests) == 1

    run(main())


def test_redirects_are_not_followed():
    async def main() -> None:
        async with Server(ok()) as elsewhere:
            moved = b"HTTP/1.1 307 Temporary Redirect\r\nLocation: %s/chat/completions\r\nContent-Length: 0\r\n\r\n"
            async with Server(moved % elsewhere.url.encode()) as srv:
                p = provider(srv.url)
                err = await expect_error(p.chat(chat_request()))
                await p.close()
                assert isinstance(err, UpstreamError) and not elsewhere.requests

    run(main())


def test_a_configured_url_becomes_a_valid_request_target_and_headers_are_checked():
    async def main() -> None:
        async with Server(ok()) as srv:
            p = provider(srv.url + "/ü x")
            await p.chat(chat_request())
            await p.close()
            assert srv.requests[0].startswith(b"POST /v1/%C3%BC%20x/chat/completions HTTP/1.1\r\n")
            bad = provider(srv.url, headers={"X-Evil": "a\r\nHost: elsewhere"})
            with pytest.raises(ConfigError, match="X-Evil"):
                await bad.chat(chat_request())
            for name in ("Host", "Content-Length", "Transfer-Encoding"):  # written by the client, never twice
                with pytest.raises(ConfigError, match=name):
                    await provider(srv.url, headers={name: "1"}).chat(chat_request())
            assert len(srv.requests) == 1

    run(main())


# -- proxies from the environment ---------------------------------------------------------------------------

def test_http_proxy_forwards_plain_http_and_no_proxy_goes_direct(monkeypatch):
    async def main() -> None:
        async with LoopbackProxy() as proxy, Server(ok()) as srv:
            monkeypatch.setenv("HTTP_PROXY", proxy.url.replace("http://", "http://keel:pw@"))
            await chat_twice(srv)
            port = srv.url.split(":")[2].split("/")[0]
            assert proxy.request_lines() == [f"POST http://127.0.0.1:{port}/v1/chat/completions HTTP/1.1"]
            assert b"Proxy-Authorization: Basic a2VlbDpwdw==" in proxy.heads[0]  # keel:pw
            monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
            await chat_twice(srv)
            assert len(proxy.heads) == 1 and len(srv.requests) == 4

    run(main())


def test_https_proxy_tunnels_with_connect_and_the_ca_bundle_still_applies(monkeypatch, pki):
    async def main() -> None:
        async with LoopbackProxy() as proxy, Server(ok(), tls=pki.server_context()) as srv:
            monkeypatch.setenv("HTTPS_PROXY", proxy.url)
            monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # not for https URLs
            await chat_twice(srv, ca_bundle=str(pki.ca))
            port = srv.url.split(":")[2].split("/")[0]
            assert proxy.request_lines() == [f"CONNECT 127.0.0.1:{port} HTTP/1.1"]
            p = provider(srv.url)  # through the proxy, the upstream's certificate is still checked
            err = await expect_error(p.chat(chat_request()))
            await p.close()
            assert isinstance(err, UpstreamError) and "certificate" in err.detail.lower()

    run(main())


def test_a_proxy_that_cannot_reach_the_upstream_is_a_retryable_error(monkeypatch):
    async def main() -> None:
        async with LoopbackProxy() as proxy:
            monkeypatch.setenv("HTTP_PROXY", proxy.url)
            p = provider("http://127.0.0.1:9/v1")
            err = await expect_error(p.chat(chat_request()))
            await p.close()
            assert type(err) is UpstreamError and err.retryable and len(proxy.heads) == 1

    run(main())


# -- TLS: CA bundle and client certificates ---------------------------------------------------------------

def test_a_custom_ca_bundle_from_settings_or_a_deployment_is_trusted_and_nothing_else(pki):
    async def main() -> None:
        async with Server(ok(), tls=pki.server_context()) as srv:
            await chat_twice(srv, ca_bundle=str(pki.ca))
            p = provider(srv.url, Outbound(ca_bundle=str(pki.ca)))
            assert (await p.chat(chat_request())).content == "hi"
            await p.close()
            p = provider(srv.url)  # the system's trust store does not know the test CA
            err = await expect_error(p.chat(chat_request()))
            await p.close()
            assert type(err) is UpstreamError and err.retryable and "certificate" in err.detail.lower()
            assert len(srv.requests) == 3

    run(main())


def test_a_client_certificate_is_presented_to_a_server_that_requires_one(pki):
    async def main() -> None:
        async with Server(ok(), tls=pki.server_context(require_client_cert=True)) as srv:
            p = provider(srv.url, ca_bundle=str(pki.ca))
            err = await expect_error(p.chat(chat_request()))
            await p.close()
            assert type(err) is UpstreamError and "connection error" in err.detail and not srv.requests
            await chat_twice(srv, ca_bundle=str(pki.ca), client_cert=str(pki.client_cert),
                             client_key=str(pki.client_key))
            from_settings = Outbound(ca_bundle=str(pki.ca), client_cert=str(pki.client_cert),
                                     client_key=str(pki.client_key))
            p = provider(srv.url, from_settings)
            assert (await p.chat(chat_request())).content == "hi"
            await p.close()
            subjects = [dict(pair for rdn in peer["subject"] for pair in rdn) for peer in srv.peers if peer]
            assert subjects and all(s["commonName"] == "keel-client" for s in subjects)

    run(main())


def test_unusable_tls_files_are_config_errors_naming_them_before_any_call(pki, tmp_path):
    with pytest.raises(ConfigError, match="nowhere.pem"):
        provider("https://127.0.0.1:9/v1", ca_bundle=str(tmp_path / "nowhere.pem"))
    with pytest.raises(ConfigError, match="client certificate"):
        provider("https://127.0.0.1:9/v1", client_cert=str(pki.ca), client_key=str(pki.client_key))
    with pytest.raises(ConfigError, match="without a client certificate"):
        provider("https://127.0.0.1:9/v1", client_key=str(pki.client_key))
    with pytest.raises(ConfigError, match="outbound_ca_bundle"):
        load_settings(environ={"KEEL_OUTBOUND_CA_BUNDLE": str(tmp_path / "nowhere.pem")})
    settings, _ = load_settings(environ={"KEEL_OUTBOUND_CA_BUNDLE": str(pki.ca),
                                         "KEEL_OUTBOUND_CLIENT_CERT": str(pki.client_cert),
                                         "KEEL_OUTBOUND_CLIENT_KEY": str(pki.client_key)})
    assert Outbound.from_settings(settings) == Outbound(str(pki.ca), str(pki.client_cert), str(pki.client_key))


# -- workflow egress shares the stack, never the proxy -------------------------------------------------------

def test_workflow_egress_uses_the_ca_bundle_and_never_an_environment_proxy(monkeypatch, pki):
    """Through a proxy, the proxy resolves the name and Keel's connect-time address check would see only
    the proxy: workflow egress connects directly, whatever HTTPS_PROXY/HTTP_PROXY say."""
    async def main() -> None:
        async with LoopbackProxy() as proxy, Server(ok(), tls=pki.server_context()) as srv:
            monkeypatch.setenv("HTTPS_PROXY", proxy.url)
            monkeypatch.setenv("HTTP_PROXY", proxy.url)
            egress = Egress(outbound=Outbound(ca_bundle=str(pki.ca)))
            host = srv.url.split("//")[1].split("/")[0]
            out = await egress.request("POST", srv.url + "/hook", body={"a": 1}, allow_hosts=[host])
            await egress.close()
            assert out["status"] == 200 and out["body"]["choices"][0]["message"]["content"] == "hi"
            assert not proxy.heads and len(srv.requests) == 1

    run(main())
