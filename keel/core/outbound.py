"""Keel's one outbound HTTP stack: `keel.core.http1` clients built from one `Outbound` (a CA bundle, a client
certificate, proxies from the environment), for providers, webhooks and workflow tools alike.

Proxies come from `HTTPS_PROXY` / `HTTP_PROXY` / `NO_PROXY` (read with the standard library, once per client for
its origin, or per call for a webhook) and are passed per request; `~/.netrc` is never read (an entry for a
provider's host would clash with the provider's `Authorization` header).

>>> out = Outbound(ca_bundle="/etc/keel/corp-ca.pem")
>>> client = out.client()
>>> proxy = out.proxy_for("https://api.openai.com/v1")   # (URL of the proxy, its Proxy-Authorization) or None
"""

from __future__ import annotations

import base64
import ssl
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from yarl import URL

from keel import __version__
from keel.core.http1 import Client, Proxy, Resolver
from keel.core.errors import ConfigError

USER_AGENT = f"keel/{__version__}"  # sent on every outbound call that names no other
TLS_OPTIONS = ("ca_bundle", "client_cert", "client_key")  # per-deployment options that override the settings'


@dataclass(frozen=True)
class Outbound:
    """How Keel reaches other services. `ca_bundle` (PEM) replaces the system's trust store; `client_cert`
    (PEM, with its key inside or in `client_key`) is presented to servers that ask for one; `env_proxy`
    says whether `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY` apply."""

    ca_bundle: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    env_proxy: bool = True

    @classmethod
    def from_settings(cls, settings: Any) -> Outbound:
        """The install-wide choices from `Settings` (`outbound_ca_bundle`, `outbound_client_cert`, …)."""
        def path(value: Any) -> str | None:
            return str(value) if value else None
        return cls(path(settings.outbound_ca_bundle), path(settings.outbound_client_cert),
                   path(settings.outbound_client_key))

    def with_options(self, options: Mapping[str, Any], where: str) -> Outbound:
        """This, with a deployment's own `ca_bundle` / `client_cert` / `client_key` options on top."""
        mine = {k: options[k] for k in TLS_OPTIONS if options.get(k) is not None}
        for key, value in mine.items():
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{where}: option {key} must be a file path", fix=f"set {key} to a PEM file's path")
        return replace(self, **mine) if mine else self

    def ssl_context(self, where: str = "outbound HTTP") -> ssl.SSLContext | bool:
        """The TLS context to connect with; `True` (the system's trust store, made once per client) when nothing
        is configured. A missing or unreadable file is a `ConfigError` naming it."""
        if not (self.ca_bundle or self.client_cert):
            if self.client_key:
                raise ConfigError(f"{where}: a client key is set without a client certificate",
                                  fix="set client_cert (outbound_client_cert) too, or remove the key")
            return True
        try:
            ctx = ssl.create_default_context(cafile=self.ca_bundle)  # a bundle replaces the system's store
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{where}: CA bundle {self.ca_bundle} cannot be loaded ({exc})",
                              fix="point ca_bundle (outbound_ca_bundle) at a readable PEM file") from None
        if self.client_cert:
            try:
                ctx.load_cert_chain(self.client_cert, self.client_key)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"{where}: client certificate {self.client_cert} cannot be loaded ({exc})",
                                  fix="point client_cert (and client_key, unless the key is in the same file) "
                                      "at readable PEM files that belong together") from None
        elif self.client_key:
            raise ConfigError(f"{where}: a client key is set without a client certificate",
                              fix="set client_cert (outbound_client_cert) too, or remove the key")
        return ctx

    def proxy_for(self, url: str | URL) -> Proxy | None:
        """The environment's proxy for `url` and its Proxy-Authorization value, or None when there is none or
        `NO_PROXY` covers the host. Read now: a client keeps what it read for its origin."""
        if not self.env_proxy:
            return None
        target = URL(url)
        if not target.host or urllib.request.proxy_bypass(target.host):
            return None
        chosen = urllib.request.getproxies().get(target.scheme)
        if not chosen:
            return None
        proxy = URL(chosen if "://" in chosen else f"http://{chosen}")
        if proxy.scheme != "http":  # never speak in clear to a proxy its owner meant to reach over TLS
            raise ConfigError(f"the {target.scheme} proxy from the environment is a {proxy.scheme}:// URL; Keel "
                              "speaks to proxies over http:// (an https target is still tunnelled over TLS with "
                              "CONNECT)", fix=f"set {target.scheme.upper()}_PROXY to the proxy's http:// URL, or "
                              "add the host to NO_PROXY")
        auth = None
        if proxy.user:
            token = base64.b64encode(f"{proxy.user}:{proxy.password or ''}".encode("latin-1")).decode("ascii")
            auth = f"Basic {token}"
        return proxy.with_user(None), auth

    def client(self, *, limit: int = 100, keepalive_s: float = 30.0, where: str = "outbound HTTP",
               tls: ssl.SSLContext | bool | None = None, resolver: Resolver | None = None) -> Client:
        """A client with this TLS context (or `tls`, one `ssl_context()` made before) and a keep-alive pool of
        `limit` connections; no cookies, no redirects, no timeouts of its own (callers bound what they await)
        and no proxy: pass `proxy_for(url)` per request."""
        return Client(tls=self.ssl_context(where) if tls is None else tls, limit=limit, keepalive_s=keepalive_s,
                      resolver=resolver)

